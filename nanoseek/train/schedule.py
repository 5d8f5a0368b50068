"""The DeepSeek-V3 pre-training schedules (V3 report §4.2), scaled to any run length.

V3 trained on 14.8T tokens and describes every schedule in tokens:

    learning rate  linear warm-up 0 -> 2.2e-4 over the first 2K steps, constant until 10T tokens,
                   cosine down to 2.2e-5 over the next 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B
    batch size     3072 -> 15360 sequences over the first 469B tokens, then constant
    MTP weight λ   0.3 for the first 10T tokens, 0.1 for the remaining 4.8T
    bias speed γ   0.001 for the first 14.3T tokens, 0 for the last 500B (aux-loss-free balancing)

`Schedule` keeps those shapes as *fractions of the token budget* (10T / 14.8T = 0.676, ...), so a
ten-minute run on two cores gets the same curve, just shorter. Everything is a pure function of
(tokens seen, step): a resumed run recomputes the same values and needs no scheduler state beyond
those two numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# V3's phase boundaries as fractions of its 14.8T tokens.
V3_TOKENS = 14.8e12
V3_DECAY_START = 10e12 / V3_TOKENS  # constant learning rate until here ...
V3_DECAY_END = 14.3e12 / V3_TOKENS  # ... cosine until here ...
V3_TAIL_SWITCH = (14.3e12 + 333e9) / V3_TOKENS  # ... then two flat tails
V3_DECAY_RATIO = 2.2e-5 / 2.2e-4  # cosine floor and first tail, relative to the peak
V3_TAIL_RATIO = 7.3e-6 / 2.2e-4  # the last 167B tokens
V3_BATCH_RAMP = 469e9 / V3_TOKENS
V3_BATCH_START_RATIO = 3072 / 15360
V3_MTP_SWITCH = 10e12 / V3_TOKENS


@dataclass
class Schedule:
    """Learning rate, batch size and MTP weight as functions of training progress.

    total_tokens: the run's token budget (the schedule's 100%).
    lr: peak learning rate; warmup_steps: linear warm-up length in optimizer steps (V3: 2000).
    decay_start / decay_end / tail_switch: fractions of total_tokens where the cosine starts,
        ends, and where the first tail (lr * decay_ratio) gives way to the last (lr * tail_ratio).
    batch_size: sequences per optimizer step once ramped; batch_start: at the start;
        batch_ramp: fraction of tokens over which it grows linearly; micro_batch: the ramp moves
        in whole micro-batches (gradient accumulation steps).
    mtp_lambda / mtp_lambda_late / mtp_switch: λ before and after that fraction of tokens.
    bias_gamma / bias_freeze: balancing-bias speed γ, and the fraction of tokens after which it is 0.
    """

    total_tokens: int
    lr: float = 2.2e-4
    warmup_steps: int = 2000
    decay_start: float = V3_DECAY_START
    decay_end: float = V3_DECAY_END
    tail_switch: float = V3_TAIL_SWITCH
    decay_ratio: float = V3_DECAY_RATIO
    tail_ratio: float = V3_TAIL_RATIO
    batch_size: int = 15360
    batch_start: int = 3072
    batch_ramp: float = V3_BATCH_RAMP
    micro_batch: int = 1
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_switch: float = V3_MTP_SWITCH
    bias_gamma: float = 0.001
    bias_freeze: float = V3_DECAY_END

    def __post_init__(self):
        if self.total_tokens <= 0:
            raise ValueError(f"total_tokens must be > 0, got {self.total_tokens}")
        if not 0 <= self.decay_start <= self.decay_end <= self.tail_switch <= 1:
            raise ValueError(f"need 0 <= decay_start ({self.decay_start}) <= decay_end ({self.decay_end}) "
                             f"<= tail_switch ({self.tail_switch}) <= 1")
        if self.micro_batch < 1 or self.batch_size % self.micro_batch:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the micro-batch "
                             f"{self.micro_batch} (gradient accumulation runs whole micro-batches)")
        if not 1 <= self.batch_start <= self.batch_size:
            raise ValueError(f"batch_start {self.batch_start} must be in [1, batch_size={self.batch_size}]")

    def lr_at(self, step: int, tokens: int) -> float:
        """Learning rate for optimizer step `step` (0-based) after `tokens` training tokens."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        p = tokens / self.total_tokens
        if p < self.decay_start:
            ratio = 1.0
        elif p < self.decay_end:
            t = (p - self.decay_start) / (self.decay_end - self.decay_start)
            ratio = self.decay_ratio + (1 - self.decay_ratio) * 0.5 * (1 + math.cos(math.pi * t))
        elif p < self.tail_switch:
            ratio = self.decay_ratio
        else:
            ratio = self.tail_ratio
        return self.lr * warm * ratio

    def batch_at(self, tokens: int) -> int:
        """Sequences in the optimizer step that starts after `tokens` tokens (a multiple of micro_batch)."""
        p = tokens / self.total_tokens
        frac = min(1.0, p / self.batch_ramp) if self.batch_ramp > 0 else 1.0
        size = self.batch_start + frac * (self.batch_size - self.batch_start)
        return max(self.micro_batch, int(size) // self.micro_batch * self.micro_batch)

    def mtp_lambda_at(self, tokens: int) -> float:
        """MTP loss weight λ after `tokens` tokens."""
        return self.mtp_lambda if tokens < self.mtp_switch * self.total_tokens else self.mtp_lambda_late

    def gamma_at(self, tokens: int) -> float:
        """Bias update speed γ after `tokens` tokens."""
        return self.bias_gamma if tokens < self.bias_freeze * self.total_tokens else 0.0
