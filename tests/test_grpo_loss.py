"""GRPO loss and advantages against values computed by hand (plain Python, one token at a time)."""

import math

import pytest
import torch

from nanoseek.rl import group_advantages, grpo_loss

# Two completions (N=2), T=3 tokens; the second completion has 2 real tokens.
LOGP = [[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]]
OLD = [[-1.3, -0.5, -1.5], [-0.1, -1.9, -3.0]]
REF = [[-1.1, -0.7, -2.2], [-0.4, -1.0, -1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.5, -0.8]


def by_hand(loss_type, eps=0.2, eps_high=None, beta=0.0, level="token", max_len=None, total=None):
    """The per-token formula and the four aggregations, written out with floats."""
    eps_high = eps if eps_high is None else eps_high
    per_token, lengths = [], []
    for i in range(2):
        n = sum(MASK[i])
        lengths.append(n)
        seq_ratio = math.exp(sum(LOGP[i][t] - OLD[i][t] for t in range(n)) / n)
        row = []
        for t in range(n):
            ratio = seq_ratio if level == "sequence" else math.exp(LOGP[i][t] - OLD[i][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            loss = -min(ratio * ADV[i], clipped * ADV[i])
            d = REF[i][t] - LOGP[i][t]
            loss += beta * (math.exp(d) - d - 1)
            row.append(loss)
        per_token.append(row)
    if loss_type == "grpo":
        return sum(sum(r) / n for r, n in zip(per_token, lengths)) / 2
    if loss_type == "bnpo":
        return sum(map(sum, per_token)) / sum(lengths)
    if loss_type == "dr_grpo":
        return sum(map(sum, per_token)) / (2 * (max_len or 3))
    return sum(map(sum, per_token)) / (total or sum(lengths))


def tensors():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return t(LOGP).requires_grad_(), t(OLD), t(REF), t(ADV), t(MASK)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_hand_computation(loss_type, level, beta):
    logp, old, ref, adv, mask = tensors()
    kw = dict(epsilon=0.2, epsilon_high=0.28, beta=beta, loss_type=loss_type, importance_sampling_level=level)
    extra = {"max_completion_length": 8} if loss_type == "dr_grpo" else {}
    if loss_type == "dapo":
        extra = {"num_items_in_batch": 11}  # the whole generation batch's tokens, not this minibatch's 5
    loss, _ = grpo_loss(logp, old, ref if beta else None, adv, mask, **kw, **extra)
    want = by_hand(loss_type, 0.2, 0.28, beta, level, max_len=8, total=11)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_both_clip_bounds_bind():
    """Token (0,0): ratio e^0.3 = 1.35 > 1+0.28 with A > 0 -> clipped (no gradient); token (0,2):
    ratio e^-0.5 = 0.61 < 0.8 with A > 0 -> not clipped (min keeps the smaller); token (1,1): ratio
    e^0.4 = 1.49 with A < 0 -> unclipped branch; token (1,0): ratio e^-0.1 = 0.905, A < 0 -> inside."""
    logp, old, _, adv, mask = tensors()
    loss, stats = grpo_loss(logp, old, None, adv, mask, epsilon=0.2, epsilon_high=0.28, loss_type="bnpo")
    loss.backward()
    g = logp.grad
    assert g[0, 0] == 0  # clipped above: the gradient stops
    assert g[0, 1] != 0 and g[0, 2] != 0 and g[1, 0] != 0 and g[1, 1] != 0
    assert g[1, 2] == 0  # padding
    assert stats["clip_ratio/high_mean"] == pytest.approx(1 / 5)
    assert stats["clip_ratio/low_mean"] == 0.0
    # a negative advantage with a ratio below 1 - eps is the low clip
    adv2 = torch.tensor([1.5, -0.8], dtype=torch.float64)
    old2 = torch.tensor(OLD, dtype=torch.float64)
    old2[1, 0] = 0.5  # ratio e^-0.7 = 0.50 < 0.8 with A < 0
    lp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    loss, stats = grpo_loss(lp, old2, None, adv2, mask, epsilon=0.2, loss_type="bnpo")
    loss.backward()
    assert lp.grad[1, 0] == 0 and stats["clip_ratio/low_mean"] == pytest.approx(1 / 5)
    # symmetric epsilon: the high clip at 1.2 binds for token (0,0) too; epsilon_high=2 frees it
    lp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    grpo_loss(lp, old, None, adv, mask, epsilon=0.2, epsilon_high=2.0, loss_type="bnpo")[0].backward()
    assert lp.grad[0, 0] != 0


def test_kl_is_k3_and_reported():
    logp, old, ref, adv, mask = tensors()
    _, stats = grpo_loss(logp, old, ref, adv, mask, beta=0.1)
    ks = [math.exp(REF[i][t] - LOGP[i][t]) - (REF[i][t] - LOGP[i][t]) - 1 for i in range(2) for t in range(3)
          if MASK[i][t]]
    assert stats["kl"] == pytest.approx(sum(ks) / len(ks))
    assert min(ks) >= 0


def test_gradients_reach_only_the_policy():
    logp, old, ref, adv, mask = tensors()
    old.requires_grad_()
    ref.requires_grad_()
    adv.requires_grad_()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1)
    loss.backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and ref.grad is None and adv.grad is None


def test_first_pass_ratio_is_exactly_one():
    """mu = 1: old log-probs are the policy's own (detached), so every ratio is exactly 1, nothing is
    clipped and the loss is -mean(A) weighted by the aggregation."""
    logp, _, _, adv, mask = tensors()
    loss, stats = grpo_loss(logp, logp.detach(), None, adv, mask, loss_type="grpo")
    assert stats["ratio_mean"] == 1.0 and stats["clip_ratio/region_mean"] == 0.0
    assert loss.item() == pytest.approx(-(1.5 - 0.8) / 2, abs=1e-15)
    loss.backward()
    # d loss / d logp = -A / (len * N) for each counted token
    assert logp.grad[0, 0].item() == pytest.approx(-1.5 / 3 / 2)
    assert logp.grad[1, 1].item() == pytest.approx(0.8 / 2 / 2)


def test_bad_arguments():
    logp, old, _, adv, mask = tensors()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logp, old, None, adv, mask, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1], [0.3, 0.7, 0.7, 0.7]])
    a = group_advantages(r)
    std0 = math.sqrt(sum((x - 0.5) ** 2 for x in [1, 0, 0, 1]) / 3)  # unbiased
    assert a[0].tolist() == pytest.approx([0.5 / (std0 + 1e-4), -0.5 / (std0 + 1e-4)] * 1 + [-0.5 / (std0 + 1e-4),
                                                                                         0.5 / (std0 + 1e-4)])
    assert (a[1] == 0).all()  # all equal: exactly 0, even though 0.1 is not exact in binary
    assert not torch.isnan(a).any()
    m = (0.3 + 2.1) / 4
    s = math.sqrt(((0.3 - m) ** 2 + 3 * (0.7 - m) ** 2) / 3)
    assert a[2, 0].item() == pytest.approx((0.3 - m) / (s + 1e-4), rel=1e-5)
    unscaled = group_advantages(r, scale_rewards=False)
    assert unscaled[2].tolist() == pytest.approx([0.3 - m, 0.7 - m, 0.7 - m, 0.7 - m], rel=1e-5)
    assert (unscaled[1] == 0).all()
    assert group_advantages(r, scale_rewards="none").equal(unscaled)
    assert group_advantages(r, scale_rewards="group").equal(a)
    batch = group_advantages(r, scale_rewards="batch")
    assert batch[0, 0].item() == pytest.approx(0.5 / (r.std().item() + 1e-4), rel=1e-5)
    assert (batch[1] == 0).all()
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError):
        group_advantages(r, scale_rewards="yes")
