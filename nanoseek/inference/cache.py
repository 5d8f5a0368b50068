"""The preallocated MLA cache: only what absorbed attention reads.

Per layer two tensors, allocated once at the engine's full size (gpt-fast style, written in place):

    latent [max_batch, max_len, kv_lora_rank]       normalised c_KV
    rope   [max_batch, max_len, qk_rope_head_dim]   the rotated shared rope key k_R

that is `kv_lora_rank + qk_rope_head_dim` values per token per layer (576 at DeepSeek-V3 size,
against 2 · 128 heads · 128 = 32,768 for expanded K/V). Row b of the cache belongs to row b of
the running batch; the engine keeps the running requests in rows 0..n-1 (a finished request's
row is refilled by moving the last one into it), so the model always gets plain slices, which
are views: nothing is gathered or copied per step.
"""

from __future__ import annotations

import torch

from ..model import ModelArgs

LayerCache = tuple[torch.Tensor, torch.Tensor]


class LatentCache:
    """`n_layers` (latent, rope) pairs of shape [max_batch, max_len, ·]."""

    def __init__(self, args: ModelArgs, n_layers: int, max_batch: int, max_len: int, dtype: torch.dtype, device):
        self.max_batch, self.max_len = max_batch, max_len
        self.layers: list[LayerCache] = []
        for _ in range(n_layers):
            # empty + fill_ touches every page now rather than during the first decode steps
            latent = torch.empty(max_batch, max_len, args.kv_lora_rank, dtype=dtype, device=device).fill_(0)
            rope = torch.empty(max_batch, max_len, args.qk_rope_head_dim, dtype=dtype, device=device).fill_(0)
            self.layers.append((latent, rope))
        self.bytes_per_token = n_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.itemsize

    def rows(self, start: int, stop: int) -> list[LayerCache]:
        """Views of cache rows [start, stop) for every layer (writes go to the cache)."""
        return [(latent[start:stop], rope[start:stop]) for latent, rope in self.layers]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (all layers)."""
        for latent, rope in self.layers:
            latent[dst, :length] = latent[src, :length]
            rope[dst, :length] = rope[src, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers for t in pair)
