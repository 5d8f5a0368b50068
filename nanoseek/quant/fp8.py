"""The FP8 vocabulary in one place: tile sizes, E4M3 quantisation, the checkpoints' block format, one GEMM.

DeepSeek-V3's fine-grained quantisation (report §3.3.2), and the format its checkpoints ship in:

    ACT_TILE = 128          activations and gradients: 1 x 128 tiles along the GEMM's reduction dim
                            (per token, per 128 channels); the outlier of one token spoils only its tile
    WEIGHT_BLOCK = 128x128  weights: one scale per 128 x 128 block; W and W^T share the same blocks,
                            so the backward pass reuses the forward's quantised weight as it is

Scales are fp32 and follow the checkpoints' `_scale_inv` convention: value ≈ fp8 · scale, with
scale = amax / 448 (E4M3's largest finite value) computed online from the tile or block itself.
With `pow2=True` the scale is rounded *up* to a power of two (UE8M0, what DeepSeek-V3.1 uses):
the mantissa multiply becomes an exponent add, at up to one bit less of range use.

Edge cases, decided here once:
* ragged edges: a dimension that is not a multiple of the tile gets a shorter last tile, scaled by
  its own elements (zero padding never changes a max-abs);
* a tile of zeros gets scale 1.0, not 0: its FP8 values are zeros and dequantise to exact zeros,
  and no later 1/scale can blow up;
* tiny tiles: the scale is floored at fp32's smallest normal number, never 0 or subnormal;
* non-finite elements: the scale is computed from the tile's *finite* elements, so it is always
  finite and > 0 and the tile's other elements keep their precision; ±inf and NaN elements come
  out as NaN (E4M3FN has no infinity). A NaN in a GEMM input turns its output row NaN exactly as in
  fp32, so the trainer's non-finite-step check still sees it. Weight conversion refuses non-finite
  tensors instead (nanoseek/quant/convert.py);
* values are clamped to ±448 before the cast: rounding can put max/scale a hair above 448, and
  PyTorch's CPU cast saturates while its CUDA cast turns out-of-range values into NaN.

`fp8_gemm` is the one matrix product every FP8 layer uses: quantise -> dequantise -> fp32 matmul on
CPU (an exact emulation of a GEMM with fp32 accumulation, which the report's promotion of partial
sums to fp32 every 128 elements of K approximates), and PyTorch's blockwise-scaled FP8 GEMM
(`F.scaled_mm`, cuBLAS) on an sm_90 GPU.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite E4M3FN value
E4M3_MANTISSA_BITS = 3  # relative rounding error of a normal E4M3 value: at most 2^-(3+1) = 1/16
ACT_TILE = 128
WEIGHT_BLOCK = (128, 128)
_TINY = torch.finfo(torch.float32).tiny

# The tensors the released DeepSeek-V3/R1 checkpoints store in FP8: every projection of attention,
# of the dense FFNs, of the shared and the routed experts, in the main layers and in the MTP layer's
# block. Embedding, output head (and the MTP copies of both), MTP's eh_proj, norms and the MoE gate
# stay in BF16.
V3_FP8_WEIGHTS = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(WEIGHT_BLOCK),
                       "activation_scheme": "dynamic"}


def stored_in_fp8(name: str) -> bool:
    """Is checkpoint tensor `name` one that DeepSeek-V3 stores as FP8 + `<name>_scale_inv`?"""
    return V3_FP8_WEIGHTS.match(name) is not None


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- scales ----------------------------------------------------------------------------------------
def scale_from_amax(amax: torch.Tensor, pow2: bool = False) -> torch.Tensor:
    """Max-abs of each tile (finite, >= 0) -> fp32 scale: amax/448, 1.0 for all-zero tiles, never 0."""
    scale = (amax.float() / E4M3_MAX).clamp(min=_TINY)
    if pow2:  # UE8M0: round up, so that amax / scale stays <= 448
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _finite_amax(x: torch.Tensor, dims) -> torch.Tensor:
    a = x.float().abs()  # a temporary copy, so the in-place edit below touches nothing of the caller's
    return a.nan_to_num_(nan=0.0, posinf=0.0).amax(dim=dims)


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (scale broadcast over x) -> E4M3, clamped to ±448, non-finite elements -> NaN.
    x - x is 0 for finite x and NaN for ±inf or NaN: adding it maps the non-finite ones to NaN at
    the cost of one subtraction (torch.isfinite is several times slower on CPU). In place on one
    temporary, so quantising a weight costs a small multiple of its own size."""
    q = (x - x).add_(x).div_(scale).clamp_(-E4M3_MAX, E4M3_MAX)  # clamp keeps NaN
    return q.to(E4M3)


# --- activations and gradients: 1 x ACT_TILE tiles -------------------------------------------------
def quantize_tiles(x: torch.Tensor, dim: int = -1, tile: int = ACT_TILE, pow2: bool = False):
    """Quantise x in 1 x `tile` tiles along `dim` (the reduction dim of the GEMM it feeds).

    x [..., K, ...] -> (fp8 of x's shape, fp32 scale of x's shape with K replaced by ceil(K/tile)).
    """
    x = x.movedim(dim, -1)
    K = x.shape[-1]
    pad = (-K) % tile
    tiles = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, tile))  # [..., K/tile, tile]
    scale = scale_from_amax(_finite_amax(tiles, -1), pow2)
    q = _to_e4m3(tiles, scale[..., None]).flatten(-2)[..., :K]
    return q.movedim(-1, dim), scale.movedim(-1, dim)


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, dim: int = -1, tile: int = ACT_TILE,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_tiles`: fp8 [..., K, ...] · scale [..., ceil(K/tile), ...] -> dtype."""
    K = q.shape[dim]
    s = scale.float().repeat_interleave(tile, dim=dim).narrow(dim, 0, K)
    return (q.float() * s).to(dtype)


# --- weights: WEIGHT_BLOCK blocks ------------------------------------------------------------------
def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK, pow2: bool = False):
    """Quantise w [..., out, in] in block[0] x block[1] blocks (leading dims: e.g. experts).

    -> (fp8 [..., out, in], fp32 scale [..., ceil(out/b0), ceil(in/b1)]), the checkpoints' format.
    """
    *lead, rows, cols = w.shape
    b0, b1 = block
    padded = F.pad(w.float(), (0, (-cols) % b1, 0, (-rows) % b0)) if rows % b0 or cols % b1 else w.float()
    blocks = padded.unflatten(-1, (-1, b1)).unflatten(-3, (-1, b0))  # [..., R, b0, C, b1]
    scale = scale_from_amax(_finite_amax(blocks, (-3, -1)), pow2)  # [..., R, C]
    q = _to_e4m3(blocks, scale[..., :, None, :, None])
    return q.flatten(-4, -3).flatten(-2)[..., :rows, :cols].contiguous(), scale


def block_scale_shape(shape, block: tuple[int, int] = WEIGHT_BLOCK) -> tuple[int, ...]:
    """The `_scale_inv` shape a weight of `shape` [..., out, in] needs."""
    *lead, rows, cols = shape
    return (*lead, ceil_div(rows, block[0]), ceil_div(cols, block[1]))


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = WEIGHT_BLOCK,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8 [..., out, in] · scale [..., ceil(out/b0), ceil(in/b1)] per block -> dtype [..., out, in].

    Raises ValueError when the scale's shape does not fit the weight's.
    """
    expected = block_scale_shape(q.shape, block)
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale.shape)} does not match weight {tuple(q.shape)} "
                         f"in {block[0]}x{block[1]} blocks (expected {expected})")
    rows, cols = q.shape[-2:]
    out = q.to(dtype if dtype == torch.float64 else torch.float32)
    # scales per row [..., rows, C] are small; the columns are scaled in place, full blocks through a
    # view and the ragged last one apart, so no weight-sized scale grid is ever materialised
    s = scale.to(out.dtype).repeat_interleave(block[0], -2)[..., :rows, :]
    full = cols // block[1]
    out[..., : full * block[1]].unflatten(-1, (full, block[1])).mul_(s[..., :full, None])
    if cols % block[1]:
        out[..., full * block[1]:].mul_(s[..., full:])
    return out.to(dtype)


# --- the GEMM ----------------------------------------------------------------------------------------
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             b_blocks: bool, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """a @ b.T from FP8 operands quantised along their shared reduction dim K.

    a [M, K] fp8 with 1 x 128 tile scales [M, ceil(K/128)];
    b [N, K] fp8 with 128 x 128 block scales [ceil(N/128), ceil(K/128)] (b_blocks=True, a weight)
    or 1 x 128 tile scales [N, ceil(K/128)] (b_blocks=False, an activation or gradient).
    -> [M, N] in out_dtype.
    """
    if fp8_gemm_on_device(a.device):
        return _scaled_mm_cuda(a, a_scale, b, b_scale, b_blocks, out_dtype)
    a_hat = dequantize_tiles(a, a_scale)
    b_hat = dequantize_blocks(b, b_scale) if b_blocks else dequantize_tiles(b, b_scale)
    with torch.autocast(a.device.type, enabled=False):  # the emulation's matmul is fp32, whatever the caller
        return (a_hat @ b_hat.T).to(out_dtype)


def fp8_gemm_on_device(device: torch.device) -> bool:
    """Does `device` run blockwise-scaled FP8 GEMMs natively? PyTorch's 1x128 / 128x128 recipes run
    on sm_90 (Hopper) through cuBLAS; everything else takes the exact CPU-style emulation."""
    return (device.type == "cuda" and hasattr(F, "scaled_mm")
            and torch.cuda.get_device_capability(device) == (9, 0))


def _scaled_mm_cuda(a, a_scale, b, b_scale, b_blocks, out_dtype):
    """cuBLAS blockwise FP8 GEMM. Every dim is zero-padded to a multiple of 128 (padded tiles are
    zeros with scale 1, so they add nothing); 1x128 scales must be outer-dim-major (stride(0) == 1)
    and 128x128 scales K-major with the K-block count padded to a multiple of 4 (cuBLAS layout)."""
    M, K = a.shape
    N = b.shape[0]
    Mp, Np, Kp = (ceil_div(d, 128) * 128 for d in (M, N, K))
    kb = ceil_div(Kp // 128, 4) * 4

    def pad8(t, rows):  # fp8 tensors: pad through a uint8 view (F.pad has no fp8 kernels); no copy when aligned
        t = t.contiguous()
        if (rows, Kp) == tuple(t.shape):
            return t
        return F.pad(t.view(torch.uint8), (0, Kp - K, 0, rows - t.shape[0])).view(E4M3)

    a_q = pad8(a, Mp)
    b_q = pad8(b, Np)
    a_s = F.pad(a_scale.float(), (0, Kp // 128 - a_scale.shape[1], 0, Mp - M), value=1.0)
    a_s = a_s.t().contiguous().t()
    if b_blocks:
        b_s = F.pad(b_scale.float(), (0, kb - b_scale.shape[1], 0, Np // 128 - b_scale.shape[0]), value=1.0)
        b_s, recipe_b = b_s.t(), F.ScalingType.BlockWise128x128
    else:
        b_s = F.pad(b_scale.float(), (0, Kp // 128 - b_scale.shape[1], 0, Np - N), value=1.0)
        b_s, recipe_b = b_s.t().contiguous().t(), F.ScalingType.BlockWise1x128
    out_type = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    out = F.scaled_mm(a_q, b_q.t(), a_s, F.ScalingType.BlockWise1x128, b_s, recipe_b, output_dtype=out_type)
    return out[:M, :N].to(out_dtype)
