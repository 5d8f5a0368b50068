"""Evaluate a checkpoint on a verifiable task: pass@1 over k samples, pass@k, cons@k (R1 protocol).

    nanoseek eval --model runs/sft --task arithmetic --k 8                # 100 test problems, T 0.6, top-p 0.95
    nanoseek eval --model DIR --task countdown --n 50 --k 16 --out runs/eval-cd
    nanoseek eval --model DIR --task passkey --context 4096 --n 20       # long-context retrieval (greedy)
    nanoseek eval --model DIR --task gsm8k_test.jsonl --greedy --max-new-tokens 1024 \\
        --instruction "Please reason step by step, and put your final answer within \\boxed{}."

R1's protocol (DeepSeek-R1 §3): k samples per problem at temperature 0.6 and top-p 0.95; pass@1 is
the mean correctness of the k samples, averaged over problems; cons@k the accuracy of their majority
answer (`nanoseek.eval.metrics`: None answers do not vote, ties go to the answer seen first).
pass@k is the unbiased estimator. --greedy takes one deterministic sample instead (k = 1, T = 0).

Tasks: `arithmetic` and `countdown` (procedural test split, --seed/--n/--digits), or a JSONL file of
problems (`{"prompt"|"question", "answer"}`, GSM8K's `#### 42` answers, `{"prompt", "tests"}` for code).
Correctness is the task's rule (nanoseek/rl/rewards.py: answers in `\\boxed{}` or `<answer>` after the
reasoning); the format rate counts R1-Zero tags or the R1 `…</think> answer` layout.

Writes OUT/samples.jsonl (every completion with its grading), OUT/summary.json, and prints a table.
`--baseline DIR` (an earlier eval's output on the same problems, e.g. the model before RL) adds the
pass@1 change paired by problem with its standard error (summary["vs_baseline"]).
OUT defaults to eval-TASK next to the model. Bad flags, models or task files: one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nanoseek.data import DataError
from nanoseek.eval import paired_difference, passkey
from nanoseek.eval.runner import (EvalError, add_flags, check_flags, grade, load_model, prompt_texts, run_flags,
                                  summarize, write_json, write_jsonl)
from nanoseek.rl.tasks import load_task


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek eval", description=__doc__.split("\n\n")[0])
    add_flags(p, n_default=100, split_default="test")
    p.add_argument("--k", type=int, default=8, help="samples per problem (R1: 64 for cons@64)")
    p.add_argument("--greedy", action="store_true", help="one greedy sample per problem (k = 1, T = 0)")
    p.add_argument("--context", type=int, help="passkey: prompt + answer tokens (nanoseek/eval/passkey.py)")
    p.add_argument("--out", type=Path, help="output directory (default: MODEL/eval-TASK)")
    p.add_argument("--baseline", type=Path, help="an earlier eval's output directory (or its samples.jsonl) "
                   "on the same problems: report the pass@1 change paired by problem, with its standard error")
    a = p.parse_args(argv)
    if a.greedy:
        a.k, a.temperature = 1, 0.0
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.task == "passkey":
        return passkey_main(a)
    try:
        check_flags(a)
        baseline = read_baseline(a.baseline) if a.baseline else None
        if baseline is not None:  # the same problems? (before sampling, which is the slow part)
            problems = load_task(a.task, a.n, a.seed, a.split, digits=a.digits, ops=a.ops)
            paired_difference(baseline, {t: [0.0] for t in prompt_texts(problems, a.instruction)})
        run = run_flags(a)
        records = grade(run.problems, run.texts, run.samples)
        summary = summarize(records, a.k, run.problems)
        if baseline is not None:
            summary["vs_baseline"] = {"baseline": str(a.baseline), **paired_difference(baseline, by_prompt(records))}
    except (EvalError, DataError, ValueError) as e:
        print(f"nanoseek eval: error: {e}", file=sys.stderr)
        return 2
    summary.update(task=a.task, model=str(a.model), temperature=a.temperature, top_p=a.top_p,
                   template=a.template, seconds=run.seconds, completions_per_s=len(records) / max(run.seconds, 1e-9))
    out = a.out or Path(a.model) / f"eval-{Path(a.task).stem}"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "samples.jsonl", records)
    write_json(out / "summary.json", summary)
    print(table(summary))
    print(f"wrote {out / 'samples.jsonl'} and {out / 'summary.json'}")
    return 0


def by_prompt(records: list[dict]) -> dict[str, list[float]]:
    """Problem prompt -> correctness of each of its samples (1.0 correct), the pairing key of --baseline."""
    out: dict[str, list[float]] = {}
    for r in records:
        out.setdefault(r["prompt"], []).append(float(r["correct"] >= 1.0))
    return out


def read_baseline(path: Path) -> dict[str, list[float]]:
    """The graded samples of an earlier `nanoseek eval` (OUT/samples.jsonl), grouped by problem."""
    file = path / "samples.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise EvalError(f"--baseline {path}: no samples.jsonl there (the output directory of an earlier nanoseek eval)")
    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--baseline {file}: cannot read it ({e.__class__.__name__}: {e})") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            records.append({"prompt": str(r["prompt"]), "correct": float(r["correct"])})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise EvalError(f"--baseline {file}:{i}: not a graded sample row ({e.__class__.__name__}: {e})") from None
    if not records:
        raise EvalError(f"--baseline {file}: no samples")
    return by_prompt(records)


def passkey_main(a) -> int:
    """--task passkey --context N: greedy retrieval of a key hidden at evenly spread depths."""
    try:
        if a.context is None or a.context < 64 or a.n < 1 or a.batch_size < 1:
            raise EvalError("--task passkey needs --context N (tokens, >= 64), --n >= 1 and --batch-size >= 1")
        model, tokenizer = load_model(a.model, a.tokenizer, a.device)
        summary, records = passkey.run(model, tokenizer, a.context, a.n, a.seed, batch_size=a.batch_size)
    except (EvalError, DataError, ValueError) as e:
        print(f"nanoseek eval: error: {e}", file=sys.stderr)
        return 2
    summary["model"] = str(a.model)
    out = a.out or Path(a.model) / f"eval-passkey-{a.context}"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "samples.jsonl", records)
    write_json(out / "summary.json", summary)
    depths = ", ".join(f"{k}: {v:.2f}" for k, v in summary["accuracy_by_depth"].items())
    print(f"passkey @ {a.context} tokens: accuracy {summary['accuracy']:.3f} over {summary['cases']} cases "
          f"(by depth {depths}); wrote {out / 'summary.json'}")
    return 0


def table(summary: dict) -> str:
    k = summary["k"]
    rows = [("task", summary["task"]), ("problems × samples", f"{summary['problems']} × {k}"),
            ("pass@1", f"{summary['pass@1']:.3f}"), (f"pass@{k}", f"{summary[f'pass@{k}']:.3f}"),
            (f"cons@{k}", "n/a" if summary[f"cons@{k}"] is None else f"{summary[f'cons@{k}']:.3f}"),
            ("format rate", f"{summary['format_rate']:.3f}"),
            ("mean completion tokens", f"{summary['mean_tokens']:.1f}"),
            ("hit max-new-tokens", str(summary["truncated"])),
            ("completions/s", f"{summary['completions_per_s']:.2f}")]
    if "vs_baseline" in summary:
        v = summary["vs_baseline"]
        rows.append(("pass@1 vs baseline", f"{v['before']:.3f} -> {v['after']:.3f}: {v['delta']:+.3f} ± {v['se']:.3f} "
                     f"(paired se over {v['problems']} problems; {v['up']} up, {v['down']} down)"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


if __name__ == "__main__":
    sys.exit(main())
