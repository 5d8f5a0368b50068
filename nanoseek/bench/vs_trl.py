"""What `bench sft` and `bench rm` share: a nanoseek stage against a TRL trainer, same model and data,
taking turns in one run.

    a = parse_args(parser, argv)                      # --preset --set --steps --warmup --rounds --threads --out
    peer_setup(a, "sft")                              # TRL present? quiet transformers, threads
    res = take_turns({"nanoseek": run_ours, "TRL": run_theirs}, a.rounds)
    print_table(res, "tokens/s (best)")

Timing rules (both benches): the first --warmup steps of every run are not timed; a run's figure is
its timed tokens / its timed step seconds; each side's best run counts, with the range over runs
(interference on a shared machine only ever slows a run down). TRL's step time is from
`on_step_begin` to `on_step_end` (forward, backward, update), its tokens counted by a forward
pre-hook on the model; nanoseek's come from its own metrics.jsonl (`step_s` per step).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path
from typing import Callable

import torch

from nanoseek.model import PRESETS


def parse_args(p: argparse.ArgumentParser, argv, positive: tuple[str, ...] = ()) -> argparse.Namespace:
    """Add the shared flags to p, parse argv, check ranges (--steps, --rounds and `positive` >= 1)."""
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=3, help="runs per peer, taking turns; the best counts")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path, help="append the results as one JSON line here")
    a = p.parse_args(argv)
    for name in ("steps", "rounds", *positive):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= a.warmup < a.steps:
        p.error("--warmup must be in [0, --steps)")
    return a


def peer_setup(a, bench: str):
    """Exit with one line if TRL is missing; quiet transformers; set --threads. Returns transformers."""
    try:
        import trl  # noqa: F401  (the peer: pip install trl)
    except ImportError:
        raise SystemExit(f"nanoseek bench {bench}: needs TRL (pip install trl), a bench-only dependency") from None
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.threads:
        torch.set_num_threads(a.threads)
    return transformers


def run_stage(main: Callable[[list[str]], int], flags: list, warmup: int, what: str) -> list[dict]:
    """Run a nanoseek stage's main() with its stdout silenced; its train records after the warm-up."""
    from nanoseek.train.metrics import read_jsonl

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        code = main([str(f) for f in flags])
    if code != 0:
        raise SystemExit(f"nanoseek bench {what}: the nanoseek run failed (exit {code})")
    out = Path(flags[flags.index("--out") + 1])
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"][warmup:]


def trl_tokens_per_s(trainer, model, count: Callable[[dict], int], warmup: int) -> float:
    """Train a TRL trainer (built with max_steps) timing each step; tokens per forward = count(kwargs)."""
    from transformers import TrainerCallback

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Clock())
    hook = model.register_forward_pre_hook(lambda m, args, kw: tokens.append(count(kw)), with_kwargs=True)
    try:
        trainer.train()
    finally:
        hook.remove()
    return sum(tokens[warmup:len(times)]) / sum(times[warmup:])


def take_turns(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each run once per round, in turn: {name: [figure per round]}."""
    res: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            res[name].append(run())
    return res


def print_table(res: dict[str, list[float]], unit: str, width: int = 30) -> None:
    """Best figure and range per side."""
    print(f"{'':<{width}}{unit:>16}{'range':>22}")
    for name, xs in res.items():
        print(f"{name:<{width}}{max(xs):>16,.0f}{f'{min(xs):,.0f} - {max(xs):,.0f}':>22}")
