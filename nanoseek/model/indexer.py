"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2, `deepseek_v32`).

Each attention layer gets a small scorer that, for query token t, rates every past token s:

    I(t, s) = Σ_j w(t, j) · ReLU(q(t, j) · k(s))        j over index_n_heads heads

and MLA then attends only over the `index_topk` highest-rated tokens (`mla.py`). The indexer has
its own query projection `wq_b` from MLA's normalised query latent (`q_a_layernorm(q_a_proj(h))`),
one key per token shared by its heads (`wk`, then a LayerNorm *with* bias, `k_norm`), and per-head
weights `weights_proj(h)`. Checkpoint names are the released ones:
`model.layers.N.self_attn.indexer.{wq_b, wk, k_norm, weights_proj}`.

Where the two references differ, and what we do:

* RoPE. The first `qk_rope_head_dim` channels of q and k carry position (rope part *first*, unlike
  MLA's [nope ; rope]) and are rotated in the **half-split** layout, while MLA itself rotates
  interleaved pairs. transformers does this; the official V3.2-Exp inference code first rotated the
  indexer interleaved and was corrected to half-split in November 2025 (the weights were trained
  that way). We follow the corrected code / transformers.
* Precision. The official code rotates q and k by a Hadamard matrix and scores FP8 q against FP8 keys
  (per-token scales rounded to powers of two, `scale_fmt: ue8m0`); transformers skips both (the
  Hadamard transform is orthogonal, so exact dot products are unchanged). We score in full precision
  by default, so the cached and uncached paths agree exactly, and offer FP8 keys
  (`fp8_keys = True`, set from outside by the engine): Hadamard-rotated keys stored as
  index_head_dim FP8 bytes plus one fp32 power-of-two scale (index_head_dim + 4 bytes per token).
* Scale. Both fold 1/sqrt(index_head_dim) and 1/sqrt(index_n_heads) into the scores; the
  ordering is all that matters for selection, but we keep the same numbers.

Top-k tie-breaking (documented, deterministic): ReLU scores tie exactly at 0 easily (every head
negative), and `torch.topk` breaks ties arbitrarily. `select` keeps every token scoring above the
k-th score, then fills the remaining places among the tokens tied *at* the k-th score with the
**most recent** ones (highest position): recent context is the better guess when the indexer has no
opinion, and the rule is the same for the cached and uncached paths.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .rope import apply_rope

FP8_MAX = 448.0  # largest float8_e4m3fn value
SCORE_BUDGET = 1 << 26  # elements of the [B, t, H, S] per-head score block computed at once


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
        self.topk = args.index_topk
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.fp8_keys = False  # cache keys as FP8 (the released model's format); set by the engine

    # --- the scorer -------------------------------------------------------------------------
    def key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden] -> keys [B, T, index_head_dim] (normed, rope part rotated half-split)."""
        k = F.layer_norm(self.wk(x).float(), (self.head_dim,), self.k_norm.weight.float(),
                         self.k_norm.bias.float(), self.k_norm.eps).to(x.dtype)
        return self._rope(k, cos, sin)

    def query(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, hidden], q_resid [B, T, q_lora_rank] -> (q [B, T, H, D], w fp32 [B, T, H]).

        w already holds both scales (1/sqrt(H) and 1/sqrt(D)). Under FP8 keys q is Hadamard-rotated
        like the stored keys."""
        B, T, _ = x.shape
        q = self._rope(self.wq_b(q_resid).view(B, T, self.n_heads, self.head_dim), cos, sin)
        if self.fp8_keys:
            q = q @ hadamard(self.head_dim, q.device, q.dtype)
        w = self.weights_proj(x).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        return q, w

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rope, rest = t.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat([apply_rope(rope, cos, sin, interleave=False), rest], dim=-1)

    @staticmethod
    def score(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """I(t, s) = Σ_j w(t,j) ReLU(q(t,j)·k(s)). q [B,T,H,D], w [B,T,H], keys [B,S,D] -> fp32 [B,T,S].

        Computed in blocks of query tokens so the per-head scores [B, t, H, S] stay bounded."""
        B, T, H, _ = q.shape
        S = keys.shape[1]
        step = max(1, SCORE_BUDGET // max(1, B * H * S))
        kt = keys.float().transpose(1, 2)[:, None]  # [B, 1, D, S]
        out = []
        for t0 in range(0, T, step):
            per_head = torch.relu(q[:, t0 : t0 + step].float() @ kt)  # [B, t, H, S]
            out.append((w[:, t0 : t0 + step, None, :] @ per_head).squeeze(2))  # [B, t, S]
        return torch.cat(out, dim=1)

    @torch.no_grad()  # a selection has no gradient; the indexer trains on its own loss (train/dsa.py)
    def select(self, x, q_resid, cos, sin, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The tokens each query attends to: bool [B, T, S], `index_topk` per row (fewer only where
        `mask`, bool [B|1, T, S], allows fewer). keys [B, S, D] as `stored` returns them."""
        q, w = self.query(x, q_resid, cos, sin)
        return topk_mask(self.score(q, w, keys), mask, self.topk)

    # --- the cache format -------------------------------------------------------------------
    def to_cache(self, keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """keys [B, T, D] -> [B, T, key_cache_width(...)] in `dtype` (bytes reinterpreted under FP8)."""
        if not self.fp8_keys:
            return keys.to(dtype)
        return quantize_keys(keys).view(dtype)

    def from_cache(self, stored: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_cache`: [B, S, key_cache_width] -> keys [B, S, D] (dequantised under FP8)."""
        if not self.fp8_keys:
            return stored
        return dequantize_keys(stored.view(torch.uint8), self.head_dim)

    def stored(self, keys: torch.Tensor) -> torch.Tensor:
        """The keys as the cache would give them back (FP8 round trip under `fp8_keys`)."""
        if not self.fp8_keys:
            return keys
        return dequantize_keys(quantize_keys(keys), self.head_dim).to(keys.dtype)


def key_cache_width(args: ModelArgs, dtype: torch.dtype, fp8: bool = False) -> int:
    """Cache elements (of `dtype`) one token's indexer key takes in one layer: 0 without DSA,
    index_head_dim, or under FP8 keys the index_head_dim + 4 bytes of [fp8 key ; fp32 scale]
    reinterpreted as `dtype` elements (132 bytes at V3.2 size, as the released model caches them)."""
    if not args.dsa:
        return 0
    if not fp8:
        return args.index_head_dim
    nbytes = args.index_head_dim + 4
    if args.index_head_dim % 4 or nbytes % dtype.itemsize:
        raise ValueError(f"FP8 indexer keys need index_head_dim divisible by 4 and a cache dtype of at most 4 bytes")
    return nbytes // dtype.itemsize


def topk_mask(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, T, S]: per row the k highest `scores` among `mask`, ties at the k-th score going to
    the highest positions (see the module docstring). scores fp32 [B, T, S], mask bool [B|1, T, S]."""
    k = min(k, scores.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > kth
    tied = scores == kth
    places = k - above.sum(-1, keepdim=True)
    tied_from_here = tied.flip(-1).cumsum(-1).flip(-1)  # tied tokens at this position or later
    return (above | (tied & (tied_from_here <= places))) & mask


def quantize_keys(keys: torch.Tensor) -> torch.Tensor:
    """keys [..., D] -> uint8 [..., D + 4]: Hadamard-rotated keys in float8_e4m3fn with one fp32 scale,
    a power of two (ue8m0, as the V3.2 checkpoints' `scale_fmt`), per token."""
    D = keys.shape[-1]
    if D % 4:
        raise ValueError(f"FP8 indexer keys need index_head_dim divisible by 4, got {D}")
    k = keys.float() @ hadamard(D, keys.device, torch.float32)
    amax = k.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    scale = torch.exp2(torch.ceil(torch.log2(amax / FP8_MAX)))
    q = (k / scale).to(torch.float8_e4m3fn)
    return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def dequantize_keys(packed: torch.Tensor, D: int) -> torch.Tensor:
    """uint8 [..., D + 4] -> float32 [..., D] (still Hadamard-rotated: queries are rotated to match)."""
    q = packed[..., :D].view(torch.float8_e4m3fn).float()
    return q * packed[..., D : D + 4].view(torch.float32)


@functools.lru_cache(maxsize=8)
def _hadamard_cpu(n: int) -> torch.Tensor:
    if n & (n - 1):
        return torch.eye(n)  # no Sylvester Hadamard matrix: leave keys as they are
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard(n: int, device, dtype) -> torch.Tensor:
    """Orthonormal n×n Hadamard matrix (Sylvester; identity when n is not a power of two). It spreads
    outlier channels over all channels before FP8 rounding and leaves exact dot products unchanged."""
    return _hadamard_cpu(n).to(device=device, dtype=dtype)


def set_sparse(model: nn.Module, sparse: bool) -> None:
    """Switch every DSA layer between sparse (the indexer's selection) and dense attention."""
    for m in model.modules():
        if hasattr(m, "indexer") and m.indexer is not None:
            m.sparse = sparse


def set_fp8_keys(model: nn.Module, fp8: bool) -> None:
    """Store (and score against) FP8 indexer keys in every DSA layer."""
    for m in model.modules():
        if isinstance(m, Indexer):
            m.fp8_keys = fp8
