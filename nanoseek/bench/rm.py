"""Reward-model training throughput: `nanoseek rm` against TRL's RewardTrainer, same model and pairs, one run.

    nanoseek bench rm                                   # tiny preset, 512 pairs, batch 16, 10 steps
    nanoseek bench rm --rounds 2 --steps 6 --set num_hidden_layers=2
    pip install trl                                     # the peer (a bench-only dependency)

The data: preference pairs whose lengths vary as real preference data's do (a long-tailed,
log-normal reply length, drawn independently for the two sides): a 2-digit arithmetic prompt
(nanoseek/rl/tasks.py), then a reply of N words of working (N log-normal, median --median-words,
σ --sigma, 2..--max-words) ending with the answer, the correct answer chosen over a wrong one;
rendered with the chat template and tokenized once (nanoseek's `encode_pair`; the length
distribution in tokens is printed). TRL gets the same ids as a pre-tokenized dataset
(`chosen_ids` / `rejected_ids`). The model: the preset with random weights and a new `score` head,
saved by nanoseek in transformers' DeepseekV3ForSequenceClassification layout, which TRL loads with
AutoModelForSequenceClassification (SDPA attention); the pad token is the tokenizer's dedicated one
on both sides. Same pairs per step (the same seeded order), AdamW (β 0.9/0.95, fused), lr 1e-5,
clip 1.0, fp32 on CPU.

What each side computes per step for its 16 pairs: the Bradley–Terry loss of the 32 sequences'
rewards, backward, clip, AdamW. TRL (RewardDataCollatorForPreference) right-pads the 32 sequences
to the longest and runs one [32, max len] forward with an attention mask (so transformers takes
SDPA's masked path); nanoseek packs them padding-free into one row (attention per sequence, no
mask) and runs the last block's FFN and the final norm on the 32 scored positions only
(`RewardModel.packed`). Scores are checked equal on the same weights first.

tokens/s = real tokens (both sides of every pair, padding excluded) of the timed steps / their
summed step times (see nanoseek/bench/vs_trl.py for the shared timing rules).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
from pathlib import Path

import torch

from nanoseek.bench import vs_trl
from nanoseek.bench.decode import cpu_pressure
from nanoseek.data import train_bpe
from nanoseek.model import Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.rl.reward_model import RewardModel
from nanoseek.rl.tasks import arithmetic
from nanoseek.stages.rm import PAD_TOKEN, encode_pair, plan_pairs

WORDS = ("first", "add", "the", "tens", "and", "then", "the", "ones", "carry", "one", "so", "we", "get", "check",
         "again", "subtract", "digits", "result", "is", "this", "gives", "let", "me", "verify", "that")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek bench rm", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=512, help="training pairs")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--median-words", type=int, default=40, help="median reply length in words (log-normal)")
    p.add_argument("--sigma", type=float, default=0.8, help="log-normal σ of the reply length (0: all equal)")
    p.add_argument("--max-words", type=int, default=400, help="longest reply in words")
    return vs_trl.parse_args(p, argv, ("pairs", "batch_size", "median_words", "max_words"))


def reply(rng: random.Random, a, answer) -> str:
    n = min(a.max_words, max(2, round(math.exp(math.log(a.median_words) + a.sigma * rng.gauss(0, 1)))))
    return " ".join(rng.choice(WORDS) for _ in range(n)) + f". The answer is \\boxed{{{answer}}}."


VAL_PAIRS = 4  # val.jsonl: nanoseek's held-out set (not timed), so the training file is all --pairs


def setup(a, root: Path):
    """pairs.jsonl + val.jsonl, tokenizer, the random reward model in HF layout, the encoded pairs."""
    rng = random.Random(0)
    problems = arithmetic(max(1, a.pairs // 4), seed=0, digits=2, ops="+-")
    rows = []
    while len(rows) < a.pairs + VAL_PAIRS:
        p = problems[len(rows) % len(problems)]
        wrong = int(p.answer) + rng.choice([-1, 1]) * rng.randint(1, 30)
        rows.append({"prompt": p.prompt, "chosen": reply(rng, a, p.answer), "rejected": reply(rng, a, wrong)})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:a.pairs]))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[a.pairs:]))
    tok = train_bpe([r["prompt"] + r["chosen"] + r["rejected"] for r in rows], vocab_size=512)
    tok.save(root / "tok")
    torch.manual_seed(0)
    args = preset(a.preset, **{**parse_overrides(a.overrides), "vocab_size": tok.vocab_size,
                               "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                               "pad_token_id": tok.token_id(PAD_TOKEN), "num_nextn_predict_layers": 0}
                  ).replace(torch_dtype="float32")
    rm = RewardModel(Transformer(args))
    rm.save_pretrained(root / "model")
    tok.save(root / "model")
    pairs = [encode_pair(tok, r) for r in rows[:a.pairs]]
    return tok, rm, pairs


def epochs(a) -> float:
    """--epochs for `nanoseek rm`: one step more than --steps (the run stops at --steps)."""
    return (a.steps + 1) * a.batch_size / a.pairs


def nanoseek_run(a, root: Path, pairs) -> float:
    """One `nanoseek rm` run of --steps steps; real tokens/s over the timed steps."""
    from nanoseek.stages import rm as rm_stage

    out = Path(tempfile.mkdtemp(dir=root, prefix="ns-"))
    flags = ["--model", root / "model", "--data", root / "pairs.jsonl", "--val", root / "val.jsonl", "--out", out,
             "--batch-size", a.batch_size, "--epochs", epochs(a), "--stop-at", a.steps, "--lr", "1e-5", "--seed", 0,
             "--eval-every", "0", "--quiet", "--device", "cpu", "--max-len", max(len(s) for p in pairs for s in p[:2])]
    steps = vs_trl.run_stage(rm_stage.main, flags, a.warmup, "rm")
    return sum(r["tok_per_s"] * r["step_s"] for r in steps) / sum(r["step_s"] for r in steps)


def trl_run(a, root: Path, pairs) -> float:
    """One TRL RewardTrainer run of --steps steps on the same ids, in nanoseek's order (`plan_pairs`, read
    sequentially), so every step holds the same pairs on both sides; real tokens/s over the timed steps."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(root / "model", dtype=torch.float32,
                                                               attn_implementation="sdpa")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(root / "tok")
    order = plan_pairs(len(pairs), epochs(a), 0)
    data = Dataset.from_dict({"chosen_ids": [pairs[i][0] for i in order], "rejected_ids": [pairs[i][1] for i in order]})
    config = RewardConfig(output_dir=str(Path(tempfile.mkdtemp(dir=root, prefix="trl-"))), max_steps=a.steps,
                          per_device_train_batch_size=a.batch_size, learning_rate=1e-5, lr_scheduler_type="cosine",
                          warmup_steps=0.03, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                          optim="adamw_torch_fused", use_cpu=True, bf16=False, fp16=False, save_strategy="no",
                          report_to=[], logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                          train_sampling_strategy="sequential",
                          pad_token=PAD_TOKEN, max_length=None, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=hf_tok)
    return vs_trl.trl_tokens_per_s(trainer, model, lambda kw: int(kw["attention_mask"].sum()), a.warmup)


def check_parity(root: Path, rm: RewardModel, pairs) -> float:
    """Max |Δreward| between nanoseek and transformers on a padded batch of the pairs (same weights)."""
    from transformers import AutoModelForSequenceClassification

    from nanoseek.rl.reward_model import pad_batch

    hf = AutoModelForSequenceClassification.from_pretrained(root / "model", dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    ids = pad_batch([p[0] for p in pairs[:4]] + [p[1] for p in pairs[:4]], rm.pad_id)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(ids != rm.pad_id).long()).logits.squeeze(-1)
        ours = rm.eval()(ids)
    return (ours - theirs).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    transformers = vs_trl.peer_setup(a, "rm")
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        root = Path(tmp)
        tok, rm, pairs = setup(a, root)
        gap = check_parity(root, rm, pairs)
        if gap > 1e-3:
            raise SystemExit(f"nanoseek bench rm: transformers scores the same weights differently (max |Δ| {gap:.2e})")
        runs = {"nanoseek rm": lambda: nanoseek_run(a, root, pairs),
                "TRL RewardTrainer": lambda: trl_run(a, root, pairs)}
        res = vs_trl.take_turns(runs, a.rounds)
    lengths = sorted(len(s) for p in pairs for s in p[:2])
    n_tok = sum(lengths)
    steps = [[pairs[i] for i in plan_pairs(len(pairs), epochs(a), 0)[k * a.batch_size:(k + 1) * a.batch_size]]
             for k in range(a.steps)]
    padded = sum(2 * len(b) * max(len(s) for p in b for s in p[:2]) for b in steps)  # what TRL's collator builds
    real = sum(len(s) for b in steps for p in b for s in p[:2])
    print(f"reward model, {a.preset} preset ({rm.model.num_params() / 1e6:.2f}M params + score head), {a.pairs} pairs "
          f"({n_tok:,} tokens; sequence length min {lengths[0]}, median {statistics.median(lengths):.0f}, p90 "
          f"{lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}; the steps' batches padded to their longest "
          f"hold {padded / real:.2f}x their real tokens), {a.batch_size} pairs/step, {a.steps} steps ({a.warmup} untimed), "
          f"fp32, {torch.get_num_threads()} threads, best of {a.rounds} runs taking turns; transformers "
          f"{transformers.__version__}, trl {__import__('trl').__version__}; scores agree to {gap:.1e}; "
          f"cpu pressure {cpu_pressure()}")
    vs_trl.print_table(res, "tokens/s (best)", width=22)
    ratio = max(res["nanoseek rm"]) / max(res["TRL RewardTrainer"])
    print(f"nanoseek / TRL: {ratio:.2f}x")
    if a.out:
        record = {"bench": "rm", "preset": a.preset, "overrides": a.overrides, "pairs": a.pairs,
                  "batch_size": a.batch_size, "steps": a.steps, "threads": torch.get_num_threads(),
                  "tok_s": res, "ratio": ratio}
        with open(a.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0
