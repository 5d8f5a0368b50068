"""`nanoseek grpo` end to end on a tiny random model: a user reward by import path is learned, dynamic
sampling refills the batch, --resume continues with the same numbers, bad flags are one line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.cli import main as cli
from nanoseek.data import train_bpe
from nanoseek.stages import init as init_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
            num_nextn_predict_layers=1, max_position_embeddings=256)


def digits(prompt: str, completion: str, answer: str) -> float:
    """A trivially learnable reward: the share of the completion's characters that are digits."""
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def coin(prompt: str, completion: str, answer: str) -> float:
    """Agrees within a group about half the time: whether the completion has an even length."""
    return float(len(completion) % 2 == 0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpomodel")
    texts = [f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}." for a in range(20) for b in range(5)]
    tok = train_bpe(texts, vocab_size=300)
    tok.save(root / "tok")
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert init_stage.main(["--preset", "tiny", "--out", str(root / "m"), *sets, "--set", f"vocab_size={tok.vocab_size}",
                            "--tokenizer", str(root / "tok")]) == 0
    return root / "m"


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


BASE = ["--task", "arithmetic", "--digits", "1", "--n-problems", "30", "--prompts-per-step", "4",
        "--num-generations", "4", "--max-completion-length", "8", "--quiet", "--sample-every", "10"]


def test_grpo_learns_a_user_reward(model_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(["grpo", "--model", str(model_dir), "--out", str(out), *BASE, "--reward", "test_grpo_stage:digits=1",
                "--steps", "15", "--lr", "3e-2", "--keep-routing"]) == 0
    recs = records(out)
    assert len(recs) == 15 and all(r["kind"] == "grpo" for r in recs)
    first = sum(r["reward"] for r in recs[:3]) / 3
    last = sum(r["reward"] for r in recs[-3:]) / 3
    assert last > first + 0.1, (first, last)
    for key in ("rewards/test_grpo_stage:digits/mean", "accuracy", "format_rate", "completion_length",
                "completion_length_max", "truncated", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "frac_reward_zero_std", "rollout_s", "train_s", "rollout_tokens_per_s", "rollout_logp_gap"):
        assert key in recs[-1], key
    assert recs[0]["rollout_logp_gap"] < 1e-3  # routing replayed: the training forward sees what was sampled
    assert (out / "report.md").is_file() and "### step 15" in (out / "samples.md").read_text()
    assert json.loads((out / "summary.json").read_text())["reward_last"] > first
    trained = load_file(str(out / "checkpoints" / "step-000015" / "model.safetensors"))
    start = load_file(str(model_dir / "model.safetensors"))
    assert not torch.equal(trained["lm_head.weight"], start["lm_head.weight"])  # the policy is what is saved


def test_dynamic_sampling_refills(model_dir, tmp_path):
    out = tmp_path / "dyn"
    assert cli(["grpo", "--model", str(model_dir), "--out", str(out), *BASE, "--reward", "test_grpo_stage:coin",
                "--steps", "3", "--dynamic-sampling", "--max-sampling-rounds", "8", "--num-generations", "2"]) == 0
    recs = records(out)
    # with G=2, about half the groups agree and are dropped; more prompts are drawn to fill the batch
    assert all(r["groups"] == 4 for r in recs)
    assert sum(r["groups_drawn"] for r in recs) > 12
    without = tmp_path / "plain"
    assert cli(["grpo", "--model", str(model_dir), "--out", str(without), *BASE, "--reward", "test_grpo_stage:coin",
                "--steps", "3", "--num-generations", "2"]) == 0
    assert all(r["groups_drawn"] == 4 for r in records(without))


def test_resume_is_exact(model_dir, tmp_path):
    flags = [*BASE, "--reward", "test_grpo_stage:digits=1", "--reward", "format=0.5", "--steps", "4", "--lr", "3e-3",
             "--beta", "0.04", "--num-iterations", "2", "--steps-per-generation", "2", "--ref-model-sync-steps", "3",
             "--ref-model-mixup-alpha", "0.5"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(["grpo", "--model", str(model_dir), "--out", str(straight), *flags]) == 0
    assert cli(["grpo", "--model", str(model_dir), "--out", str(split), *flags, "--stop-at", "2"]) == 0
    assert (split / "checkpoints" / "step-000002" / "reference" / "config.json").is_file()
    assert cli(["grpo", "--out", str(split), "--resume"]) == 0
    a, b = records(straight), records(split)
    keep = ("reward", "loss", "kl", "grad_norm", "completion_length", "ratio_mean")
    assert [[r[k] for k in keep] for r in a] == [[r[k] for k in keep] for r in b]
    assert a[-1]["kl"] > 0
    wa = load_file(str(straight / "checkpoints" / "step-000004" / "model.safetensors"))
    wb = load_file(str(split / "checkpoints" / "step-000004" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra = load_file(str(straight / "checkpoints" / "step-000004" / "reference" / "model.safetensors"))
    assert any(not torch.equal(ra[k], wa[k]) for k in wa)  # the refreshed reference is its own model
    # a flag that would change the numbers is refused on resume
    assert cli(["grpo", "--out", str(split), "--resume", "--beta", "0.1"]) == 2


@pytest.mark.parametrize("flags, message", [
    (["--reward", "nope"], "unknown reward"),
    (["--task", "missing.jsonl"], "missing.jsonl"),
    (["--epsilon-high", "0.1"], "--epsilon-high"),
    (["--speculative", "mtp", "--max-completion-length", "500"], "context"),
])
def test_errors_are_one_line(model_dir, tmp_path, flags, message, capsys):
    args = ["grpo", "--model", str(model_dir), "--out", str(tmp_path / "e"), *BASE, "--steps", "1", *flags]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
