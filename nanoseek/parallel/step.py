"""One optimizer step at any layout: the data-parallel / expert-parallel part of the training loop.

    parts = train_step(model, optimizer, micro_batches, mtp_lambda=0.3, seq_alpha=1e-4, gamma=1e-3,
                       grad_clip=1.0)

`micro_batches` are this rank's share of the global batch. Each micro-batch's loss is divided by
the number of micro-batches and backpropagated; FSDP averages over the data-parallel ranks, so the
update equals one process's on the whole batch (to fp32 rounding). Pipeline stages have their own
step (nanoseek/parallel/pipeline.py) because the schedule, not this loop, runs the micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanoseek.train.balance import max_vio, update_bias
from nanoseek.train.loss import training_loss

from .parallelize import clip_grad_norm_, global_counts


@dataclass
class StepResult:
    """Global means over the batch (every rank holds the same values); counts: global loads [L, E]."""

    ce: float
    mtp: float
    balance: float
    grad_norm: float
    counts: torch.Tensor
    skipped: bool

    @property
    def maxvio(self) -> list[float]:
        return max_vio(self.counts).tolist() if len(self.counts) else []


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a small tensor over all ranks (every data-parallel rank holds as many tokens)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def train_step(model, optimizer, micro_batches, *, mtp_lambda: float, seq_alpha: float = 0.0,
               aux_alpha: float = 0.0, gamma: float = 0.0, grad_clip: float = 1.0, autocast=None, zero_grad: bool = True) -> StepResult:
    """Forward/backward over this rank's micro-batches [(inputs [b, T], targets [b, T]), ...], clip,
    step, aux-loss-free bias update from the global loads. A non-finite loss or norm skips the update.
    zero_grad=False leaves the (clipped) gradients in place, for inspection."""
    accum = len(micro_batches)
    device = next(model.parameters()).device
    losses, counts = torch.zeros(3, device=device), None
    for inputs, targets in micro_batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if autocast is not None:
            with autocast():
                parts = training_loss(model, inputs, targets, mtp_lambda, seq_alpha, aux_alpha)
        else:
            parts = training_loss(model, inputs, targets, mtp_lambda, seq_alpha, aux_alpha)
        (parts.total / accum).backward()
        losses += torch.stack([parts.ce, parts.mtp, parts.balance])
        counts = parts.counts if counts is None else counts + parts.counts
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = clip_grad_norm_(params, grad_clip if grad_clip > 0 else 0.0)
    ce, mtp, bal = (mean_over_ranks(losses) / accum).tolist()
    counts = global_counts(counts.to(device)).cpu()
    skipped = not (math.isfinite(ce) and math.isfinite(mtp) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        if gamma > 0 and len(counts):
            update_bias(model, counts, gamma)
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    return StepResult(ce=ce, mtp=mtp, balance=bal, grad_norm=grad_norm, counts=counts, skipped=skipped)
