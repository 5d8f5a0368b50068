"""The `nanoseek` command: one subcommand per pipeline stage, each a script in nanoseek/stages/.

    nanoseek prepare   tokenize a corpus into training shards (+ tokenizer)
    nanoseek train     pre-train (MTP + balanced MoE) with exact resume
    nanoseek generate  prompt, batch-file or interactive generation
    nanoseek serve     OpenAI-compatible server with a web chat page
    nanoseek init      write a randomly initialised model (a preset + overrides)
    nanoseek sft       supervised fine-tuning on chat data (loss on assistant turns, packed rows)
    nanoseek eval      pass@1 / pass@k / cons@k on a verifiable task, on the inference engine
    nanoseek sample    rejection sampling: completions the reward accepts, as chat JSONL
    nanoseek convert   FP8 <-> BF16/FP32 checkpoint conversion on CPU: fp8-to-bf16 | to-fp8
    nanoseek grpo      GRPO with rule rewards, rollouts on the engine (R1 / R1-Zero reasoning RL)
    nanoseek rm        reward model: a score head trained on preference pairs (Bradley–Terry)
    nanoseek bench     benchmarks against transformers: train | decode | serve

Each stage parses its own flags (`nanoseek STAGE --help`). Stages are imported only when run, so
`nanoseek train` does not pay for the web server's imports.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import signal
import sys

STAGES = {
    "prepare": ("nanoseek.stages.prepare", "tokenize a corpus into training shards (+ tokenizer)"),
    "train": ("nanoseek.stages.train", "pre-train (MTP + balanced MoE) with exact resume"),
    "generate": ("nanoseek.stages.generate", "prompt, batch-file or interactive generation"),
    "serve": ("nanoseek.stages.serve", "OpenAI-compatible server with a web chat page"),
    "init": ("nanoseek.stages.init", "write a randomly initialised model (preset + overrides)"),
    "sft": ("nanoseek.stages.sft", "supervised fine-tuning on chat JSONL (assistant-only loss, packed)"),
    "eval": ("nanoseek.stages.eval", "pass@1 / pass@k / cons@k on a verifiable task (R1 protocol)"),
    "sample": ("nanoseek.stages.sample", "rejection sampling to chat JSONL (R1 traces, distillation data)"),
    "convert": ("nanoseek.stages.convert", "FP8 <-> BF16/FP32 checkpoint conversion on CPU (streaming)"),
    "plan-experts": ("nanoseek.stages.plan_experts", "expert placement with redundant copies from logged loads (EPLB)"),
    "grpo": ("nanoseek.stages.grpo", "GRPO with rule rewards on the engine (R1 / R1-Zero reasoning RL)"),
    "rm": ("nanoseek.stages.rm", "reward model on preference pairs (Bradley–Terry, transformers' layout)"),
}
BENCHES = {
    "train": "nanoseek.bench.train",
    "decode": "nanoseek.bench.decode",
    "serve": "nanoseek.bench.serve",
    "balance": "nanoseek.bench.balance",
    "fp8": "nanoseek.bench.fp8",
    "dsa": "nanoseek.bench.dsa",
    "parallel": "nanoseek.bench.parallel",
    "combine": "nanoseek.bench.combine",
    "sft": "nanoseek.bench.sft",
    "grpo": "nanoseek.bench.grpo",
    "rm": "nanoseek.bench.rm",
}


def int_in(lo: int, hi: int = 2**63 - 1):
    """An argparse `type=` for integers in [lo, hi]: `--keep-last -1` is refused in the user's words
    ("argument --keep-last: must be an integer >= 0, got -1"), never replaced by a default."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            bound = f">= {lo}" if hi == 2**63 - 1 else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text}")
        return value
    return parse


def float_in(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False):
    """An argparse `type=` for finite floats in a range (open or closed at either end)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
            parts = [f"{'>' if lo_open else '>='} {lo:g}" if lo > -math.inf else "",
                     f"{'<' if hi_open else '<='} {hi:g}" if hi < math.inf else ""]
            raise argparse.ArgumentTypeError(f"must be a number {' and '.join(x for x in parts if x) or 'finite'}, "
                                             f"got {text}")
        return value
    return parse


def usage() -> str:
    lines = ["usage: nanoseek STAGE [flags]   (nanoseek STAGE --help for its flags)", "", "stages:"]
    lines += [f"  {name:<14}{desc}" for name, (_, desc) in STAGES.items()]
    lines += [f"  {'bench':<14}benchmarks against transformers: {' | '.join(BENCHES)}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage == "bench":
        if not rest or rest[0] not in BENCHES:
            print(f"usage: nanoseek bench {{{','.join(BENCHES)}}} [flags]", file=sys.stderr)
            return 2
        module = BENCHES[rest[0]]
        rest = rest[1:]
    elif stage in STAGES:
        module = STAGES[stage][0]
    else:
        print(f"nanoseek: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(module).main(rest) or 0


def run() -> None:
    """The process entry point (the `nanoseek` script, `python -m nanoseek`): `main()`, then exit.

    A stage's run handles Ctrl-C itself (finish the step, save). A signal that arrives once the stage
    has returned — a second Ctrl-C while the interpreter tears torch down, whose atexit hooks would
    print a traceback — exits at once with the stage's code: its work is already saved. One that
    escapes a stage's own handling (KeyboardInterrupt) ends the process with one line and 130."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("nanoseek: interrupted", file=sys.stderr)
        code = 130
    for stream in (sys.stdout, sys.stderr):  # what the stage printed is out before any early exit
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os._exit(code))
    sys.exit(code)


if __name__ == "__main__":
    run()
