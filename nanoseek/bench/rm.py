"""Reward-model training throughput: `nanoseek rm` against TRL's RewardTrainer, same model and pairs, one run.

    nanoseek bench rm                                   # tiny preset, 512 pairs, batch 16, 10 steps
    nanoseek bench rm --rounds 2 --steps 6 --set num_hidden_layers=2
    pip install trl                                     # the peer (a bench-only dependency)

The data: preference pairs over 2-digit arithmetic prompts (nanoseek/rl/tasks.py), the correct
answer chosen over a wrong one, rendered with the chat template and tokenized once (nanoseek's
`encode_pair`); TRL gets the same ids as a pre-tokenized dataset (`chosen_ids` / `rejected_ids`).
The model: the preset with random weights and a new `score` head, saved by nanoseek in
transformers' DeepseekV3ForSequenceClassification layout, which TRL loads with
AutoModelForSequenceClassification (SDPA attention); the pad token is the tokenizer's dedicated one
on both sides. Same pairs per step, AdamW (β 0.9/0.95, fused), lr 1e-5, clip 1.0, fp32 on CPU.

tokens/s = real tokens (both sides of every pair, padding excluded) of the timed steps / their
summed step times; the first --warmup steps of each run are not timed. nanoseek's step time is its
loop's (padding, forward, backward, update); TRL's from `on_step_begin` to `on_step_end`. The peers
take turns, --rounds runs each; each one's best run counts, with the range over runs (interference
on a shared machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.bench.decode import cpu_pressure
from nanoseek.data import train_bpe
from nanoseek.model import PRESETS, Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.rl.reward_model import RewardModel
from nanoseek.rl.tasks import arithmetic
from nanoseek.stages.rm import PAD_TOKEN, encode_pair


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek bench rm", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--pairs", type=int, default=512, help="training pairs")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=3, help="runs per peer, taking turns; the best counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path, help="append the results as one JSON line here")
    a = p.parse_args(argv)
    for name in ("pairs", "batch_size", "steps", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must be in [0, --steps)")
    return a


def setup(a, root: Path):
    """pairs.jsonl, tokenizer, the random reward model in HF layout, the encoded pairs."""
    rng = random.Random(0)
    problems = arithmetic(max(1, a.pairs // 4), seed=0, digits=2, ops="+-")
    rows = []
    while len(rows) < a.pairs:
        p = problems[len(rows) % len(problems)]
        wrong = int(p.answer) + rng.choice([-1, 1]) * rng.randint(1, 30)
        rows.append({"prompt": p.prompt, "chosen": f"The answer is \\boxed{{{p.answer}}}.",
                     "rejected": f"The answer is \\boxed{{{wrong}}}."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
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
    pairs = [encode_pair(tok, r) for r in rows]
    return tok, rm, pairs


def nanoseek_run(a, root: Path) -> float:
    """One `nanoseek rm` run of --steps steps; real tokens/s over the timed steps."""
    from nanoseek.stages import rm as rm_stage
    from nanoseek.train.metrics import read_jsonl

    out = Path(tempfile.mkdtemp(dir=root, prefix="ns-"))
    n_train = a.pairs - max(1, round(a.pairs * 0.02))
    epochs = (a.steps + 1) * a.batch_size / n_train
    flags = ["--model", root / "model", "--data", root / "pairs.jsonl", "--out", out, "--batch-size", a.batch_size,
             "--epochs", epochs, "--stop-at", a.steps, "--lr", "1e-5", "--eval-every", "0", "--quiet",
             "--val-fraction", "0.02", "--device", "cpu"]
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = rm_stage.main([str(f) for f in flags])
    if code != 0:
        raise SystemExit(f"nanoseek bench rm: the nanoseek run failed (exit {code})")
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"][a.warmup:]
    return sum(r["tok_per_s"] * r["step_s"] for r in steps) / sum(r["step_s"] for r in steps)


def trl_run(a, root: Path, pairs) -> float:
    """One TRL RewardTrainer run of --steps steps on the same ids; real tokens/s over the timed steps."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(root / "model", dtype=torch.float32,
                                                               attn_implementation="sdpa")
    hf_tok = PreTrainedTokenizerFast.from_pretrained(root / "tok")
    data = Dataset.from_dict({"chosen_ids": [p[0] for p in pairs], "rejected_ids": [p[1] for p in pairs]})
    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    hook = model.register_forward_pre_hook(lambda m, args, kw: tokens.append(int(kw["attention_mask"].sum())),
                                           with_kwargs=True)
    config = RewardConfig(output_dir=str(Path(tempfile.mkdtemp(dir=root, prefix="trl-"))), max_steps=a.steps,
                          per_device_train_batch_size=a.batch_size, learning_rate=1e-5, lr_scheduler_type="cosine",
                          warmup_steps=0.03, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                          optim="adamw_torch_fused", use_cpu=True, bf16=False, fp16=False, save_strategy="no",
                          report_to=[], logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0, seed=0,
                          pad_token=PAD_TOKEN, max_length=None, gradient_checkpointing=False)
    trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=hf_tok, callbacks=[Clock()])
    trainer.train()
    hook.remove()
    w = a.warmup
    return sum(tokens[w:len(times)]) / sum(times[w:])


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
    try:
        import trl  # noqa: F401  (the peer: pip install trl)
    except ImportError:
        raise SystemExit("nanoseek bench rm: needs TRL (pip install trl), a bench-only dependency") from None
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        root = Path(tmp)
        tok, rm, pairs = setup(a, root)
        gap = check_parity(root, rm, pairs)
        if gap > 1e-3:
            raise SystemExit(f"nanoseek bench rm: transformers scores the same weights differently (max |Δ| {gap:.2e})")
        runs = {"nanoseek rm": lambda: nanoseek_run(a, root), "TRL RewardTrainer": lambda: trl_run(a, root, pairs)}
        res = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, run in runs.items():
                res[name].append(run())
    n_tok = sum(len(c) + len(r) for c, r, _ in pairs)
    print(f"reward model, {a.preset} preset ({rm.model.num_params() / 1e6:.2f}M params + score head), {a.pairs} pairs "
          f"({n_tok:,} tokens), {a.batch_size} pairs/step, {a.steps} steps ({a.warmup} untimed), fp32, "
          f"{torch.get_num_threads()} threads, best of {a.rounds} runs taking turns; transformers "
          f"{transformers.__version__}, trl {__import__('trl').__version__}; scores agree to {gap:.1e}; "
          f"cpu pressure {cpu_pressure()}")
    print(f"{'':<22}{'tokens/s (best)':>16}{'range':>22}")
    for name, xs in res.items():
        print(f"{name:<22}{max(xs):>16,.0f}{f'{min(xs):,.0f} - {max(xs):,.0f}':>22}")
    ratio = max(res["nanoseek rm"]) / max(res["TRL RewardTrainer"])
    print(f"nanoseek / TRL: {ratio:.2f}x")
    if a.out:
        record = {"bench": "rm", "preset": a.preset, "overrides": a.overrides, "pairs": a.pairs,
                  "batch_size": a.batch_size, "steps": a.steps, "threads": torch.get_num_threads(),
                  "tok_s": res, "ratio": ratio}
        with open(a.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0
