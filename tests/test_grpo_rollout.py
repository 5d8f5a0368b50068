"""GRPO rollouts on the engine: recorded log-probs and routing, routing replay in the training forward."""

import pytest
import torch

from nanoseek.inference import Engine
from nanoseek.model import Transformer, preset
from nanoseek.rl.rollout import Batch, completion_logps, moe_gates, rollout

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=2,
            num_nextn_predict_layers=1, max_position_embeddings=128, vocab_size=64, initializer_range=0.2)
PROMPTS = [[1, 5, 9, 11], [2, 7], [3, 3, 3, 8, 9, 10, 4]]


def model():
    torch.manual_seed(0)
    return Transformer(preset("tiny", **TINY)).eval()


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_routing_replay_reproduces_rollout_logps(speculative):
    m = model()
    engine = Engine(m, max_batch_size=4, max_seq_len=32, speculative=speculative, record_routing=True)
    groups = rollout(engine, PROMPTS, G=3, max_new_tokens=10, temperature=1.0, seed=7)
    comps = [c for g in groups for c in g]
    assert len(comps) == 9 and all(1 <= len(c.tokens) <= 10 for c in comps)
    n_moe = len(moe_gates(m))
    for c in comps:
        assert c.routing.shape == (len(c.prompt) + len(c.tokens) - 1, n_moe, 2)
        assert len(c.logprobs) == len(c.tokens)
    batch = Batch.of(comps, routing=True)
    recorded = torch.zeros_like(batch.mask)
    for n, c in enumerate(comps):
        recorded[n, : len(c.logprobs)] = torch.tensor(c.logprobs)
    with torch.no_grad():
        replayed = completion_logps(m, batch)
        assert (replayed - recorded).abs().max() < 1e-4
        # the recorded routing is what the model chooses on its own too (same weights, fp32) ...
        free = completion_logps(m, batch, replay=False)
        assert (free - recorded).abs().max() < 1e-4
        # ... but move the selection-only balancing bias: the free forward now routes elsewhere and its
        # log-probs move, while the replayed one still reproduces the rollout exactly
        for gate in moe_gates(m):
            gate.e_score_correction_bias.copy_(torch.linspace(-5, 5, 8))
        assert (completion_logps(m, batch, replay=False) - recorded).abs().max() > 1e-2
        assert (completion_logps(m, batch) - recorded).abs().max() < 1e-4
    assert all(g.replay is None for g in moe_gates(m))


def test_rollouts_are_seeded_and_minibatches_trim():
    m = model()
    a = rollout(Engine(m, max_batch_size=2, max_seq_len=32, speculative=None), PROMPTS, G=2, max_new_tokens=6, seed=3)
    b = rollout(Engine(m, max_batch_size=5, max_seq_len=32, speculative=None), PROMPTS, G=2, max_new_tokens=6, seed=3)
    assert [[c.tokens for c in g] for g in a] == [[c.tokens for c in g] for g in b]
    comps = [c for g in a for c in g]
    batch = Batch.of(comps)
    with torch.no_grad():
        full = completion_logps(m, batch)
        part = completion_logps(m, batch.select([2, 3]))
    assert torch.allclose(full[[2, 3], : part.shape[1]], part, atol=1e-5)
    assert (full[batch.mask == 0] == 0).all()


def test_training_logps_carry_gradient_to_the_policy():
    m = model().train()
    engine = Engine(m, max_batch_size=4, max_seq_len=32, speculative=None)
    comps = [c for g in rollout(engine, PROMPTS[:2], G=2, max_new_tokens=5) for c in g]
    logp = completion_logps(m, Batch.of(comps))
    logp.sum().backward()
    assert m.lm_head.weight.grad is not None and m.layers[1].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_shared_prompt_prefill_equals_separate_prefills(speculative, monkeypatch):
    """The G samples of a prompt share one prefill (its cache rows, MTP state and routing copied):
    the same tokens, log-probs and routing as prefilling every request on its own."""
    m = model()

    def run(batch):
        engine = Engine(m, max_batch_size=batch, max_seq_len=32, speculative=speculative, record_routing=True)
        rows = []
        prefill = engine._prefill_group
        monkeypatch.setattr(engine, "_prefill_group", lambda group, row: rows.append(len(group)) or prefill(group, row))
        return [c for g in rollout(engine, PROMPTS, G=3, max_new_tokens=8, seed=5) for c in g], rows

    alone, rows_alone = run(1)
    shared, rows_shared = run(9)
    assert sum(rows_alone) == 9 and sum(rows_shared) == 3  # 3 distinct prompts computed once each
    assert [c.tokens for c in shared] == [c.tokens for c in alone]
    for a, b in zip(alone, shared):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
        assert torch.equal(a.routing, b.routing)
