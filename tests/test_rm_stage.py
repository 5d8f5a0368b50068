"""`nanoseek rm` end to end on a tiny random model: an obvious preference (the correct sum of two
one-digit numbers over a wrong one, wrong answers being 20-60 too big) is learned to high held-out
pairwise accuracy; --resume is exact; bad rows are errors naming FILE:LINE."""

import json
import random

import pytest
import torch

from nanoseek.data import train_bpe
from nanoseek.rl.reward_model import RewardModel
from nanoseek.rl.tasks import arithmetic
from nanoseek.stages import init as init_stage
from nanoseek.stages import rm as rm_stage

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
            num_nextn_predict_layers=1, max_position_embeddings=128)
FAST = ["--batch-size", "16", "--micro-batch", "8", "--lr", "3e-3", "--warmup", "0.1", "--eval-every", "0", "--quiet"]


def reply(n: int) -> str:
    return f"The answer is \\boxed{{{n}}}."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    rng = random.Random(0)
    rows = []
    for p in arithmetic(60, seed=0, digits=1, ops="+"):
        for _ in range(4):
            rows.append({"prompt": p.prompt, "chosen": reply(int(p.answer)),
                         "rejected": reply(int(p.answer) + rng.randint(20, 60))})
    rng.shuffle(rows)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = train_bpe([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=320)
    tok.save(root / "tok")
    sets = [x for k, v in TINY.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert init_stage.main(["--preset", "tiny", "--out", str(root / "m"), *sets, "--set",
                            f"vocab_size={tok.vocab_size}", "--tokenizer", str(root / "tok")]) == 0
    return root


def rm(*flags) -> int:
    return rm_stage.main([str(f) for f in flags])


def test_rm_learns_an_obvious_preference(data):
    out = data / "run"
    assert rm("--model", data / "m", "--data", data / "pairs.jsonl", "--out", out, "--epochs", "4", *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_pairs"] == 24 and summary["pairs"] == 216
    assert summary["final_val_accuracy"] >= 0.9 > summary["initial_val_accuracy"]
    # the checkpoint is a reward model that scores the held-out preference the same way
    model = RewardModel.from_pretrained(out)
    assert model.pad_id == 2  # the dedicated pad token: the closing EOS (id 1) is what gets scored
    from nanoseek.data import Tokenizer
    from nanoseek.data.chat import encode_chat
    tok = Tokenizer.from_dir(out / "tokenizer")
    msgs = [{"role": "user", "content": "What is 3 + 4?"}]
    good, _ = encode_chat(tok, msgs + [{"role": "assistant", "content": reply(7)}])
    bad, _ = encode_chat(tok, msgs + [{"role": "assistant", "content": reply(47)}])
    r_good, r_bad = model.score_sequences([good, bad])
    assert r_good > r_bad


def test_rm_resume_is_exact(data, tmp_path):
    common = ["--model", data / "m", "--data", data / "pairs.jsonl", "--epochs", "0.5", *FAST]
    assert rm(*common, "--out", tmp_path / "a") == 0
    assert rm(*common, "--out", tmp_path / "b", "--stop-at", "3") == 0
    assert rm("--out", tmp_path / "b", "--resume", "--quiet") == 0
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sa["final_val_loss"] == sb["final_val_loss"] and sa["steps"] == sb["steps"] == 7
    wa = RewardModel.from_pretrained(tmp_path / "a").state_dict()
    wb = RewardModel.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("row, message", [
    ('{"prompt": "hi", "chosen": "a"}', 'missing "rejected"'),
    ('{"prompt": "hi", "messages": [], "chosen": "a", "rejected": "b"}', 'exactly one of "prompt"'),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', '"prompt" must be a string'),
    ('{"prompt": "hi", "chosen": 5, "rejected": "b"}', '"chosen" must be a string or a list'),
    ('{"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}', '"margin" must be a finite number'),
    ('{"messages": [{"role": "wizard", "content": "x"}], "chosen": "a", "rejected": "b"}', "unknown role"),
    ('{"prompt": "hi", "chosen": "a", ', "invalid JSON"),
])
def test_bad_rows_name_the_line(data, tmp_path, capsys, row, message):
    good = '{"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3", "margin": 1}'
    (tmp_path / "bad.jsonl").write_text(f"{good}\n\n{good}\n{row}\n")
    assert rm("--model", data / "m", "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "o", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nanoseek rm: error: {tmp_path / 'bad.jsonl'}:4: ") and message in err, err
    assert len(err.splitlines()) == 1
