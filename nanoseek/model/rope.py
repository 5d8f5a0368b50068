"""Rotary position embedding for MLA's decoupled key/query part, with YaRN context extension.

Only `qk_rope_head_dim` channels of each query head and the single shared key `k_R` carry
position. DeepSeek checkpoints rotate *adjacent pairs* (x0, x1), (x2, x3), ... (the official code
views them as complex numbers); `rope_interleave=False` selects the half-split (rotate_half) layout.

YaRN (DeepSeek-V2 appendix; V3 extends 4K -> 128K): each frequency is blended between the
original (extrapolation) and `freq / factor` (interpolation) by a linear ramp over the dimensions
whose wavelength falls between `beta_fast` and `beta_slow` rotations of the original context.
The attention temperature lives in `ModelArgs.softmax_scale` (mscale_all_dim); cos/sin are scaled by
mscale(mscale)/mscale(mscale_all_dim), which is 1 for the released configs.
"""

from __future__ import annotations

import math

import torch

from .args import ModelArgs, yarn_mscale


def inv_frequencies(args: ModelArgs) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq FloatTensor[qk_rope_head_dim // 2], cos/sin scale)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = args.yarn
    if yarn is None:
        return freqs, 1.0
    factor = float(yarn["factor"])
    original = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension whose wavelength fits `rotations` times into the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / factor * ramp + freqs * (1 - ramp)

    if yarn.get("attention_factor") is not None:
        scale = float(yarn["attention_factor"])
    elif yarn.get("mscale") and yarn.get("mscale_all_dim"):
        scale = yarn_mscale(factor, yarn["mscale"]) / yarn_mscale(factor, yarn["mscale_all_dim"])
    else:
        scale = yarn_mscale(factor)
    return freqs, scale


def rope_table(args: ModelArgs, max_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin FloatTensor[max_len, qk_rope_head_dim // 2] (fp32), indexed by absolute position."""
    freqs, scale = inv_frequencies(args)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return (angles.cos() * scale).to(device), (angles.sin() * scale).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = True) -> torch.Tensor:
    """Rotate x[..., T, H, d] (or [..., T, d]) by cos/sin[..., T, d/2]; heads broadcast if x has them.

    cos/sin are [B, T, d/2]; x is [B, T, H, d] or [B, T, d].
    """
    if x.dim() == cos.dim() + 1:
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    dtype = x.dtype
    x = x.float()
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)


def extend_context(args: ModelArgs, length: int, factor: float | None = None) -> ModelArgs:
    """The config of a YaRN context-extension stage: `length` positions from the same weights.

    DeepSeek-V3 (§4.3) extended 4K -> 32K -> 128K in two stages of further training, both with
    YaRN on the decoupled rope key only, beta_fast 32, beta_slow 1 and attention scale
    0.1·ln(factor) + 1 (mscale = mscale_all_dim = 1). The original length stays the pre-training one
    across stages (a second stage refines the first's `rope_scaling`, it does not stack on it).
    `factor` defaults to length / original; V3 used 40 (its final 160K / 4K) in both stages.
    """
    original = args.yarn["original_max_position_embeddings"] if args.yarn else args.max_position_embeddings
    if length <= args.max_position_embeddings:
        raise ValueError(f"--extend-context {length} must exceed the model's context "
                         f"(max_position_embeddings={args.max_position_embeddings})")
    factor = float(factor if factor is not None else length / original)
    if factor < 1:
        raise ValueError(f"YaRN factor {factor} must be >= 1")
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, "beta_fast": 32,
               "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    return args.replace(max_position_embeddings=length, rope_scaling=scaling)
