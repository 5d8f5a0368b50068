"""Rejection sampling: k completions per problem, keep those the reward accepts, write chat JSONL.

    nanoseek sample --model runs/teacher --task arithmetic --n 500 --k 16 --out traces.jsonl
    nanoseek sample --model DIR --task problems.jsonl --k 8 --reward accuracy=1 --reward format=0.2 \\
        --threshold 1.2 --max-per-prompt 2 --out sft.jsonl
    nanoseek sft --model runs/student --data traces.jsonl --out runs/distilled   # then train on them
    nanoseek sample --worked --task arithmetic --n 2000 --out cold_start.jsonl     # no model: worked solutions

R1's step between its two RL stages (≈600K reasoning samples kept from the RL checkpoint) and the
data of its distilled models, at any size. A completion is kept when
* it finished on its own (end-of-sentence; completions cut by --max-new-tokens are dropped),
* it is in R1's layout when --require-format (default): reasoning closed by `</think>`, then an answer,
* and its reward is at least --threshold. The reward is the task's accuracy rule by default (the
  boxed / `<answer>` answer for math, the equation for countdown, the tests for code), or the
  weighted sum of --reward NAME=WEIGHT terms (names from nanoseek/rl/rewards.py or module:function).
Then, per problem: identical completions are dropped (--dedupe, default on), the shortest accepted
ones come first (--prefer-shorter, default on: R1 filtered long, rambling chains of thought), and at
most --max-per-prompt are kept (0: all).

Rows are `{"messages": [{"role": "user", ...}, {"role": "assistant", "content": answer,
"reasoning_content": reasoning}]}`: what `nanoseek sft` reads. Procedural tasks default to their
train split here (evaluate on the test split). Bad flags or inputs: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nanoseek.data import DataError
from nanoseek.eval.runner import EvalError, add_flags, check_flags, opens_thinking, run_flags, to_chat_row, write_jsonl
from nanoseek.rl.rewards import accuracy_for, combine, format_reward, parse_rewards
from nanoseek.rl.tasks import load_task, worked_solutions


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek sample", description=__doc__.split("\n\n")[0])
    add_flags(p, n_default=100, split_default="train", model_required=False)
    p.add_argument("--k", type=int, default=16, help="completions per problem")
    p.add_argument("--out", required=True, type=Path, help="chat JSONL to write")
    p.add_argument("--reward", action="append", default=[], metavar="NAME[=WEIGHT]",
                   help="reward term (repeatable; default: the task's accuracy rule)")
    p.add_argument("--threshold", type=float, default=1.0, help="keep completions whose reward is at least this")
    p.add_argument("--max-per-prompt", type=int, default=0, help="keep at most this many per problem (0: all)")
    p.add_argument("--dedupe", action=argparse.BooleanOptionalAction, default=True, help="drop identical completions")
    p.add_argument("--prefer-shorter", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the shortest accepted completions first")
    p.add_argument("--require-format", action=argparse.BooleanOptionalAction, default=True,
                   help="keep only completions in R1's `reasoning </think> answer` layout")
    p.add_argument("--worked", action="store_true",
                   help="no model: write the arithmetic task's worked solutions (cold-start SFT data)")
    a = p.parse_args(argv)
    if a.model is None and not a.worked:
        p.error("--model is required (or --worked for the arithmetic task's worked solutions)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        check_flags(a)
        if a.max_per_prompt < 0:
            raise EvalError("--max-per-prompt must be >= 0")
        if a.worked:
            return write_worked(a)
        terms = parse_rewards(a.reward) if a.reward else None
        run = run_flags(a)
    except (EvalError, DataError, ValueError) as e:
        print(f"nanoseek sample: error: {e}", file=sys.stderr)
        return 2
    rows, solved = [], 0
    for problem, text, prompt, outs in zip(run.problems, run.texts, run.prompts, run.samples):
        reward = combine(terms) if terms else accuracy_for(problem.task)
        opened = opens_thinking(run.tokenizer, prompt)
        kept, seen = [], set()
        for s in outs:
            if s.finish_reason != "stop":
                continue
            if a.require_format and not format_reward(problem.prompt, s.text, problem.answer):
                continue
            if reward(problem.prompt, s.text, problem.answer) < a.threshold:
                continue
            if a.dedupe and s.text in seen:
                continue
            seen.add(s.text)
            kept.append(s)
        if a.prefer_shorter:
            kept.sort(key=lambda s: len(s.tokens))  # stable: equal lengths keep their sampling order
        if a.max_per_prompt:
            kept = kept[:a.max_per_prompt]
        solved += bool(kept)
        rows += [to_chat_row(text, s.text, opened) for s in kept]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(a.out, rows)
    total = len(run.problems) * a.k
    print(f"kept {len(rows)} of {total} completions ({len(rows) / max(total, 1):.1%}); {solved} of "
          f"{len(run.problems)} problems have at least one; {total / max(run.seconds, 1e-9):.2f} completions/s; "
          f"wrote {a.out}")
    return 0


def write_worked(a) -> int:
    """Cold-start SFT data: step-by-step solutions of arithmetic problems, no model involved."""
    if a.task != "arithmetic":
        raise EvalError("--worked writes solutions for --task arithmetic only")
    rows = worked_solutions(load_task(a.task, a.n, a.seed, a.split, digits=a.digits, ops=a.ops))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(a.out, rows)
    print(f"wrote {len(rows)} worked solutions ({a.split} split, seed {a.seed}) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
