"""FP8-resident inference: weights stay FP8 + block scales in memory, half the bytes of BF16.

    model = Transformer.from_pretrained(dir, dtype="fp8")     # nanoseek generate/serve --dtype fp8

The layers the released DeepSeek-V3 checkpoints store in FP8 (nanoseek.quant.fp8.V3_FP8_WEIGHTS)
are swapped, before loading, for holders of the FP8 tensors exactly as the checkpoint has them
(`weight` 1 byte per value, `weight_scale_inv` one fp32 per 128 x 128 block). Everything else (embedding,
head, norms, gate, MTP's eh_proj) loads in the compute dtype as usual. A checkpoint that is not FP8
is quantised on load, block by block.

Matmuls: on CPU each call dequantises the weight block by block (fp8 · its block's scale) into
the compute dtype, transiently, one matrix at a time, and runs the ordinary matmul, so the results
equal the model loaded dequantised (`dtype=None`) exactly. Routed experts dequantise only the
experts this batch chose. On an sm_90 GPU a linear quantises its input in 1 x 128 tiles and runs the
blockwise FP8 GEMM (nanoseek.quant.fp8.fp8_gemm) instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import Experts, grouped_mm
from .fp8 import (E4M3, WEIGHT_BLOCK, block_scale_shape, dequantize_blocks, fp8_gemm, fp8_gemm_on_device,
                  quantize_blocks, quantize_tiles)
from .training import routed_experts


def _fp8_pair(holder: nn.Module, name: str, shape, block) -> None:
    holder.register_buffer(name, torch.empty(shape, dtype=E4M3))
    holder.register_buffer(name + "_scale_inv", torch.empty(block_scale_shape(shape, block), dtype=torch.float32))


def _store(dst_q: torch.Tensor, dst_s: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None, block) -> None:
    """Copy one checkpoint tensor into FP8 storage: as it is when FP8 (scale checked), else quantised.
    ValueError (the loader names file and tensor) for a shape that does not fit."""
    if tuple(t.shape) != tuple(dst_q.shape):
        raise ValueError(f"has shape {tuple(t.shape)}, the config needs {tuple(dst_q.shape)}")
    if t.dtype != E4M3:
        t, scale = quantize_blocks(t, block)
    elif tuple(scale.shape) != tuple(dst_s.shape):
        raise ValueError(f"scale_inv shape {tuple(scale.shape)} does not match weight {tuple(t.shape)} "
                         f"in {block[0]}x{block[1]} blocks (expected {tuple(dst_s.shape)})")
    with torch.no_grad():
        dst_q.copy_(t)
        dst_s.copy_(scale)


class FP8InferenceLinear(nn.Module):
    """A bias-optional linear layer whose weight [out, in] stays FP8 with [out/128, in/128] scales.

    `.weight` dequantises on access (MLA's absorbed path reads kv_b_proj.weight directly).
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype, block=WEIGHT_BLOCK):
        super().__init__()
        self.in_features, self.out_features, self.dtype, self.block = linear.in_features, linear.out_features, dtype, block
        _fp8_pair(self, "weight_fp8", (linear.out_features, linear.in_features), block)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_blocks(self.weight_fp8, self.weight_fp8_scale_inv, self.block, self.dtype)

    def load(self, part, t: torch.Tensor, scale: torch.Tensor | None) -> None:
        """The checkpoint's weight (part: None, see nanoseek.checkpoint.hf_to_internal) + its scale."""
        _store(self.weight_fp8, self.weight_fp8_scale_inv, t, scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] in x's dtype."""
        if fp8_gemm_on_device(x.device) and tuple(self.block) == WEIGHT_BLOCK:
            xq, xs = quantize_tiles(x.reshape(-1, self.in_features))
            y = fp8_gemm(xq, xs, self.weight_fp8, self.weight_fp8_scale_inv, b_blocks=True, out_dtype=x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class FP8InferenceExperts(nn.Module):
    """Routed experts held as the checkpoint's per-projection FP8 tensors, stacked over experts:
    gate_proj/up_proj [E, inter, hidden], down_proj [E, hidden, inter], each with its block scales.
    Only the experts a batch routes to are dequantised, one forward at a time."""

    def __init__(self, experts: Experts, dtype: torch.dtype, block=WEIGHT_BLOCK):
        super().__init__()
        E, two_inter, hidden = experts.gate_up_proj.shape
        self.n_experts, self.inter_dim, self.dtype, self.block = E, experts.inter_dim, dtype, block
        for name in ("gate_proj", "up_proj"):
            _fp8_pair(self, name, (E, self.inter_dim, hidden), block)
        _fp8_pair(self, "down_proj", (E, hidden, self.inter_dim), block)

    def load(self, part: tuple, t: torch.Tensor, scale: torch.Tensor | None) -> None:
        """One checkpoint tensor mlp.experts.{expert}.{proj}.weight (+ its scale); part: (expert,
        row start, row stop) in the fused layout (nanoseek.checkpoint.hf_to_internal)."""
        expert, start, stop = part
        proj = "down_proj" if stop is None else "gate_proj" if start == 0 else "up_proj"
        _store(getattr(self, proj)[expert], getattr(self, proj + "_scale_inv")[expert], t, scale, self.block)

    def dequantized(self, q: torch.Tensor, scale: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """The chosen experts' weights of one projection in the compute dtype: [len(experts), out, in]."""
        return dequantize_blocks(q[experts], scale[experts], self.block, self.dtype)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, hidden], indices/weights [N, K] -> [N, hidden]."""
        N, K = indices.shape
        if N * K <= self.n_experts:
            return self._few_tokens(x, indices, weights)
        used, local = indices.unique(return_inverse=True)  # experts chosen, renumbered 0..U-1
        gate = self.dequantized(self.gate_proj, self.gate_proj_scale_inv, used)
        up = self.dequantized(self.up_proj, self.up_proj_scale_inv, used)
        down = self.dequantized(self.down_proj, self.down_proj_scale_inv, used)
        gate_up = torch.cat([gate, up], dim=1).to(x.dtype)
        return routed_experts(x, local, weights, gate_up, down.to(x.dtype), _grouped)


    def _few_tokens(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding (N*K <= E), as nanoseek.model.moe.Experts does it: each token's chosen experts
        gathered (here as FP8, dequantised after the gather) and run as batched mat-vecs; no host
        sync and no data-dependent shape, so the decode step compiles without a graph break."""
        N, K = indices.shape
        flat = indices.flatten()
        gate = self.dequantized(self.gate_proj, self.gate_proj_scale_inv, flat)
        up = self.dequantized(self.up_proj, self.up_proj_scale_inv, flat)
        gate_up = torch.cat([gate, up], dim=1).to(x.dtype)  # [N*K, 2*inter, hidden]
        down = self.dequantized(self.down_proj, self.down_proj_scale_inv, flat).to(x.dtype)
        h = torch.bmm(gate_up, x.repeat_interleave(K, dim=0)[:, :, None]).squeeze(-1)
        g, u = h.split(self.inter_dim, dim=-1)
        h = torch.bmm(down, (F.silu(g) * u)[:, :, None]).squeeze(-1)
        return (h.view(N, K, -1) * weights[..., None].to(h.dtype)).sum(dim=1)


def _grouped(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    c = torch.tensor(counts, device=x.device)
    return grouped_mm(x, w, c.cumsum(0).to(torch.int32), c)


def to_fp8_inference(model: nn.Module, dtype: torch.dtype, block=WEIGHT_BLOCK) -> dict[str, nn.Module]:
    """Swap, in place, the FP8-stored layers of a (meta or real) Transformer for FP8 holders.

    dtype: the compute dtype of the dequantised weights. Returns {internal name of the replaced
    parameter or fused expert tensor: holder} so a loader can route checkpoint tensors to them.
    The holders' FP8 buffers are uninitialised until loaded.
    """
    slots: dict[str, nn.Module] = {}
    for prefix, module in list(model.named_modules()):
        if isinstance(module, (MLA, MLP)):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    holder = FP8InferenceLinear(child, dtype, block)
                    setattr(module, name, holder)
                    slots[f"{prefix}.{name}.weight"] = holder
        elif type(module) is Experts:
            parent_name, _, name = prefix.rpartition(".")
            holder = FP8InferenceExperts(module, dtype, block)
            setattr(model.get_submodule(parent_name), name, holder)
            slots[f"{prefix}.gate_up_proj"] = slots[f"{prefix}.down_proj"] = holder
    return slots


def is_fp8_resident(model: nn.Module) -> bool:
    return any(isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)) for m in model.modules())


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (what 'model memory' means in the bench)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
