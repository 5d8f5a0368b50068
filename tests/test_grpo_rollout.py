"""GRPO rollouts on the engine: recorded log-probs and routing, routing replay in the training forward."""

import pytest
import torch

from nanoseek.inference import Engine
from nanoseek.model import Transformer, preset
from nanoseek.rl.rollout import Batch, Completion, completion_logps, moe_gates, rollout

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


def test_prompts_computed_once_give_the_full_rows_logps_and_gradients():
    """The training forward computing each distinct prompt once (prompts of different lengths, one of a
    single token, uneven completions) gives every row's full-forward log-probs and every parameter's
    gradient; a minibatch keeps only its own prompts."""
    m = model().train()
    g = torch.Generator().manual_seed(1)
    prompts = PROMPTS + [[6]]
    comps = [Completion(p, torch.randint(0, 64, (int(n),), generator=g).tolist(), [], "length")
             for p in prompts for n in torch.randint(1, 9, (3,), generator=g)]
    batch = Batch.of(comps)
    assert batch.prefix.shape == (4, 6) and batch.prefix_of.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    weights = torch.linspace(-1, 1, batch.mask.numel()).view_as(batch.mask)

    def run(**kw):
        m.zero_grad()
        logp = completion_logps(m, batch, 0.7, **kw)
        (logp * weights).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (full, want), (shared, got) = run(shared=False), run()
    assert torch.allclose(shared, full, atol=1e-6) and (shared[batch.mask == 0] == 0).all()
    assert got.keys() == want.keys() and "layers.1.mlp.gate.weight" in got
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-5, rtol=1e-4), n
    sub = batch.select([4, 5, 9])  # prompts 1 and 3 only
    assert sub.prefix.shape == (2, 1) and sub.prefix_of.tolist() == [0, 0, 1]
    with torch.no_grad():
        assert torch.allclose(completion_logps(m, sub, 0.7), full[[4, 5, 9], : sub.mask.shape[1]], atol=1e-6)


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


def test_grouped_mm_custom_op_matches_aten():
    """The routed experts' fp32 grouped GEMM as a custom op (traceable by torch.compile): the values and
    both gradients of F.grouped_mm, an empty group included (its weight gradient exactly 0)."""
    import torch.nn.functional as F

    from nanoseek.model.moe import _cpu_grouped_mm

    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(3, 8, 16, requires_grad=True)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)  # group 1 is empty
    grad = torch.randn(10, 8)
    _cpu_grouped_mm(x, w, offsets).backward(grad)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    want = F.grouped_mm(x2, w2.transpose(1, 2), offs=offsets)
    want.backward(grad)
    assert torch.allclose(_cpu_grouped_mm(x, w, offsets), want, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(w.grad, w2.grad, atol=1e-5)
    assert (w.grad[1] == 0).all() and w.grad[0].abs().sum() > 0
    torch.library.opcheck(_cpu_grouped_mm, (x.detach(), w.detach(), offsets))


def test_compiled_rollouts_and_logps_match_eager(monkeypatch):
    """`nanoseek grpo`'s default: rollouts through the compiled decode step at a batch whose routed
    experts take the grouped GEMM (8 rows × 2 experts > 8 experts, the dense path turned off: one graph,
    no break) give the eager tokens and log-probs, and the compiled log-prob forward gives the eager
    log-probs and gradients."""
    from nanoseek.model import moe
    from nanoseek.rl.rollout import CompiledLogps

    monkeypatch.setattr(moe, "DENSE_EXTRA_FLOPS", 0.0)

    torch.manual_seed(0)  # one MoE layer: compiling costs seconds per layer
    m = Transformer(preset("tiny", **{**TINY, "num_hidden_layers": 1, "first_k_dense_replace": 0,
                                      "num_nextn_predict_layers": 0})).eval()
    eager = rollout(Engine(m, max_batch_size=8, max_seq_len=32, speculative=None, compile=False), PROMPTS[:2], G=4,
                    max_new_tokens=6, seed=1, ignore_eos=True)
    engine = Engine(m, max_batch_size=8, max_seq_len=32, speculative=None, compile=True)
    compiled = rollout(engine, PROMPTS[:2], G=4, max_new_tokens=6, seed=1, ignore_eos=True)  # 8 rows throughout
    assert engine.stats["compiled"]
    comps, want = [c for g in compiled for c in g], [c for g in eager for c in g]
    assert [c.tokens for c in comps] == [c.tokens for c in want]
    assert torch.allclose(torch.tensor([x for c in comps for x in c.logprobs]),
                          torch.tensor([x for c in want for x in c.logprobs]), atol=1e-5)
    batch = Batch.of(comps)
    logps = CompiledLogps(torch.device("cpu"))
    m.train()
    got = completion_logps(m, batch, compiled=logps)
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    ref = completion_logps(m, batch)
    ref.sum().backward()
    assert logps.fn is not None and logps.compile_s > 0  # it did compile (no fallback)
    assert torch.allclose(got, ref, atol=1e-5)
    assert grads.keys() == {n for n, p in m.named_parameters() if p.grad is not None}
    for n, p in m.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-4, rtol=1e-3), n


def test_compiled_logps_fall_back_to_eager_with_one_line(monkeypatch, caplog):
    """No compiler: one logged line and the eager forward (same values)."""
    import nanoseek.rl.rollout as R

    monkeypatch.setattr(R, "unavailable", lambda device: "no C++ compiler found (test)")
    m = model()
    comps = [c for g in rollout(Engine(m, max_batch_size=4, max_seq_len=32, speculative=None), PROMPTS[:2], G=2,
                                max_new_tokens=4, seed=2) for c in g]
    with caplog.at_level("WARNING", logger="nanoseek"):
        logps = R.CompiledLogps(torch.device("cpu"))
    assert logps.fn is None and [r.getMessage() for r in caplog.records] == [
        "nanoseek: running the GRPO log-prob forward eagerly: no C++ compiler found (test)"]
    batch = Batch.of(comps)
    with torch.no_grad():
        assert torch.equal(completion_logps(m, batch, compiled=logps), completion_logps(m, batch))


def test_compiled_logps_auto_mode_pays_rent_before_compiling(monkeypatch, tmp_path):
    """The default (auto) runs eagerly until the eager update seconds reach the price of compiling:
    COLD_LOGPS_COMPILE_S with no record, the recorded cost of this shape's last compile otherwise; a
    step that compiled records its extra seconds over an eager step (the next run's price)."""
    import nanoseek.rl.rollout as R

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the record lives in the cache dir
    m = model()
    cold = R.CompiledLogps(torch.device("cpu"), m, "auto")
    assert cold.fn is None and cold.price == R.COLD_LOGPS_COMPILE_S
    cold.after_update(R.COLD_LOGPS_COMPILE_S / 2)
    assert cold.fn is None  # half the rent: still eager
    cold.after_update(R.COLD_LOGPS_COMPILE_S / 2)
    assert cold.fn is not None  # rent reached: compiled from the next update on
    monkeypatch.setattr(R, "compiled_graphs", lambda: 6)  # the next update compiled a graph (5 -> 6)
    cold._graphs = 5
    cold.after_update(R.COLD_LOGPS_COMPILE_S / 2 + 4.0)  # an eager step took COLD/2: compiling cost 4 s
    assert R.CompileRecord(m, tag="grpo-logps").compile_s == pytest.approx(4.0, abs=1e-3)
    warm = R.CompiledLogps(torch.device("cpu"), m, "auto")  # a second run of this shape here
    assert warm.price == pytest.approx(4.0, abs=1e-3) and warm.fn is None
    warm.after_update(4.5)
    assert warm.fn is not None
    assert R.CompiledLogps(torch.device("cpu"), m, "on").fn is not None
