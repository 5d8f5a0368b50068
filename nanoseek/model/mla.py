"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1).

Keys and values are compressed into one latent per token,
    [c_KV ; k_R] = W_DKV h          c_KV: kv_lora_rank, k_R: qk_rope_head_dim (shared by all heads)
    [k_C ; v]    = W_UKV RMSNorm(c_KV)  per head: qk_nope_head_dim + v_head_dim
and queries optionally through a low-rank bottleneck (q_lora_rank; V2-Lite has none). Each head's
query/key is [nope ; rope], and only the rope part is rotated.

Two paths over the same weights:

* **naive** (training, prefill): expand the latent into per-head K and V and run ordinary
  causal attention. Cheapest when every token attends to a chunk it just computed.
* **absorbed** (decoding): never expand the cache. Since score = q_C·(W_UK c) + q_R·k_R, fold W_UK
  into the query (q_C W_UK is a kv_lora_rank-dim query against the cached latent), attend over the
  latents, and apply W_UV after the weighted sum. The cache holds only norm(c_KV) and rotated k_R,
  side by side in one row: kv_lora_rank + qk_rope_head_dim values per token per layer.

DeepSeek Sparse Attention (V3.2, `args.dsa`): the lightning indexer (`indexer.py`) rates every
past token and each query attends only over the `index_topk` best (all of them while the context is
no longer than that, so short contexts are exactly dense MLA). Its key is cached next to the latent,
in the same row: [norm(c_KV) ; k_R ; indexer key]. Training/prefill apply the selection as a mask;
cached absorbed attention (decoding) gathers only the selected rows, so a decode step's attention
work grows with index_topk, not with the context.

Padding-free packing (`Spans`): documents laid end to end in one row attend causally within
themselves, by batched causal attention over buckets of similar length: about Σ len² work and no
T×T mask (a dense document mask drops SDPA onto its slow masked path and pays for every
cross-document pair it masks); every other layer runs on the real tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .indexer import Indexer
from .layers import RMSNorm
from .rope import apply_rope


class Spans:
    """Documents packed end to end in one row [1, T]: `lengths` of each, in order. As MLA's `mask`:
    each document attends causally to itself only.

    The naive path runs attention on the documents grouped into buckets of similar length, each bucket
    one batched causal call on its documents right-padded to the bucket's longest (the padding sits
    after every real token, so causality alone keeps it out of their attention; its outputs are
    dropped). `gather` [Σ slots] lists the flat token of each padded slot (a document's last token
    repeated as padding), `scatter` [T] the slot of each token; `buckets` (documents, length) each;
    `padded` False when the slots are the tokens in order (equal lengths): no gathers then."""

    SLACK = 1.25  # a bucket takes documents up to this × its shortest (+ 8 tokens) long

    def __init__(self, lengths: list[int], device=None):
        self.lengths = [int(n) for n in lengths]
        starts = [0]
        for n in self.lengths[:-1]:
            starts.append(starts[-1] + n)
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        groups: list[list[int]] = []
        for i in order:
            if not groups or self.lengths[i] > self.SLACK * self.lengths[groups[-1][0]] + 8:
                groups.append([])
            groups[-1].append(i)
        gather, scatter = [], [0] * sum(self.lengths)
        self.buckets = []
        for g in groups:
            L = self.lengths[g[-1]]
            for i in g:
                for j in range(L):
                    if j < self.lengths[i]:
                        scatter[starts[i] + j] = len(gather)
                    gather.append(starts[i] + min(j, self.lengths[i] - 1))
            self.buckets.append((len(g), L))
        self.padded = gather != list(range(len(scatter)))
        self.gather = torch.tensor(gather, dtype=torch.long, device=device)
        self.scatter = torch.tensor(scatter, dtype=torch.long, device=device)

    def attend(self, q, k, v, scale: float) -> torch.Tensor:
        """q, k, v [1, T, H, d] -> causal attention within each document, [1, T, H, d]."""
        if not self.padded:  # no slot is padding and the order is kept: plain views
            parts = [t[0].split([n * L for n, L in self.buckets]) for t in (q, k, v)]
        else:
            parts = [t[0].index_select(0, self.gather).split([n * L for n, L in self.buckets]) for t in (q, k, v)]
        out = [F.scaled_dot_product_attention(*(x.view(n, L, *x.shape[1:]).transpose(1, 2) for x in xs),
                                              is_causal=True, scale=scale).transpose(1, 2).flatten(0, 1)
               for (n, L), xs in zip(self.buckets, zip(*parts))]  # [n·L, H, d] each
        out = torch.cat(out) if len(out) > 1 else out[0]
        return (out.index_select(0, self.scatter) if self.padded else out)[None]

    def dense(self, device) -> torch.Tensor:
        """The same rule as a bool mask [1, T, T] (for the paths that need one: absorbed, DSA)."""
        doc = torch.repeat_interleave(torch.arange(len(self.lengths), device=device),
                                      torch.tensor(self.lengths, device=device))
        T = doc.numel()
        return (torch.ones(T, T, dtype=torch.bool, device=device).tril() & (doc[:, None] == doc[None, :]))[None]


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.softmax_scale = args.softmax_scale
        self.interleave = args.rope_interleave
        qk_dim, bias = args.qk_head_dim, args.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(args.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(args.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, args.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.hidden_size, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, args.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.hidden_size, bias=bias)
        self.indexer = Indexer(args) if args.dsa else None
        self.sparse = args.dsa  # attend over the indexer's selection (False: dense, e.g. DSA warm-up)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """The parts both paths share.

        x: [B, T, hidden]; cos/sin: [B, T, rope/2] at each token's absolute position.
        Returns q_nope [B,T,H,nope], q_rope [B,T,H,rope] (rotated), latent [B,T,kv_lora_rank]
        (normalised c_KV), k_rope [B,T,rope] (rotated): these two are what a cache stores; and
        q_resid [B,T,q_lora_rank] (the normalised query latent the indexer reads; None without q-LoRA).
        """
        B, T, _ = x.shape
        q_resid = None
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, cos, sin, self.interleave)
        k_rope = apply_rope(k_rope, cos, sin, self.interleave)
        return q_nope, q_rope, latent, k_rope, q_resid

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        absorbed: bool | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden].

        Without `cache`: causal attention over the T tokens (naive path unless `absorbed=True`).
        With `cache` and `positions=None`: the T tokens are positions 0..T-1 of every row (a prompt's
        first chunk); their rows are written, and attention is as without a cache. With `cache` [B, S, kv_lora_rank + qk_rope_head_dim (+ indexer key under DSA)] (each row
        [norm(c_KV) ; rotated k_R (; indexer key)]) and `positions` LongTensor[B, T]: the new rows are
        written at their positions, then each query attends to cache rows [0, its position] among the
        first `kv_len` rows (default S). Rows past a sequence's position are masked, so stale slots
        never leak. Cached attention defaults to the absorbed path; `absorbed=False` expands the cached
        latents instead (same result). `mask` bool [B, T, T] replaces the causal mask of the uncached
        path (packed sequences: causal within each document only), or `Spans` (B = 1: documents end
        to end, attention batched per bucket of similar lengths). Under DSA each query keeps only the
        indexer's top-k of the rows it may see.
        """
        q_nope, q_rope, latent, k_rope, q_resid = self.project(x, cos, sin)
        B, T, _ = x.shape
        idx = self.indexer
        if cache is not None and positions is None:
            # The first chunk of every sequence (positions 0..T-1): write its rows, then attend
            # within the chunk exactly as without a cache. Plain causal attention runs SDPA's fused
            # kernel with is_causal; the cached path's explicit mask would not (4x slower at 4096).
            row = torch.cat([latent, k_rope], dim=-1).to(cache.dtype)
            if idx is not None:
                row = torch.cat([row, idx.to_cache(idx.key(x, cos, sin), cache.dtype)], dim=-1)
            cache[:, :T] = row
            cache = None
        if cache is None:
            if isinstance(mask, Spans) and (absorbed or (idx is not None and self.sparse and T > idx.topk)):
                mask = mask.dense(x.device)
            if idx is not None and self.sparse and T > idx.topk:
                keys = idx.stored(idx.key(x, cos, sin))
                mask = idx.select(x, q_resid, cos, sin, keys, _causal(T, x.device) if mask is None else mask)
            if absorbed:
                kv = torch.cat([latent, k_rope], dim=-1)
                return self._absorbed(q_nope, q_rope, kv, mask=_causal(T, x.device) if mask is None else mask)
            return self._naive(q_nope, q_rope, latent, k_rope, mask=mask)
        rows = torch.arange(B, device=x.device)[:, None]
        row = torch.cat([latent, k_rope], dim=-1).to(cache.dtype)
        if idx is not None:
            row = torch.cat([row, idx.to_cache(idx.key(x, cos, sin), cache.dtype)], dim=-1)
        cache[rows, positions] = row
        S = kv_len or cache.shape[1]
        width = self.kv_lora_rank + self.rope_dim
        kv = cache[:, :S, :width].to(latent.dtype)
        mask = torch.arange(S, device=x.device) <= positions[:, :, None]  # [B, T, S]
        if idx is not None and self.sparse and S > idx.topk:
            mask = idx.select(x, q_resid, cos, sin, idx.from_cache(cache[:, :S, width:]).to(x.dtype), mask)
            if absorbed is not False and T * idx.topk < S:
                return self._absorbed_selected(q_nope, q_rope, kv, mask, idx.topk)
        if absorbed is False:
            latent, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            return self._naive(q_nope, q_rope, latent, k_rope, mask=mask)
        return self._absorbed(q_nope, q_rope, kv, mask=mask)

    def _naive(self, q_nope, q_rope, latent, k_rope, mask):
        """Expand latents to per-head K/V and run SDPA. mask: None (causal), bool [B, T, S] or Spans."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        # SDPA's fused kernels want one head size for q, k and v; with v_head_dim < qk_head_dim
        # it falls back to the unfused math path (~2x slower on CPU, fwd+bwd). Zero-padding v
        # keeps the fused kernel; the padded output columns are zero and dropped.
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        if isinstance(mask, Spans):  # packed documents: batched causal attention per length bucket
            out = mask.attend(q, k, v, self.softmax_scale)[..., : self.v_dim]  # [1, T, H, v]
            return self.o_proj(out.flatten(2))
        attn_mask = None if mask is None else mask[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=attn_mask, is_causal=mask is None, scale=self.softmax_scale,
        )[..., : self.v_dim]  # [B, H, T, v]
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def _absorbed(self, q_nope, q_rope, kv, mask):
        """Attend in the latent space. kv [B, S, kv_lora_rank + rope] (rows [c_KV ; k_R]),
        mask bool [B|1, T, S]."""
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]
        # W_UK folded into the query, as one bmm with the heads as its batch: [H, B*T, nope] @ [H, nope, r].
        # (matmul of [B, H, T, nope] by [H, nope, r] would broadcast the weight to B copies first:
        # a third of a batch-64 decode step on CPU. bmm rather than einsum: no Python-side parsing.)
        q_latent = torch.bmm(q_nope.reshape(B * T, H, -1).transpose(0, 1), w_uk)  # [H, B*T, r]
        q_latent = q_latent.transpose(0, 1).view(B, T, H, -1)
        # score = [q_C W_UK ; q_R] · [c_KV ; k_R]: one matmul over each cached row, read once
        q = torch.cat([q_latent, q_rope], dim=-1).flatten(1, 2) * self.softmax_scale  # [B, T*H, r+rope]
        scores = torch.bmm(q, kv.transpose(1, 2)).float().view(B, T, H, -1)
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype).flatten(1, 2)  # [B, T*H, S]
        out = torch.bmm(probs, kv[..., : self.kv_lora_rank]).view(B, T, H, -1)
        out = torch.bmm(out.view(B * T, H, -1).transpose(0, 1), w_uv.transpose(1, 2))  # W_UV after the sum
        return self.o_proj(out.transpose(0, 1).reshape(B, T, -1))


    def _absorbed_selected(self, q_nope, q_rope, kv, selected, k):
        """Absorbed attention reading only the selected rows: gathers the k rows each query keeps
        (selected bool [B, T, S], at most k per row) and attends over those. Same result as
        `_absorbed` under the `selected` mask, at O(T·k) rows read instead of O(S)."""
        B, T, H, _ = q_nope.shape
        keep = selected.to(torch.uint8).topk(k, dim=-1)  # the selected rows first (ties are all 1s)
        index, valid = keep.indices, keep.values.bool()  # [B, T, k]
        picked = kv.gather(1, index.flatten(1)[..., None].expand(-1, -1, kv.shape[-1]))  # [B, T*k, W]
        out = self._absorbed(q_nope.flatten(0, 1)[:, None], q_rope.flatten(0, 1)[:, None],
                             picked.view(B * T, k, -1), mask=valid.view(B * T, 1, k))
        return out.view(B, T, -1)


def _causal(T: int, device) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None]
