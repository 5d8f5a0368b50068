"""Evaluation metrics against hand-computed values; `nanoseek eval` and `nanoseek sample` end to end
on a tiny random checkpoint; the rejection-sampling filters on crafted completions."""

import json
import math

import pytest

from nanoseek.cli import main as cli
from nanoseek.data import train_bpe
from nanoseek.eval import cons_at_k, majority, paired_difference, pass_at_k
from nanoseek.eval import runner
from nanoseek.eval.runner import Sample
from nanoseek.rl.tasks import arithmetic
from nanoseek.stages import init as init_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
            num_nextn_predict_layers=1, max_position_embeddings=512)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # fewer wrong samples than k: always a correct one
    # Chen et al.'s numerically stable form: 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    stable = 1 - math.prod(1 - 16 / i for i in range(64 - 8 + 1, 64 + 1))
    assert pass_at_k(64, 8, 16) == pytest.approx(stable, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_cons_at_k_votes_and_breaks_ties_by_first_seen():
    assert cons_at_k(["42", "41", "42", None], "42", 4) == 1.0
    assert cons_at_k(["41", "42"], "42", 2) == 0.0  # tie: the answer seen first wins
    assert cons_at_k(["42", "41"], "42", 2) == 1.0
    assert cons_at_k(["41", "42", "42"], "42", 1) == 0.0  # only the first k vote
    assert cons_at_k([None, None, "7"], "7", 3) == 1.0  # None does not vote
    assert cons_at_k([None, None], "7", 2) == 0.0
    assert cons_at_k(["42.0", "41", "42"], "42", 3) == 1.0  # equal after normalisation: one vote each
    assert majority(["1/2", "0.5", "3"]) == "1/2"


def test_paired_difference_hand_values():
    before = {"a": [1, 0, 0, 0], "b": [1, 1], "c": [0, 0, 0, 0]}
    after = {"a": [1, 1, 0, 0], "b": [1, 1, 1, 1], "c": [1, 0, 0, 0]}  # k may differ: means are per problem
    d = [0.25, 0.0, 0.25]
    m = sum(d) / 3
    se = math.sqrt(sum((x - m) ** 2 for x in d) / 2 / 3)
    r = paired_difference(before, after)
    assert r["delta"] == pytest.approx(m) and r["se"] == pytest.approx(se)
    assert (r["problems"], r["up"], r["down"]) == (3, 2, 0)
    assert r["before"] == pytest.approx((0.25 + 1 + 0) / 3) and r["after"] == pytest.approx((0.5 + 1 + 0.25) / 3)
    with pytest.raises(ValueError, match="different problems"):
        paired_difference(before, {"a": [1], "b": [1], "z": [0]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalmodel")
    texts = [f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}." for a in range(20) for b in range(5)]
    tok = train_bpe(texts, vocab_size=400)
    tok.save(root / "tok")
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert init_stage.main(["--preset", "tiny", "--out", str(root / "m"), *sets, "--set", f"vocab_size={tok.vocab_size}",
                            "--tokenizer", str(root / "tok")]) == 0
    return root / "m"


def test_eval_cli_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert cli(["eval", "--model", str(model_dir), "--task", "arithmetic", "--n", "3", "--k", "2",
                "--max-new-tokens", "6", "--out", str(out), "--quiet", "--digits", "2"]) == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 6 and {(r["problem"], r["sample"]) for r in rows} == {(i, j) for i in range(3) for j in range(2)}
    assert [r["reference"] for r in rows[::2]] == [p.answer for p in arithmetic(3, 0, "test", digits=2)]
    for key in ("pass@1", "pass@2", "cons@2", "format_rate", "mean_tokens", "completions_per_s"):
        assert key in summary
    assert 1 <= summary["mean_tokens"] <= 6
    assert "pass@1" in capsys.readouterr().out
    # greedy: one deterministic sample per problem, the same twice
    for name in ("g1", "g2"):
        assert cli(["eval", "--model", str(model_dir), "--task", "arithmetic", "--n", "2", "--greedy", "--max-new-tokens",
                    "5", "--out", str(tmp_path / name), "--quiet"]) == 0
    g1, g2 = ((tmp_path / n / "samples.jsonl").read_text() for n in ("g1", "g2"))
    assert g1 == g2 and len(g1.splitlines()) == 2
    # --baseline: paired against g1 (identical greedy samples: no change); other problems are refused
    capsys.readouterr()
    assert cli(["eval", "--model", str(model_dir), "--task", "arithmetic", "--n", "2", "--greedy", "--max-new-tokens",
                "5", "--out", str(tmp_path / "g3"), "--quiet", "--baseline", str(tmp_path / "g1")]) == 0
    v = json.loads((tmp_path / "g3" / "summary.json").read_text())["vs_baseline"]
    assert (v["problems"], v["delta"], v["up"], v["down"]) == (2, 0.0, 0, 0)
    assert "pass@1 vs baseline" in capsys.readouterr().out
    assert cli(["eval", "--model", str(model_dir), "--task", "arithmetic", "--n", "3", "--greedy", "--quiet",
                "--out", str(tmp_path / "g4"), "--baseline", str(tmp_path / "g1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "different problems" in err and len(err.splitlines()) == 1 and not (tmp_path / "g4").exists()


@pytest.mark.parametrize("flags, message", [
    (["--task", "algebra"], "unknown task"),
    (["--task", "arithmetic", "--k", "0"], "--k"),
    (["--task", "arithmetic", "--top-p", "0"], "--top-p"),
    (["--task", "missing.jsonl"], "cannot read"),
    (["--task", "arithmetic", "--ops", "+/"], "--ops"),
    (["--task", "arithmetic", "--digits", "1", "--n", "400"], "only 63 distinct test problems"),
    (["--task", "arithmetic", "--baseline", "/nonexistent/eval"], "no samples.jsonl there"),
])
def test_eval_cli_errors_are_one_line(model_dir, flags, message, capsys):
    assert cli(["eval", "--model", str(model_dir), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("nanoseek eval: error:")


def test_eval_cli_bad_model(tmp_path, capsys):
    assert cli(["eval", "--model", str(tmp_path / "nope"), "--task", "arithmetic", "--quiet"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_sample_filters(model_dir, tmp_path, monkeypatch, capsys):
    problems = arithmetic(2, seed=0, split="train", digits=2)
    good = [f"add them\n</think>\n\n\\boxed{{{p.answer}}}" for p in problems]
    fake = [
        [Sample([1] * 9, "<think>\n" + good[0] + " done", "stop"), Sample([1] * 5, good[0], "stop"), Sample([1] * 5, good[0], "stop"),
         Sample([1] * 4, "\\boxed{0}</think>", "stop"), Sample([1] * 3, good[0], "length"),
         Sample([1] * 6, f"\\boxed{{{problems[0].answer}}}", "stop")],  # right answer, no reasoning: format fails
        [Sample([1] * 4, "wrong\n</think>\n\\boxed{-1}", "stop")] * 6,
    ]
    monkeypatch.setattr(runner, "sample_problems", lambda *a, **k: fake)
    out = tmp_path / "traces.jsonl"
    assert cli(["sample", "--model", str(model_dir), "--task", "arithmetic", "--n", "2", "--k", "6", "--digits", "2",
                "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["messages"][1]["content"] for r in rows] == [f"\\boxed{{{problems[0].answer}}}",
                                                          f"\\boxed{{{problems[0].answer}}} done"]  # shorter first
    assert rows[0]["messages"][1]["reasoning_content"] == "add them"
    assert rows[0]["messages"][0] == {"role": "user", "content": problems[0].prompt}
    assert "kept 2 of 12" in capsys.readouterr().out
    assert cli(["sample", "--model", str(model_dir), "--task", "arithmetic", "--n", "2", "--k", "6", "--digits", "2",
                "--out", str(out), "--quiet", "--max-per-prompt", "1", "--no-dedupe"]) == 0
    assert len(out.read_text().splitlines()) == 1
    # the rows train: encode_chat accepts them
    from nanoseek.data import Tokenizer
    from nanoseek.data.chat import read_chat_jsonl

    convs, skipped = read_chat_jsonl(out, Tokenizer.from_dir(model_dir), max_len=256)
    assert len(convs) == 1 and skipped.count == 0


def test_sample_real_engine_and_worked(model_dir, tmp_path):
    out = tmp_path / "s.jsonl"
    # a random model never solves anything: the file is written, and empty
    assert cli(["sample", "--model", str(model_dir), "--task", "arithmetic", "--n", "2", "--k", "2",
                "--max-new-tokens", "4", "--out", str(out), "--quiet"]) == 0
    assert out.read_text() == ""
    assert cli(["sample", "--worked", "--task", "arithmetic", "--n", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all("reasoning_content" in r["messages"][1] for r in rows)
    assert cli(["sample", "--worked", "--task", "arithmetic", "--digits", "2", "--ops", "+", "--n", "5", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(" + " in r["messages"][0]["content"] for r in rows)


def test_eval_baseline_unreadable_or_torn_is_one_line(model_dir, tmp_path, capsys):
    # Catches: a non-UTF-8 or torn baseline file ending in a traceback (or an error without its name).
    for name, data, says in (("bin.jsonl", b"\xff\xfe\n", "cannot read it"), ("torn.jsonl", b'{"prompt": "x"\n', ":1: not a graded")):
        (tmp_path / name).write_bytes(data)
        assert cli(["eval", "--model", str(model_dir), "--task", "arithmetic", "--quiet",
                    "--baseline", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and name in err and len(err.splitlines()) == 1
