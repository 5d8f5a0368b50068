"""The pre-training objective and the validation loss.

    L = CE(next token) + λ · mean_k CE_k(MTP depth k)  + α_seq · L_seq-balance + α_aux · L_aux

`model.run(ids, mtp=True, logits=False)` gives the final hidden states [B, T, D] (they predict
targets[:, :]) and, for each MTP depth k, states [B, T-k, D] that predict targets[:, k:] (the token
k+1 places ahead of each input). The balance terms come from the routers' affinities (see
balance.py); α = 0 skips them.

The output head and the cross-entropy are fused (`linear_cross_entropy`): logits are made a chunk
of rows at a time and their gradient (softmax − one-hot) is taken on the spot, so the [B·T, V]
logits, their log-softmax and its gradient never exist in full. On CPU the head + loss is then
1.5-2x faster (the chunk stays in cache) and the memory for it drops from O(B·T·V) to O(chunk·V).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanoseek.model import Transformer

from .balance import balance_loss, expert_counts


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(h_n · Wᵀ, t_n), gradients computed in the forward pass, chunk rows at a time."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        # Under autocast the matmuls run in its dtype (bf16 on GPU); softmax and sums stay fp32.
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        with torch.autocast(dev, enabled=False):
            w = weight.to(cdt)
            n = h.shape[0]
            loss = torch.zeros((), device=h.device, dtype=torch.float32)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            for s in range(0, n, chunk):
                hc, tc = h[s : s + chunk].to(cdt), targets[s : s + chunk]
                logits = (hc @ w.T).float()
                rows = torch.arange(len(tc), device=logits.device)
                picked = logits[rows, tc]
                peak = logits.amax(dim=-1, keepdim=True)
                g = logits.sub_(peak).exp_()  # the softmax, built in place in the logits' memory
                total = g.sum(dim=-1, keepdim=True)
                loss += (total.log() + peak - picked[:, None]).sum()  # logsumexp - target logit
                g.div_(total)
                g[rows, tc] -= 1
                g = g.div_(n).to(cdt)
                grad_h[s : s + chunk] = g @ w
                if cdt == torch.float32:
                    grad_w.addmm_(g.T, hc)
                else:
                    grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weightᵀ. h [N, D], weight [V, D], targets LongTensor[N].

    Equal to F.cross_entropy(h @ weight.T, targets) (to float rounding), for training only: it does
    the backward's work in the forward, so call it only when a backward follows."""
    chunk = max(256, (1 << 21) // weight.shape[0])  # ~8 MB of fp32 logits per chunk
    return _LinearCrossEntropy.apply(h, weight, targets, chunk)


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
    """inputs, targets LongTensor[B, T] -> LossParts (for training: it must be backpropagated)."""
    B = inputs.shape[0]
    use_mtp = mtp_lambda > 0 and len(model.mtp) > 0
    out = model.run(inputs, mtp=use_mtp, logits=False)
    head = model.lm_head.weight
    ce = linear_cross_entropy(out.hidden.flatten(0, 1), head, targets.flatten())
    total = ce
    mtp = torch.zeros((), device=ce.device)
    if out.mtp_hidden:
        mtp = torch.stack([linear_cross_entropy(h.flatten(0, 1), head, targets[:, k:].flatten())
                           for k, h in enumerate(out.mtp_hidden, start=1)]).mean()
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


# --- supervised fine-tuning on packed conversations -----------------------------------------------
@dataclass
class SFTLossParts:
    """total: the scalar to backpropagate (sums divided by `normalizer`); ce_sum / mtp_sum: detached
    summed cross-entropies over the loss tokens (mtp: mean over depths of each depth's mean, times
    `tokens`); tokens: loss tokens in the batch; counts: tokens per expert [L, E]."""

    total: torch.Tensor
    ce_sum: torch.Tensor
    mtp_sum: torch.Tensor
    tokens: int
    counts: torch.Tensor


def sft_loss(model: Transformer, batch, mtp_lambda: float = 0.0, normalizer: float | None = None) -> SFTLossParts:
    """Masked next-token (+ MTP) loss of a `nanoseek.data.chat.PackedBatch` (for training: backpropagate it).

    Only targets where batch.loss_mask is True count (the assistant turns). Conversations packed in
    a row see only themselves (doc_ids) and restart their positions, so the summed loss of a packed
    batch is the sum of each conversation's own loss. MTP depth k predicts targets[:, k:] from
    position i; a target counts only if it is a loss token of the same conversation as position i.
    normalizer: what the sums are divided by in `total` (default: this batch's loss tokens; gradient
    accumulation passes the whole optimizer step's count).
    """
    use_mtp = mtp_lambda > 0 and len(model.mtp) > 0
    out = model.run(batch.inputs, positions=batch.positions, doc_ids=batch.doc_ids, mtp=use_mtp, logits=False)
    head = model.lm_head.weight
    keep = batch.loss_mask.flatten()
    n = int(keep.sum())
    normalizer = float(normalizer or max(n, 1))
    zero = out.hidden.sum() * 0.0  # keeps the graph connected when a micro-batch has nothing to learn
    ce_sum = zero + (linear_cross_entropy(out.hidden.flatten(0, 1)[keep], head, batch.targets.flatten()[keep]) * n
                     if n else 0.0)
    mtp_means = []
    for k, h in enumerate(out.mtp_hidden, start=1):
        valid = batch.loss_mask[:, k:] & (batch.doc_ids[:, k:] == batch.doc_ids[:, :-k])
        rows = valid.flatten()
        if rows.any():
            mtp_means.append(linear_cross_entropy(h.flatten(0, 1)[rows], head, batch.targets[:, k:].flatten()[rows]))
    mtp_sum = torch.stack(mtp_means).mean() * n if mtp_means else torch.zeros((), device=ce_sum.device)
    total = (ce_sum + mtp_lambda * mtp_sum) / normalizer
    counts = expert_counts(out.routing, model.args.n_routed_experts)
    return SFTLossParts(total=total, ce_sum=ce_sum.detach(), mtp_sum=mtp_sum.detach(), tokens=n, counts=counts)


@torch.no_grad()
def sft_evaluate(model: Transformer, batches, autocast=None) -> tuple[float, int]:
    """Mean next-token loss (nats/token) on the loss tokens of PackedBatches; returns (loss, tokens)."""
    was_training = model.training
    model.eval()
    device = model.embed_tokens.weight.device
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out = model.run(batch.inputs, positions=batch.positions, doc_ids=batch.doc_ids)
        keep = batch.loss_mask
        total += F.cross_entropy(out.logits[keep].float(), batch.targets[keep], reduction="sum").item()
        count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("sft_evaluate() got no loss tokens")
    return total / count, count
