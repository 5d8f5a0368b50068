"""`nanoseek sft` end to end on a tiny model: the validation loss on assistant tokens falls, --resume is
bitwise exact, MTP and the balancing bias train or stay frozen by flag, bad data fails with FILE:LINE."""

import json

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.data import train_bpe
from nanoseek.rl.tasks import arithmetic, worked_solutions
from nanoseek.stages import sft as sft_stage
from nanoseek.train.metrics import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
            num_nextn_predict_layers=1, initializer_range=0.05)
SETS = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
FAST = ["--seq-len", "192", "--batch-size", "2", "--micro-batch", "1", "--lr", "1e-2", "--eval-every", "0",
        "--samples", "0", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    rows = worked_solutions(arithmetic(40, seed=0, digits=2, ops="+"))
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_bpe([json.dumps(r) for r in rows], vocab_size=400).save(root / "tok")
    return root


def sft(*flags) -> int:
    return sft_stage.main([str(f) for f in flags])


def weights(run):
    return load_file(str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
                         / "model.safetensors"))


@pytest.fixture(scope="module")
def full_run(data):
    out = data / "full"
    assert sft("--init-preset", "tiny", "--tokenizer", data / "tok", "--data", data / "chat.jsonl", "--out", out,
               *SETS, *FAST, "--epochs", "2") == 0
    return out


def test_sft_lowers_validation_loss_and_trains_mtp_and_bias(full_run, data):
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5
    assert summary["conversations"] == 36 and summary["val_conversations"] == 4
    train = [r for r in read_jsonl(full_run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == summary["steps"] and all(r["mtp_loss"] is not None for r in train)
    assert (full_run / "report.md").read_text().startswith("# nanoseek SFT run")
    # the result is a servable HF checkpoint with its tokenizer
    from nanoseek.data import Tokenizer
    from nanoseek.model import Transformer

    ckpt = full_run / "checkpoints" / "latest"
    model = Transformer.from_pretrained(ckpt.parent / ckpt.read_text().strip())
    assert Tokenizer.from_dir(ckpt.parent / ckpt.read_text().strip()).vocab_size <= model.args.vocab_size
    w = weights(full_run)
    bias = [k for k in w if k.endswith("e_score_correction_bias")]
    assert bias and any(w[k].abs().sum() > 0 for k in bias)  # γ > 0 moved the balancing bias


def test_sft_resume_is_bitwise_exact(full_run, data):
    out = data / "resumed"
    common = ["--init-preset", "tiny", "--tokenizer", data / "tok", "--data", data / "chat.jsonl", *SETS, *FAST,
              "--epochs", "2"]
    assert sft(*common, "--out", out, "--stop-at", "5") == 0
    assert len([r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]) == 5
    assert sft("--out", out, "--resume", "--lr", "1e-3") == 2  # a flag that would change the numbers
    assert sft("--out", out, "--resume", "--quiet") == 0
    a = [r["loss"] for r in read_jsonl(full_run / "metrics.jsonl") if r["kind"] == "train"]
    b = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert a == b
    wa, wb = weights(full_run), weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sft_from_checkpoint_with_frozen_bias_and_no_mtp(full_run, data):
    out = data / "second"
    src = full_run / "checkpoints" / (full_run / "checkpoints" / "latest").read_text().strip()
    assert sft("--model", src, "--data", data / "chat.jsonl", "--out", out, *FAST, "--epochs", "0.5",
               "--freeze-bias", "--mtp-lambda", "0") == 0
    before, after = weights(full_run), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.layers.0.") for k in changed)  # the main model trained
    assert not any(k.endswith("e_score_correction_bias") for k in changed)  # frozen bias
    mtp_layer = f"model.layers.{TINY['num_hidden_layers']}."
    shared = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the main embedding and head
    assert not any(k.startswith(mtp_layer) and not k.endswith(shared) for k in changed)  # MTP untouched


def test_sft_bad_data_and_flags(data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = (data / "chat.jsonl").read_text().splitlines()
    bad.write_text("\n".join(good[:2] + ['{"messages": [{"role": "user", "content": "hi"}]}'] + good[2:4]) + "\n")
    base = ["--init-preset", "tiny", "--tokenizer", data / "tok", *SETS, *FAST]
    assert sft(*base, "--data", bad, "--out", tmp_path / "r1") == 2
    assert "bad.jsonl:3: no assistant turn" in capsys.readouterr().err
    assert sft(*base, "--data", bad, "--out", tmp_path / "r2", "--skip-bad-rows", "--epochs", "0.5") == 0
    assert "skipped 1 row(s), invalid: lines 3" in capsys.readouterr().err
    assert sft(*base, "--data", data / "chat.jsonl", "--out", tmp_path / "r3", "--seq-len", "16") == 2
    assert "longer than 17 tokens" in capsys.readouterr().err  # all dropped, each counted and named
    assert sft("--data", data / "chat.jsonl", "--out", tmp_path / "r4", "--quiet") == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert sft(*base, "--data", data / "chat.jsonl", "--out", tmp_path / "r5", "--epochs", "1", "--tokens", "9") == 2
    assert sft(*base, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "r6") == 2
    assert "cannot read" in capsys.readouterr().err


def test_sft_stops_on_non_finite_steps(data, tmp_path, capsys):
    # lr 1e30: the first update sends the weights to ~1e30, every later loss is inf/nan and is skipped
    assert sft("--init-preset", "tiny", "--tokenizer", data / "tok", "--data", data / "chat.jsonl", "--out",
               tmp_path / "nan", *SETS, *FAST, "--lr", "1e30", "--max-nonfinite", "2", "--epochs", "2") == 2
    assert "2 non-finite steps in a row at step 3" in capsys.readouterr().err
    train = [r for r in read_jsonl(tmp_path / "nan" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped"] for r in train] == [False, True, True]
