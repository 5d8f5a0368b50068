"""The preallocated MLA cache: only what absorbed attention reads.

Per layer one tensor, allocated once at the engine's full size (gpt-fast style, written in place):

    kv [max_batch, max_len, kv_lora_rank + qk_rope_head_dim]    each row [normalised c_KV ; rotated k_R]

that is `kv_lora_rank + qk_rope_head_dim` values per token per layer (576 at DeepSeek-V3 size,
against 2 · 128 heads · 128 = 32,768 for expanded K/V). DeepSeek-V3.2 (DSA) rows also hold the
lightning indexer's key after k_R: index_head_dim values (128), or with `fp8_index_keys` 128 FP8
bytes + a 4-byte scale packed into the row's dtype (`nanoseek.model.indexer.key_cache_width`). Row b of the cache belongs to row b of
the running batch; the engine keeps the running requests in rows 0..n-1 (a finished request's
row is refilled by moving the last one into it), so the model always gets plain slices, which
are views: nothing is gathered or copied per step.
"""

from __future__ import annotations

import torch

from ..model import ModelArgs
from ..model.indexer import key_cache_width

class LatentCache:
    """`n_layers` tensors of shape [max_batch, max_len, kv_lora_rank + qk_rope_head_dim (+ indexer key)]."""

    def __init__(self, args: ModelArgs, n_layers: int, max_batch: int, max_len: int, dtype: torch.dtype, device,
                 fp8_index_keys: bool = False):
        self.max_batch, self.max_len = max_batch, max_len
        width = args.kv_lora_rank + args.qk_rope_head_dim + key_cache_width(args, dtype, fp8_index_keys)
        # empty + fill_ touches every page now rather than during the first decode steps
        self.layers = [torch.empty(max_batch, max_len, width, dtype=dtype, device=device).fill_(0)
                       for _ in range(n_layers)]
        self.bytes_per_token = n_layers * width * dtype.itemsize

    def rows(self, start: int, stop: int) -> list[torch.Tensor]:
        """Views of cache rows [start, stop) for every layer (writes go to the cache)."""
        return [kv[start:stop] for kv in self.layers]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (all layers)."""
        for kv in self.layers:
            kv[dst, :length] = kv[src, :length]

    @property
    def nbytes(self) -> int:
        return sum(kv.numel() * kv.element_size() for kv in self.layers)
