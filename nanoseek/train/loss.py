"""The pre-training objective and the validation loss.

    L = CE(next token) + λ · mean_k CE_k(MTP depth k)  + α_seq · L_seq-balance + α_aux · L_aux

`model.run(ids, mtp=True)` gives the main logits [B, T, V] (predict targets[:, :]) and, for each
MTP depth k, logits [B, T-k, V] that predict targets[:, k:] (the token k+1 places ahead of each
input). The balance terms come from the routers' affinities (see balance.py); α = 0 skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.model import Transformer

from .balance import balance_loss, expert_counts


@dataclass
class LossParts:
    """total: the scalar to backpropagate; ce / mtp / balance: detached parts (mtp = mean over
    depths, 0 without MTP); counts: tokens per expert [L, E] for the balancing bias and metrics."""

    total: torch.Tensor
    ce: torch.Tensor
    mtp: torch.Tensor
    balance: torch.Tensor
    counts: torch.Tensor


def training_loss(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, mtp_lambda: float,
                  seq_alpha: float = 0.0, aux_alpha: float = 0.0) -> LossParts:
    """inputs, targets LongTensor[B, T] -> LossParts. CE in fp32 whatever the compute dtype."""
    B = inputs.shape[0]
    use_mtp = mtp_lambda > 0 and len(model.mtp) > 0
    out = model.run(inputs, mtp=use_mtp)
    ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    total = ce
    mtp = torch.zeros((), device=ce.device)
    if out.mtp_logits:
        mtp = torch.stack([F.cross_entropy(lg.float().flatten(0, 1), targets[:, k:].flatten())
                           for k, lg in enumerate(out.mtp_logits, start=1)]).mean()
        total = total + mtp_lambda * mtp
    balance = torch.zeros((), device=ce.device)
    top_k = model.args.num_experts_per_tok
    if seq_alpha > 0:
        term = balance_loss(out.routing, B, top_k, per_sequence=True)
        balance = balance + seq_alpha * term
    if aux_alpha > 0:
        term = balance_loss(out.routing, B, top_k, per_sequence=False)
        balance = balance + aux_alpha * term
    if seq_alpha > 0 or aux_alpha > 0:
        total = total + balance
    counts = expert_counts(out.routing, model.args.n_routed_experts)
    return LossParts(total=total, ce=ce.detach(), mtp=mtp.detach(), balance=balance.detach(), counts=counts)


@torch.no_grad()
def evaluate(model: Transformer, batches, autocast=None) -> tuple[float, torch.Tensor]:
    """Mean next-token loss (nats/token) over `batches` of (inputs [b, T], targets [b, T]), and the
    expert counts [L, E] summed over them (main layers only: MTP does not run at evaluation).

    autocast: an optional context-manager factory (bf16 on GPU)."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    total, count, counts = 0.0, 0, None
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        if autocast is not None:
            with autocast():
                out = model.run(inputs)
        else:
            out = model.run(inputs)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
        total += loss.item()
        count += targets.numel()
        c = expert_counts(out.routing, model.args.n_routed_experts)
        counts = c if counts is None else counts + c
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate() got no batches")
    return total / count, counts
