"""Batches for training and evaluation, cut from a flat token stream.

The stream is divided into non-overlapping windows of seq_len+1 tokens starting every
seq_len tokens (window k covers tokens[k*T : k*T+T+1]), so every token after the first is a
target exactly once per epoch. A window gives inputs = window[:-1], targets = window[1:].

Training (`BatchLoader`) visits the windows in a seeded random order that is reshuffled each
epoch. Its whole position is two ints, (epoch, offset), offset counting windows consumed in
the epoch's order across all ranks. Because the order depends only on (seed, epoch, number
of windows), a resumed run rebuilds it and continues exactly where the last one stopped,
even with a different batch size or number of ranks.

Evaluation (`eval_batches`) walks the windows in order, all of them, the same every time.
"""

import numpy as np
import torch

from nanoseek.data.corpus import DataError
from nanoseek.data.shards import TokenShards


def num_windows(shards: TokenShards, seq_len: int) -> int:
    """How many (seq_len+1)-token windows the stream holds at stride seq_len."""
    return max(0, (shards.num_tokens - 1) // seq_len)


def _windows(shards: TokenShards, window_ids: np.ndarray, seq_len: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows by index: (inputs [B, T], targets [B, T]) as int64."""
    index = window_ids[:, None] * seq_len + np.arange(seq_len + 1)
    batch = torch.from_numpy(shards.tokens[index].astype(np.int64))
    return batch[:, :-1], batch[:, 1:]


class BatchLoader:
    """Endless, deterministic, resumable training batches.

    Yields (inputs LongTensor [batch_size, seq_len], targets LongTensor [batch_size,
    seq_len]) for this rank. Each step consumes batch_size * world_size windows of the
    epoch's shuffled order; rank r takes the r-th slice. An epoch ends when fewer than that
    remain (the leftover windows are skipped that epoch and land elsewhere in the next).

        loader = BatchLoader(TokenShards(out), batch_size=8, seq_len=256, seed=0)
        x, y = next(loader)
        state = loader.state_dict()          # {"epoch": 0, "offset": 8, ...}
        ...
        loader.load_state_dict(state)        # the next batch is the one after x, y
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, "
                             f"{seq_len}")
        self.shards = shards
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.num_windows = num_windows(shards, seq_len)
        if self.num_windows < batch_size * world_size:
            raise DataError(f"{shards.path} has {shards.num_tokens} tokens = "
                            f"{self.num_windows} windows of {seq_len}+1, fewer than one "
                            f"step of {batch_size} x {world_size} ranks; use more data or a "
                            f"smaller batch/seq_len")
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_windows // (self.batch_size * self.world_size)

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.batch_size * self.world_size
        if self.offset + step > self.num_windows:
            self.epoch, self.offset = self.epoch + 1, 0
        start = self.offset + self.rank * self.batch_size
        window_ids = self._epoch_order()[start:start + self.batch_size]
        self.offset += step
        return _windows(self.shards, window_ids, self.seq_len)

    def state_dict(self) -> dict[str, int]:
        """Plain ints (JSON-friendly); seed, seq_len and num_tokens are kept as checks."""
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed,
                "seq_len": self.seq_len, "num_tokens": self.shards.num_tokens}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "seq_len", "num_tokens"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise DataError(f"cannot resume data loader: saved {key} is {state[key]}, "
                                f"this loader has {mine} (the window order would differ)")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = rng.permutation(self.num_windows), self.epoch
        return self._order


def eval_batches(shards: TokenShards, batch_size: int, seq_len: int, *,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1):
    """Iterate the windows of a split in order: (inputs [b, T], targets [b, T]) int64.

    The last batch may be smaller (b < batch_size) so every window is seen. With several
    ranks, rank r gets batches r, r + world_size, ...; ranks can get one batch more or less
    than each other, so sum losses locally and all-reduce once at the end.
    max_batches caps the total across all ranks, for quick evals.
    """
    total = num_windows(shards, seq_len)
    if total == 0:
        raise DataError(f"{shards.path} has {shards.num_tokens} tokens, not enough for one "
                        f"window of {seq_len}+1")
    starts = range(0, total, batch_size)
    if max_batches is not None:
        starts = starts[:max_batches]
    for i in range(rank, len(starts), world_size):
        window_ids = np.arange(starts[i], min(starts[i] + batch_size, total))
        yield _windows(shards, window_ids, seq_len)
