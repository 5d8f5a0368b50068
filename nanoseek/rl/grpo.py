"""The GRPO objective (DeepSeekMath §4.1, DeepSeek-R1 §2.2.1) as two pure functions.

    adv = group_advantages(rewards, scale_rewards=True)        # [P, G] -> [P, G]
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv.flatten(), mask, beta=0.001)

For a question, G completions are sampled from the old policy and scored by rules; each
completion's advantage is its reward relative to its group's, so no critic is needed:

    A_i = (r_i - mean(r)) / std(r)
    per token:  -min(ρ_t A_i, clip(ρ_t, 1-ε_low, 1+ε_high) A_i) + β (π_ref/π_θ - log(π_ref/π_θ) - 1)

with ρ_t = π_θ(o_t)/π_old(o_t) and the KL term the k3 estimator (Schulman, "Approximating KL
divergence"), which is unbiased and never negative.

Design choices (names and meanings are TRL's `GRPOTrainer`, so a recipe written for it reads the same):
* `scale_rewards`: True / "group" divides by the group's std (unbiased, as torch.std and TRL), False /
  "none" does not (Dr. GRPO: the division favours groups that are nearly all right or all wrong),
  "batch" divides by the std of the whole batch. std + 1e-4 as TRL, so tiny spreads stay finite.
  A group whose rewards all agree carries no signal: its advantages are set to exactly 0, not to
  the float noise that r - mean(r) can leave.
* `loss_type` is only the aggregation of the per-token losses:
  "grpo"    mean over each sequence's tokens, then over sequences (the paper's 1/G Σ 1/|o_i| Σ_t);
            long wrong answers are penalised less per token than short ones;
  "bnpo"    mean over all tokens of this (mini)batch;
  "dr_grpo" sum / (N · max_completion_length): a constant normaliser, no length bias (Dr. GRPO);
  "dapo"    sum / the tokens of the whole generation batch (`num_items_in_batch`), so minibatches
            of one step add up to a token-level mean over all of it (DAPO §3.3).
* `epsilon_high` (DAPO's clip-higher): the upper clip bound may be wider than the lower one, which
  keeps low-probability tokens able to grow (entropy does not collapse as fast).
* `importance_sampling_level="sequence"` (GSPO): one ratio per sequence, exp(mean_t log ρ_t),
  broadcast to its tokens and clipped as a whole.
* Gradients flow only through `logp`: old and reference log-probs are detached here, whatever
  the caller passes, so a forgotten `no_grad` cannot leak a gradient into another model.

DeepSeek-V3.2's refinements (V3.2 report §3.1, "Scaling GRPO"), off by default:
* `unbiased_kl`: the k3 term multiplied by the token's importance ratio π_θ/π_old (with its
  gradient): ρ_t·(π_ref/π_θ − log(π_ref/π_θ) − 1). Its gradient is then exactly ρ_t ∇log π_θ ·
  (log π_θ − log π_ref), whose expectation under π_old is ∇KL(π_θ‖π_ref): unbiased however stale
  the rollouts are. Its value equals plain k3 wherever π_θ = π_old.
* `off_policy_delta` δ (off-policy sequence masking): a sequence with a negative advantage whose
  mean per-token log(π_rollout/π_θ) over its counted tokens exceeds δ leaves the loss (its mask row
  becomes 0). π_rollout is `rollout_logp` (the sampler's log-probs; default old_logp). Learning from
  one's own too-off-policy mistakes destabilises training; positive sequences are always kept.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IS_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's


def _scale_mode(scale_rewards) -> str:
    if scale_rewards is True or scale_rewards == "group":
        return "group"
    if scale_rewards is False or scale_rewards == "none":
        return "none"
    if scale_rewards == "batch":
        return "batch"
    raise ValueError(f"scale_rewards must be True/'group', False/'none' or 'batch', got {scale_rewards!r}")


def group_advantages(rewards: torch.Tensor, scale_rewards: bool | str = True) -> torch.Tensor:
    """rewards FloatTensor[P, G] (P prompts, G completions each) -> advantages FloatTensor[P, G].

    r - mean over the group, divided by (std + 1e-4) where std is the group's (scale_rewards True or
    "group") or the batch's ("batch"), or not divided (False or "none"). std is unbiased (G - 1), as
    TRL computes it. Groups whose rewards are all equal get exactly 0."""
    mode = _scale_mode(scale_rewards)
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, G] with G >= 2 completions per prompt, got {tuple(rewards.shape)}")
    r = rewards.float()
    adv = r - r.mean(dim=1, keepdim=True)
    if mode == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + STD_EPS)
    elif mode == "batch":
        adv = adv / (r.std() + STD_EPS)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              loss_type: str = "grpo", importance_sampling_level: str = "token",
              max_completion_length: int | None = None, num_items_in_batch: float | None = None,
              unbiased_kl: bool = False, off_policy_delta: float | None = None,
              rollout_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped policy-gradient loss with an optional k3 KL penalty, aggregated by `loss_type`.

    logp FloatTensor[N, T]: the policy's log-probs of the completion tokens (with grad);
    old_logp [N, T]: the same under the policy that sampled them; ref_logp [N, T] under the
    reference model (None allowed when beta == 0); advantages [N] one per completion;
    mask [N, T] 1 for completion tokens that count, 0 for padding (and masked completions).
    max_completion_length: the normaliser of "dr_grpo" (default: T). num_items_in_batch: the
    normaliser of "dapo", the counted tokens of the whole generation batch (default: mask.sum()).
    unbiased_kl, off_policy_delta, rollout_logp [N, T]: V3.2's refinements (module docstring).

    Returns (loss scalar, stats) with stats floats: kl (masked mean of the k3 term; 0 without a
    reference), clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (fraction of
    tokens, or of sequences for "sequence", whose ratio is clipped in the direction that stops
    the gradient), ratio_mean (masked mean of ρ) and off_policy_masked (share of sequences masked
    by off_policy_delta; 0 without it).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (the reference model's log-probs)")
    eps_low = epsilon
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.to(logp.dtype).detach()[:, None]  # [N, 1]
    masked = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    if off_policy_delta is not None:
        masked = off_policy_sequences(logp, old_logp if rollout_logp is None else rollout_logp, advantages, mask,
                                      off_policy_delta)
        mask = mask * (~masked).to(mask.dtype)[:, None]

    log_ratio = logp - old_logp.detach()
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # [N, 1]
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)  # [N, T] or [N, 1], broadcast by the mask below

    kl = None
    if ref_logp is not None:
        delta = ref_logp.detach() - logp
        kl = delta.exp() - delta - 1
        if unbiased_kl:  # × π_θ/π_old per token, gradient kept (see the module docstring)
            kl = (logp - old_logp.detach()).exp() * kl
        if beta != 0.0:
            per_token = per_token + beta * kl

    counted = per_token * mask
    if loss_type == "grpo":
        loss = (counted.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = counted.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = counted.sum() / (mask.shape[0] * length)
    else:  # dapo
        total = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
        loss = counted.sum() / total.clamp(min=1.0)

    with torch.no_grad():
        low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)

        def mean(x: torch.Tensor) -> float:
            if x.shape[1] == 1:  # one value per sequence
                return x.mean().item() if x.numel() else 0.0
            return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

        stats = {"kl": mean(kl) if kl is not None else 0.0, "clip_ratio/low_mean": mean(low),
                 "clip_ratio/high_mean": mean(high), "clip_ratio/region_mean": mean(torch.maximum(low, high)),
                 "ratio_mean": mean(ratio), "off_policy_masked": masked.float().mean().item() if len(masked) else 0.0}
    return loss, stats


def off_policy_sequences(logp: torch.Tensor, rollout_logp: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, delta: float) -> torch.Tensor:
    """V3.2's off-policy sequence mask -> BoolTensor[N], True for the sequences to drop: advantage < 0
    and mean over counted tokens of (rollout_logp - logp) > delta. All inputs [N, T] except advantages [N]."""
    with torch.no_grad():
        mask = mask.to(logp.dtype)
        div = ((rollout_logp.detach() - logp.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return (advantages.to(div.device) < 0) & (div > delta)
