"""FP8 mixed-precision training (DeepSeek-V3 report §3.3), applied to a built model from outside.

    model = Transformer(args)
    to_fp8_training(model)        # the Linear layers and routed experts now compute in FP8

All three GEMMs of a linear layer y = x W^T take E4M3 operands, each tiled along *its own*
reduction dimension (report §3.3.2, Figure 7):

    Fprop  y  = x  · W^T    x:  1x128 tiles along in_features        W: 128x128 blocks
    Dgrad  dx = dy · W      dy: 1x128 tiles along out_features       W: the same blocks, transposed
    Wgrad  dW = dy^T · x    dy^T, x^T: 1x128 tiles along the tokens

The input is cached for the backward in FP8 (its forward tiles), then dequantised and re-tiled along
the tokens for Wgrad, as the report does with its cached activations. The weight's 128x128 blocks
read the same either way round, so Dgrad reuses the forward's quantised weight. Master weights,
gradients and the optimizer stay fp32; the output is in the input's dtype.

Kept in higher precision, as in the report: embedding, output head, MoE gate (its scores decide
routing), norms, the attention core (softmax(QK^T)V), and MTP's eh_proj (BF16 in the released
checkpoints too). What is swapped: every nn.Linear inside attention (MLA) and the SwiGLU FFNs
(dense layers and shared experts), and the routed experts' two grouped GEMMs.

The swap changes a module's class to a subclass that overrides `forward` only: parameter names,
the state_dict (so checkpoints stay the ordinary HF layout), devices and any optimizer already
holding the parameters are untouched, and the model files know nothing about FP8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import MLP
from ..model.mla import MLA
from ..model.moe import Experts
from .fp8 import dequantize_tiles, fp8_gemm, quantize_blocks, quantize_tiles


class _FP8Matmul(torch.autograd.Function):
    """x [M, K] @ weight[N, K]^T with all three GEMMs in FP8 (module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_tiles(x)  # along K (in_features)
        wq, ws = quantize_blocks(weight)
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.dtypes = (x.dtype, weight.dtype)
        return fp8_gemm(xq, xs, wq, ws, b_blocks=True, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dx = dw = None
        if ctx.needs_input_grad[0]:  # Dgrad: reduce over N
            gq, gs = quantize_tiles(dy)
            dx = fp8_gemm(gq, gs, wq.t(), ws.t(), b_blocks=True, out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:  # Wgrad: reduce over the tokens
            gq, gs = quantize_tiles(dy.t())
            xt_q, xt_s = quantize_tiles(dequantize_tiles(xq, xs).t())
            dw = fp8_gemm(gq, gs, xt_q, xt_s, b_blocks=False, out_dtype=w_dtype)
        return dx, dw


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with FP8 GEMMs: x [..., in] , weight [out, in] (fp32 master) -> [..., out]."""
    y = _FP8Matmul.apply(x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias.to(y.dtype)


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8; same parameters, same state_dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias)


# --- routed experts ----------------------------------------------------------------------------------
class _FP8GroupedMatmul(torch.autograd.Function):
    """Tokens sorted by expert: x [T, K] (rows counts[e] per expert) @ weight[e] [N, K]^T -> [T, N].

    The same three FP8 GEMMs as `_FP8Matmul`, one per expert group. Wgrad's token tiles never
    straddle two experts: each group is tiled from its own first row (as DeepGEMM pads each group).
    On CPU the groups are emulated one after another; on GPU each is one blockwise FP8 GEMM.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(weight)  # [E, N, K] -> scales [E, N/128, K/128]
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.counts, ctx.dtypes = counts, (x.dtype, weight.dtype)
        out = x.new_empty(x.shape[0], weight.shape[1])
        for e, (start, stop) in _groups(counts):
            out[start:stop] = fp8_gemm(xq[start:stop], xs[start:stop], wq[e], ws[e], True, x.dtype)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xq, xs, wq, ws = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        dx = torch.zeros(xq.shape, dtype=x_dtype, device=dy.device) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(wq.shape, dtype=w_dtype, device=dy.device) if ctx.needs_input_grad[1] else None
        if dx is not None:
            gq, gs = quantize_tiles(dy)
        for e, (start, stop) in _groups(ctx.counts):
            if dx is not None:
                dx[start:stop] = fp8_gemm(gq[start:stop], gs[start:stop], wq[e].t(), ws[e].t(), True, x_dtype)
            if dw is not None:
                g = quantize_tiles(dy[start:stop].t())
                xt = quantize_tiles(dequantize_tiles(xq[start:stop], xs[start:stop]).t())
                dw[e] = fp8_gemm(*g, *xt, b_blocks=False, out_dtype=w_dtype)
        return dx, dw, None


def _groups(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, (start, start + n)
        start += n


def fp8_grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Grouped FP8 GEMM: x [T, K] sorted by expert (counts[e] rows each), weight [E, N, K] -> [T, N]."""
    return _FP8GroupedMatmul.apply(x, weight, counts)


def routed_experts(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, matmul) -> torch.Tensor:
    """The routed-expert FFN of nanoseek.model.moe.Experts with a pluggable grouped matmul.

    x [N, hidden]; indices/weights [N, K]; gate_up [E, 2*inter, hidden]; down [E, hidden, inter];
    matmul(x_sorted [T, in], w [E, out, in], counts: list[int]) -> [T, out]. -> [N, hidden].
    """
    N, K = indices.shape
    flat = indices.flatten()
    order = flat.argsort(stable=True)  # token copies sorted by expert
    token = order // K
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    h = matmul(x[token], gate_up, counts)
    gate, up = h.chunk(2, dim=-1)
    h = matmul(F.silu(gate) * up, down, counts)
    h = h * weights.flatten()[order, None].to(h.dtype)
    return torch.zeros_like(x).index_add_(0, token, h)


class FP8Experts(Experts):
    """Routed experts whose two grouped GEMMs (and their backward) run in FP8; same parameters."""

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return routed_experts(x, indices, weights, self.gate_up_proj, self.down_proj, fp8_grouped_mm)


# --- applying it ---------------------------------------------------------------------------------------
def to_fp8_training(model: nn.Module) -> nn.Module:
    """Swap, in place, the model's FP8-eligible layers (module docstring) to their FP8 versions.

    Returns the model. Idempotent. Call it before torch.compile, after loading weights or not.
    """
    for module in model.modules():
        if isinstance(module, (MLA, MLP)):
            for child in module.children():
                if type(child) is nn.Linear:
                    child.__class__ = FP8Linear
        elif type(module) is Experts:
            module.__class__ = FP8Experts
    return model


def fp8_modules(model: nn.Module) -> int:
    """How many layers of `model` compute in FP8 (for logs and tests)."""
    return sum(isinstance(m, (FP8Linear, FP8Experts)) for m in model.modules())


# --- optimizer with BF16 moments (report §3.3.3) ---------------------------------------------------------
class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW with fp32 master weights and gradients but both moments stored in BF16 (V3 §3.3.3:
    "we adopt the BF16 data format instead of FP32 to track the first and second moments in the
    AdamW optimizer, without incurring observable performance degradation"): half the optimizer
    memory. Each step updates the moments in fp32, applies the update from those fp32 values and
    stores them back rounded to BF16. Same hyper-parameters as torch.optim.AdamW (decoupled decay).
    """

    moment_dtype = torch.bfloat16

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            (b1, b2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
                for key in ("exp_avg", "exp_avg_sq"):  # load_state_dict casts states to the param's dtype
                    if state[key].dtype != self.moment_dtype:  # lossless: they were BF16 when saved
                        state[key] = state[key].to(self.moment_dtype)
                state["step"] += 1
                t = state["step"].item()
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)
                denom = (v / (1 - b2**t)).sqrt_().add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
        return loss


def adamw(named_params, lr: float, betas, weight_decay: float, moments: str = "fp32",
          fused: bool = True) -> torch.optim.Optimizer:
    """The AdamW both training stages use: weight decay on matrices only (norm gains and biases stay
    undecayed, as in nanoGPT); moments "fp32" (torch's AdamW, `fused` unless parameters are
    distributed) or "bf16" (AdamWBF16Moments)."""
    named = list(named_params)
    groups = [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]
    if moments == "bf16":
        return AdamWBF16Moments(groups, lr=lr, betas=betas)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
