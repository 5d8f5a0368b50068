"""Pre-training: schedules, balancing, losses, checkpoints and end-to-end `nanoseek train` runs on a
tiny prepared corpus (a slice of the Python stdlib) with a model of a few thousand parameters."""

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek.data import Tokenizer, train_bpe
from nanoseek.model import Transformer, preset
from nanoseek.stages import prepare
from nanoseek.stages import train as train_stage
from nanoseek.train.balance import balance_loss, expert_counts, max_vio, moe_gates, update_bias
from nanoseek.train.loss import training_loss
from nanoseek.train.metrics import read_jsonl
from nanoseek.train.schedule import Schedule
from nanoseek.train.state import latest_checkpoint, load_trainer_state, save_checkpoint

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
             num_nextn_predict_layers=1, initializer_range=0.05)
SETS = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
FAST = ["--batch-size", "4", "--batch-start", "4", "--eval-batches", "2", "--samples", "0", "--quiet",
        "--warmup-steps", "5", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare.main(["--out", str(out), "--max-bytes", "400000", "--vocab-size", "384", "--seq-len", "32",
                  "--val-fraction", "0.1"])
    return out


def run(data, out, *flags):
    return train_stage.main(["--data", str(data), "--out", str(out), *SETS, *FAST, *flags])


def train_losses(out):
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


# --- unit -----------------------------------------------------------------------------------------
def test_schedule_has_v3_shape():
    s = Schedule(total_tokens=1000, lr=1.0, warmup_steps=10, batch_size=16, batch_start=4, batch_ramp=0.1,
                 micro_batch=4)
    assert s.lr_at(0, 0) == pytest.approx(0.1) and s.lr_at(9, 50) == 1.0  # warm-up over steps
    assert s.lr_at(100, 600) == 1.0  # constant until 10T/14.8T
    assert 0.1 < s.lr_at(100, 800) < 1.0  # cosine
    assert s.lr_at(100, 970) == pytest.approx(0.1) and s.lr_at(100, 995) == pytest.approx(7.3e-6 / 2.2e-4)
    assert [s.batch_at(t) for t in (0, 50, 100, 900)] == [4, 8, 16, 16]  # ramp in whole micro-batches
    assert s.mtp_lambda_at(0) == 0.3 and s.mtp_lambda_at(700) == 0.1
    assert s.gamma_at(0) == 0.001 and s.gamma_at(990) == 0.0


def test_balance_loss_is_one_when_balanced_and_has_gradient():
    from nanoseek.model import Routing

    E, K, B, T = 4, 2, 2, 4
    # every token picks experts (0,1) or (2,3) alternately, scores uniform: f_i = 1, P_i = 1/E
    idx = torch.tensor([[0, 1], [2, 3]] * (B * T // 2))
    scores = torch.full((B * T, E), 0.5, requires_grad=True)
    loss = balance_loss([Routing(idx, scores)], B, K)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert scores.grad is not None
    # all tokens on experts 0 and 1 with high scores there: imbalanced, larger loss
    skew = torch.tensor([[0.9, 0.9, 0.1, 0.1]]).repeat(B * T, 1)
    assert balance_loss([Routing(torch.tensor([[0, 1]] * (B * T)), skew)], B, K).item() > 1.5
    assert max_vio(torch.tensor([[10.0, 10, 10, 10], [40, 0, 0, 0]])).tolist() == [0.0, 3.0]


def test_bias_update_moves_load_towards_balance():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **SMALL)).eval()
    gates = moe_gates(model)
    assert len(gates) == 2  # one main MoE layer + the MTP layer
    for g in gates:  # start badly skewed: experts 0 and 1 take nearly every token
        g.e_score_correction_bias.copy_(torch.tensor([0.3, 0.2, 0.0, 0.0]))
    ids = torch.randint(0, model.args.vocab_size, (4, 32))

    def counts():
        with torch.no_grad():
            return expert_counts(model.run(ids, mtp=True).routing, model.args.n_routed_experts)

    before = max_vio(counts())
    for _ in range(60):
        update_bias(model, counts(), gamma=0.01)
    after = max_vio(counts())
    assert (after < before).all() and after.max() < 0.5 * before.min()
    assert gates[0].e_score_correction_bias[0] < 0.3 - 0.1  # the overloaded expert was pushed down
    # a forward without MTP (--mtp-lambda 0) counts the main layers only: their biases move, MTP's stay
    mtp_bias = gates[1].e_score_correction_bias.clone()
    main_only = expert_counts(model.run(ids).routing, model.args.n_routed_experts)
    update_bias(model, main_only, gamma=0.01)
    assert torch.equal(gates[1].e_score_correction_bias, mtp_bias)
    with pytest.raises(ValueError, match="counts cover 3 MoE layers"):
        update_bias(model, torch.zeros(3, model.args.n_routed_experts), gamma=0.01)


def test_training_loss_has_finite_mtp_term():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **SMALL))
    ids = torch.randint(0, model.args.vocab_size, (2, 17))
    parts = training_loss(model, ids[:, :-1], ids[:, 1:], mtp_lambda=0.3, seq_alpha=1e-4)
    assert math.isfinite(parts.mtp.item()) and parts.mtp.item() > 0
    assert parts.total.item() == pytest.approx(parts.ce.item() + 0.3 * parts.mtp.item() + parts.balance.item())
    assert parts.counts.shape == (2, 4) and parts.counts.sum().item() == 2 * 2 * (16 + 15)
    parts.total.backward()
    assert all(p.grad is not None for p in model.mtp.parameters())


def test_training_loss_equals_independent_cross_entropies():
    """L = CE(next token) + λ · mean_k CE_k, where MTP depth k at input position i is trained on the
    token k + 1 places ahead, ids[i + k + 1] (SPEC §1), written out here from the raw ids to fp32
    precision with two depths (so a sum over depths, or depth k trained on the next token, shows)."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **{**SMALL, "num_nextn_predict_layers": 2}))
    B, T = 3, 12
    ids = torch.randint(0, model.args.vocab_size, (B, T + 1))
    parts = training_loss(model, ids[:, :-1], ids[:, 1:], mtp_lambda=0.3)
    with torch.no_grad():
        out = model.run(ids[:, :-1], mtp=True)
    ce = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
    depth_ce = []
    for k, logits in enumerate(out.mtp_logits, start=1):
        assert logits.shape[1] == T - k
        target = torch.stack([ids[:, i + k + 1] for i in range(T - k)], dim=1)
        depth_ce.append(F.cross_entropy(logits.flatten(0, 1), target.flatten()))
    assert parts.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts.mtp.item() == pytest.approx(sum(depth_ce).item() / 2, rel=1e-5)
    assert parts.total.item() == pytest.approx(ce.item() + 0.3 * sum(depth_ce).item() / 2, rel=1e-5)


def f_p(indices, scores, E, K):
    """Σ_i f_i P_i over one group of tokens (SPEC §1), with explicit loops over experts."""
    T = indices.shape[0]
    total = 0.0
    for i in range(E):
        f = E / (K * T) * (indices == i).any(dim=-1).sum().item()
        P = (scores[:, i] / scores.sum(dim=-1)).mean().item()
        total += f * P
    return total


def test_sequence_wise_and_batch_wide_balance_losses_differ_by_the_known_factor():
    """Two sequences with opposite routing: each alone is fully imbalanced (all tokens on experts
    {0,1}, or all on {2,3}), the batch as a whole is perfectly balanced. With the chosen experts'
    scores a and the others' b: sequence-wise L = 2a/(a+b) per layer, batch-wide L = 1."""
    from nanoseek.model import Routing

    E, K, B, T, a, b = 4, 2, 2, 6, 0.9, 0.1
    idx = torch.tensor([[0, 1]] * T + [[2, 3]] * T)
    scores = torch.tensor([[a, a, b, b]] * T + [[b, b, a, a]] * T)
    routing = [Routing(idx, scores), Routing(idx, scores)]  # two layers: the losses add up
    assert balance_loss(routing, B, K, per_sequence=True).item() == pytest.approx(2 * 2 * a / (a + b))
    assert balance_loss(routing, B, K, per_sequence=False).item() == pytest.approx(2 * 1.0)


def test_training_loss_balance_terms_use_the_model_routing():
    """parts.balance = α_seq · (mean over sequences of Σ f·P) + α_aux · (Σ f·P over the whole batch),
    summed over MoE layers (the MTP layer's rows included), computed here with explicit loops."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **SMALL))
    B, T = 3, 10
    ids = torch.randint(0, model.args.vocab_size, (B, T + 1))
    with torch.no_grad():
        routing = model.run(ids[:, :-1], mtp=True).routing
    E, K = model.args.n_routed_experts, model.args.num_experts_per_tok
    seq = sum(sum(f_p(r.indices.view(B, -1, K)[s], r.scores.view(B, -1, E)[s], E, K) for s in range(B)) / B
              for r in routing)
    batch = sum(f_p(r.indices, r.scores, E, K) for r in routing)
    assert abs(seq - batch) > 1e-3  # random routing: the two differ, so a swapped flag shows
    for seq_alpha, aux_alpha in ((0.5, 0.0), (0.0, 0.25), (0.5, 0.25)):
        parts = training_loss(model, ids[:, :-1], ids[:, 1:], 0.3, seq_alpha=seq_alpha, aux_alpha=aux_alpha)
        assert parts.balance.item() == pytest.approx(seq_alpha * seq + aux_alpha * batch, rel=1e-5)
        assert parts.total.item() == pytest.approx(parts.ce.item() + 0.3 * parts.mtp.item() + parts.balance.item(),
                                                   rel=1e-6)


def test_checkpoint_roundtrip_is_atomic_and_keeps_last(tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **SMALL))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.args.vocab_size, (2, 9))
    training_loss(model, ids[:, :-1], ids[:, 1:], 0.3).total.backward()
    opt.step()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, {"step": step}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000002", "step-000003"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000003"
    loaded = Transformer.from_pretrained(ckpt)
    opt2 = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    assert load_trainer_state(ckpt, loaded, opt2)["step"] == 3
    for (n, p), (_, q) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), n
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key]), (n, key)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


# --- end to end -----------------------------------------------------------------------------------
def test_train_loss_falls_and_reports(data, tmp_path):
    assert run(data, tmp_path, "--steps", "40", "--eval-every", "20") == 0
    losses = train_losses(tmp_path)
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    assert all(r["mtp_loss"] is not None and math.isfinite(r["mtp_loss"]) for r in train)
    assert len(train[-1]["maxvio"]) == 2 and len(train[-1]["load"][0]) == 4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    assert summary["final_val_bpb"] < summary["initial_val_bpb"]
    assert (tmp_path / "report.md").exists() and (tmp_path / "loss.png").exists()
    assert (tmp_path / "expert_load.png").exists() and (tmp_path / "maxvio.png").exists()


def test_resume_gives_bitwise_identical_losses(data, tmp_path):
    # a batch ramp, gradient accumulation, MTP, bias updates and the sequence loss all in play
    flags = ["--steps", "12", "--batch-size", "4", "--micro-batch", "2", "--batch-start", "2", "--batch-ramp", "0.3",
             "--eval-every", "5"]
    assert run(data, tmp_path / "full", *flags) == 0
    assert run(data, tmp_path / "split", *flags, "--stop-at", "5", "--save-every", "3") == 0
    assert latest_checkpoint(tmp_path / "split" / "checkpoints").name == "step-000005"
    assert train_stage.main(["--out", str(tmp_path / "split"), "--resume"]) == 0  # settings come from the run
    full, split = train_losses(tmp_path / "full"), train_losses(tmp_path / "split")
    assert len(full) > 12  # the ramp added steps
    assert full == split  # exact float equality, step for step
    a = Transformer.from_pretrained(latest_checkpoint(tmp_path / "full" / "checkpoints"))
    b = Transformer.from_pretrained(latest_checkpoint(tmp_path / "split" / "checkpoints"))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_checkpoint_loads_in_transformers(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert run(data, tmp_path, "--steps", "3") == 0
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    ours = Transformer.from_pretrained(ckpt)
    assert any(g.e_score_correction_bias.abs().sum() > 0 for g in moe_gates(ours))  # biases moved and were saved
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.args.vocab_size, (2, 24))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    text = "def f(x):\n    return x + 1\n"
    assert hf_tok.encode(text, add_special_tokens=False) == Tokenizer.from_dir(ckpt).encode(text)


def test_mismatched_tokenizer_is_a_clear_error(data, tmp_path, capsys):
    other = train_bpe(["completely different text " * 50, "another document here " * 50], vocab_size=300)
    other.save(tmp_path / "other_tok")
    assert run(data, tmp_path / "a", "--steps", "2", "--tokenizer", str(tmp_path / "other_tok")) == 2
    assert "tokenizer mismatch" in capsys.readouterr().err
    assert run(data, tmp_path / "b", "--steps", "2", "--set", "vocab_size=100") == 2
    assert "vocab mismatch" in capsys.readouterr().err


def test_linear_cross_entropy_matches_plain_loss_and_gradients():
    from nanoseek.train.loss import linear_cross_entropy

    h = torch.randn(700, 16, requires_grad=True)  # several chunks, the last one ragged
    w = torch.randn(5000, 16).mul_(0.1).requires_grad_()
    t = torch.randint(0, 5000, (700,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    (2 * ref).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    fused = linear_cross_entropy(h, w, t)
    (2 * fused).backward()
    assert fused.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(h.grad, gh, atol=1e-7) and torch.allclose(w.grad, gw, atol=1e-7)


def poison_steps(monkeypatch, bad_calls):
    """Make training_loss non-finite on the given (0-based) calls, as a diverging run would."""
    real, calls = train_stage.training_loss, []

    def loss(*args, **kwargs):
        parts = real(*args, **kwargs)
        if len(calls) in bad_calls:
            parts.total, parts.ce = parts.total * float("nan"), parts.ce * float("nan")
        calls.append(1)
        return parts

    monkeypatch.setattr(train_stage, "training_loss", loss)


def test_non_finite_steps_are_skipped_and_counted(data, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3, 4})
    assert run(data, tmp_path, "--steps", "8") == 0
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [False] * 3 + [True] * 2 + [False] * 3
    assert all(math.isfinite(r["loss"]) for r in train if not r["skipped"])
    assert json.loads((tmp_path / "summary.json").read_text())["nonfinite_steps"] == 2
    model = Transformer.from_pretrained(latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_many_non_finite_steps_stop_with_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, set(range(4, 100)))
    assert run(data, tmp_path, "--steps", "20", "--save-every", "2", "--max-nonfinite", "3") == 2
    assert "3 non-finite steps in a row at step 7" in capsys.readouterr().err
    # steps 5-7 were skipped: the step-6 checkpoint holds exactly the step-4 weights, all finite
    ckpt = latest_checkpoint(tmp_path / "checkpoints")
    assert ckpt.name == "step-000006"
    last, good = Transformer.from_pretrained(ckpt), Transformer.from_pretrained(ckpt.parent / "step-000004")
    for (n, p), q in zip(last.state_dict().items(), good.state_dict().values()):
        assert torch.equal(p, q) and torch.isfinite(p).all(), n


# --- budgets: --tokens and --max-minutes ------------------------------------------------------------
def test_tokens_budget_sets_the_steps_and_the_schedule(data, tmp_path):
    """--tokens 1300 at 4 × 32 = 128 tokens per step (no batch ramp): 11 steps, the last one crossing
    the budget, and the learning-rate schedule runs its whole course over those tokens (the last
    step is past the cosine decay, at a tenth of the peak)."""
    assert run(data, tmp_path, "--tokens", "1300", "--eval-every", "0", "--warmup-steps", "2") == 0
    train = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["tokens"] for r in train] == [128 * i for i in range(1, 12)]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["steps"], summary["tokens"], summary["stop_reason"]) == (11, 1408, "done")
    lrs = [r["lr"] for r in train]
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] == pytest.approx(0.1 * 1e-2)  # V3's 2.2e-5 / 2.2e-4


def test_max_minutes_budget_from_measured_speed(monkeypatch):
    """--max-minutes alone: the token budget is the measured training speed times the minutes left
    (in seconds), less a margin. A fake clock makes every forward+backward take 0.5 s."""
    import argparse

    clock = iter(0.5 * i for i in range(1000))  # each read 0.5 s after the previous one
    monkeypatch.setattr(train_stage.time, "perf_counter", lambda: next(clock))
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **SMALL))
    a = argparse.Namespace(seed=0, micro_batch=2, max_minutes=10.0, mtp_lambda=0.3, seq_alpha=1e-4, aux_alpha=0.0,
                           batch_size=4)
    total = train_stage.budget_from_minutes(a, model, 16, torch.device("cpu"), contextlib.nullcontext, 0.0)
    rate = 2 * 16 / 0.5  # tokens per second
    assert 0.85 * rate * 600 < total <= rate * 600
    assert all(p.grad is None for p in model.parameters())  # the measurement leaves no gradients behind


def test_max_minutes_stops_a_longer_budget_and_alone_still_finishes(data, tmp_path):
    """A time limit over a step budget stops the run at the limit (checkpoint, report, the reason in
    the summary); --max-minutes alone plans a budget and finishes."""
    assert run(data, tmp_path / "capped", "--steps", "100000", "--max-minutes", "0.02", "--eval-every", "0") == 0
    summary = json.loads((tmp_path / "capped" / "summary.json").read_text())
    assert 1 <= summary["steps"] < 100000 and "--max-minutes 0.02 reached" in summary["stop_reason"]
    assert latest_checkpoint(tmp_path / "capped" / "checkpoints").name == f"step-{summary['steps']:06d}"
    # the limit is checked after every step: the steps before the last one all ended within it
    seconds = [r["batch"] * 32 / r["tok_per_s"] for r in read_jsonl(tmp_path / "capped" / "metrics.jsonl")
               if r["kind"] == "train"]
    assert sum(seconds[:-1]) <= 0.02 * 60
    assert run(data, tmp_path / "alone", "--max-minutes", "0.02", "--eval-every", "0") == 0
    summary = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert summary["steps"] >= 1 and (tmp_path / "alone" / "report.md").exists()


# --- benchmarks: smoke runs (figures are produced, not checked) ---------------------------------------
def test_bench_train_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    from nanoseek.bench import train as bench_train

    out = tmp_path / "train.jsonl"
    assert bench_train.main(["--set", "num_hidden_layers=2", "--batch-size", "2", "--seq-len", "16", "--rounds", "1",
                             "--steps", "1", "--out", str(out)]) == 0
    assert "nanoseek / transformers" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert set(record["rows"]) == {"nanoseek", "transformers", "nanoseek +MTP +balance"}
    assert all(r["tok_per_s"] > 0 and r["step_ms"] > 0 for r in record["rows"].values()) and record["ratio"] > 0


def test_bench_balance_smoke(data, tmp_path, capsys):
    from nanoseek.bench import balance as bench_balance

    sets = [x for k, v in SMALL.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    # two of the three arms (each is a `nanoseek train` process; "none" only differs in its flags)
    assert bench_balance.main(["--data", str(data), "--out", str(tmp_path), "--steps", "2", "--batch-size", "2",
                               "--arms", "aux-loss", "loss-free", *sets]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ablation.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["aux-loss", "loss-free"] and all(r["steps"] == 2 for r in rows)
    assert all(math.isfinite(r["maxvio_batch"]) and math.isfinite(r["val_loss"]) for r in rows)
    assert "| loss-free |" in (tmp_path / "ablation.md").read_text() and "aux-loss" in capsys.readouterr().out
    # each arm really ran its recipe: the aux arm logs the batch-wide loss (α = 0.01, so ~0.01 per
    # MoE layer), and only the loss-free arm moved the balancing biases
    aux = [r["balance_loss"] for r in read_jsonl(tmp_path / "aux-loss" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(0.005 < b < 0.1 for b in aux)
    for arm, moved in (("aux-loss", False), ("loss-free", True)):
        model = Transformer.from_pretrained(latest_checkpoint(tmp_path / arm / "checkpoints"))
        assert any(g.e_score_correction_bias.abs().sum() > 0 for g in moe_gates(model)) == moved, arm
