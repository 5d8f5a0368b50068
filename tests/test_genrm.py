"""Generative reward (`--reward genrm:DIR`): robust score parsing, template checks, and a scripted tiny
judge (its greedy output is fixed by construction) scoring a real GRPO step through the engine."""

import json

import pytest
import torch

from nanoseek.data import train_bpe
from nanoseek.model import Transformer, preset
from nanoseek.rl.genrm import DEFAULT_TEMPLATE, JudgeReward, parse_score, read_template

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, want", [
    ("The reply is right.\nScore: 7", (7.0, "ok")),
    ("score = 7.5", (7.5, "ok")),
    ("**Score:** 8/10", (8.0, "ok")),
    ("Final score is 10", (10.0, "ok")),
    ("Score: 3 at first... on reflection, Score: 6", (6.0, "ok")),  # the last one counts
    ("<think>Score: 9 would be too generous</think>It is fine. Score: 4", (4.0, "ok")),  # reasoning ignored
    ("<think>Score: 9</think>no verdict after thinking", (None, "missing")),
    ("I would give it \\boxed{5}.", (5.0, "ok")),
    ("Score: 12", (None, "out_of_range")),
    ("Score: -1", (None, "out_of_range")),
    ("Score: 4/5", (None, "out_of_range")),  # another scale than the one asked for
    ("A fine answer, well argued.", (None, "missing")),
    ("", (None, "missing")),
])
def test_parse_score(text, want):
    assert parse_score(text) == want


def test_templates(tmp_path):
    assert read_template(None) == DEFAULT_TEMPLATE
    for body, err in [("Judge {reply}", "unknown field"), ("Judge {prompt} only", "never shows"),
                      ("Judge {completion} {", "not a format string")]:
        (tmp_path / "t.txt").write_text(body)
        with pytest.raises(ValueError, match=err):
            read_template(tmp_path / "t.txt")
    (tmp_path / "ok.txt").write_text('Q: {prompt}\nA: {completion}\nRef: {answer}\nReply as {{"score": N}}')
    assert "{answer}" in read_template(tmp_path / "ok.txt")
    with pytest.raises(ValueError, match="cannot read"):
        read_template(tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"What is {a} + {b}? The answer is {a + b}. Score: {a % 11}" for a in range(30) for b in range(4)]
    t = train_bpe(texts + [DEFAULT_TEMPLATE], vocab_size=300)
    t.save(tmp_path_factory.mktemp("tok"))
    return t


def scripted_judge(tok, path, verdict: str):
    """A tiny model whose greedy continuation of any judge prompt is `verdict` then EOS: attention and
    FFN outputs are zeroed (every block is the identity), so the logits at a position depend on its
    token only, and the output head maps each token of the chain to the next."""
    torch.manual_seed(0)
    args = preset("tiny", num_hidden_layers=1, hidden_size=64, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                  eos_token_id=tok.eos_id, num_nextn_predict_layers=0, max_position_embeddings=1024)
    model = Transformer(args)
    probe = JudgeReward.__new__(JudgeReward)  # only for prompt_ids: the chain starts at the prompt's last token
    probe.template, probe.tokenizer = DEFAULT_TEMPLATE, tok
    start = probe.prompt_ids("q", "a")[-1]
    chain = [start] + tok.encode(verdict) + [tok.eos_id]
    assert len(set(chain)) == len(chain)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("o_proj.weight") or "down_proj" in name:
                p.zero_()
        h = model.norm(model.embed_tokens.weight)  # [V, D]: the final hidden state of each token (blocks are identity)
        model.lm_head.weight.zero_()
        for t, nxt in zip(chain, chain[1:]):
            model.lm_head.weight[nxt] += 20 * h[t] / h[t].norm()
    model.save_pretrained(path)
    tok.save(path)
    return path


def test_judge_scores_through_the_engine_and_counts_bad_verdicts(tok, tmp_path):
    good = JudgeReward(scripted_judge(tok, tmp_path / "good", "Score: 7"), max_new_tokens=16)
    prompts = ["What is 1 + 2?", "What is 3 + 4?", "What is 5 + 0?"]
    completions = ["<think>add them</think>3", "7", "The answer is 5."]
    texts = good.judge(prompts, completions)
    assert [t.strip() for t in texts] == ["Score: 7"] * 3
    assert good.score(prompts, completions) == [0.7] * 3
    assert good.stats() == {"genrm/missing": 0, "genrm/out_of_range": 0, "genrm/too_long": 0, "genrm/judged": 3}
    # the judge sees the final answer, not the reasoning
    assert "add them" not in tok.decode(good.prompt_ids(prompts[0], completions[0]))
    bad = JudgeReward(scripted_judge(tok, tmp_path / "bad", "Score: 12"), max_new_tokens=16)
    assert bad.score(prompts, completions) == [0.0] * 3
    assert bad.stats()["genrm/out_of_range"] == 3
    assert bad.stats()["genrm/out_of_range"] == 0  # counts are per call of stats()


def test_grpo_step_with_a_generative_judge(tok, tmp_path):
    from nanoseek.stages import grpo as grpo_stage

    judge = scripted_judge(tok, tmp_path / "judge", "Score: 7")
    args = preset("tiny", num_hidden_layers=1, hidden_size=32, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                  eos_token_id=tok.eos_id, num_nextn_predict_layers=0, max_position_embeddings=256)
    Transformer(args).save_pretrained(tmp_path / "policy")
    tok.save(tmp_path / "policy")
    out = tmp_path / "run"
    assert grpo_stage.main(["--model", str(tmp_path / "policy"), "--out", str(out), "--task", "arithmetic", "--digits",
                            "1", "--n-problems", "4", "--prompts-per-step", "2", "--num-generations", "2",
                            "--max-completion-length", "4", "--steps", "1", "--quiet", "--sample-every", "0",
                            "--reward", "format=1", "--reward", f"genrm:{judge}=0.5", "--genrm-max-tokens", "8"]) == 0
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rec = [r for r in rec if r.get("kind") == "grpo"][-1]
    assert rec["rewards/genrm/mean"] == pytest.approx(0.7) and rec["genrm/judged"] == 4
    assert rec["genrm/missing"] == 0 and rec["reward"] == pytest.approx(rec["rewards/format/mean"] + 0.35)
    # a template file that names an unknown field is one line, exit 2
    (tmp_path / "t.txt").write_text("{question}")
    assert grpo_stage.main(["--model", str(tmp_path / "policy"), "--out", str(tmp_path / "r2"), "--task", "arithmetic",
                            "--steps", "1", "--reward", f"genrm:{judge}", "--genrm-template", str(tmp_path / "t.txt")]) == 2
