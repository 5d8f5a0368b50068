"""DeepSeek-V3.2's GRPO refinements as curves: the tiny recipe with and without each flag, a few seeds.

    python scripts/v32_refinements.py                          # RUN=runs/v32, 3 seeds, 20 steps
    python scripts/v32_refinements.py --seeds 0 1 --steps 20 --out runs/v32b
    python scripts/v32_refinements.py --plot-only --out runs/v32 --results results/v32_refinements

Each variant is `nanoseek grpo` from the same random `tiny` model (2 layers, a 320-id BPE over the
prompts), 1-digit arithmetic prompts, a learnable reward (`digit_share` below: the share of digit
characters in the completion; a random model cannot earn accuracy), P 4 × G 6 completions of at
most 12 tokens, β 0.04, lr 5e-4, one thread per run. The setting is chosen so that the flags can
matter: μ = 2 passes over each batch of rollouts in 2 minibatches (`--num-iterations 2
--steps-per-generation 2`: 4 optimizer steps per batch, all but the first off-policy, with a high
lr moving the policy between rollout and update), top-p 0.8 (a truncated sampler). Variants: baseline, `--unbiased-kl`,
`--off-policy-mask 0.02`, `--keep-sampling-mask`. The seed (`--seed`) varies the sampling and the
prompt order; the starting model is the same for all runs.

Writes RUN/<variant>-s<seed>/ (each a normal grpo run dir) and, in --results, one PNG per flag:
reward, KL to the reference and clipped fraction per step (and the masked share for the masking
flag), the seeds' mean (line) and range (band), baseline beside the flag
(`nanoseek.rl.report.plot_variants`), plus summary.json: per variant and seed, the means over the
first and the last fifth of the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "baseline": [],
    "unbiased-kl": ["--unbiased-kl"],
    "off-policy-mask": ["--off-policy-mask", "0.02"],
    "keep-sampling-mask": ["--keep-sampling-mask"],
}


def digit_share(prompt: str, completion: str, answer: str) -> float:
    """The share of digit characters in the completion (0 for an empty one): a reward a random model can learn."""
    return sum(c.isdigit() for c in completion) / max(len(completion), 1)


def setup(run: Path) -> Path:
    """The tokenizer and the random tiny model every variant starts from (made once)."""
    import torch

    from nanoseek.data import train_bpe
    from nanoseek.model import Transformer, preset
    from nanoseek.rl.tasks import arithmetic

    model = run / "model"
    if (model / "config.json").is_file():
        return model
    problems = arithmetic(200, seed=0, digits=1)
    tok = train_bpe([p.prompt + " " + p.answer for p in problems] + ["0123456789 " * 8], vocab_size=320)
    torch.manual_seed(0)
    args = preset("tiny", num_hidden_layers=2, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                  eos_token_id=tok.eos_id, num_nextn_predict_layers=0)
    Transformer(args).save_pretrained(model)
    tok.save(model)
    return model


def run_variant(model: Path, out: Path, flags: list[str], seed: int, steps: int) -> None:
    if (out / "summary.json").is_file():
        return
    cmd = [sys.executable, "-m", "nanoseek", "grpo", "--model", str(model), "--out", str(out), "--task", "arithmetic",
           "--digits", "1", "--n-problems", "200", "--reward", "v32_refinements:digit_share=1", "--steps", str(steps),
           "--prompts-per-step", "4", "--num-generations", "6", "--max-completion-length", "12", "--temperature", "1",
           "--top-p", "0.8", "--lr", "5e-4", "--beta", "0.04", "--num-iterations", "2", "--steps-per-generation", "2",
           "--seed", str(seed), "--device", "cpu", "--sample-every", "0", "--quiet", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts"),
                                                        os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/v32"), help="run directory")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "v32_refinements", help="PNGs and summary.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--plot-only", action="store_true", help="plot the runs already in --out")
    a = p.parse_args(argv)
    from nanoseek.rl.report import KEYS, plot_variants
    from nanoseek.train.metrics import read_jsonl

    if not a.plot_only:
        model = setup(a.out)
        for seed in a.seeds:
            for name, flags in VARIANTS.items():
                print(f"{name} seed {seed}", flush=True)
                run_variant(model, a.out / f"{name}-s{seed}", flags, seed, a.steps)
    runs = {name: [[r for r in read_jsonl(d / "metrics.jsonl") if r.get("kind") == "grpo"]
                   for d in sorted(a.out.glob(f"{name}-s*")) if (d / "summary.json").is_file()]
            for name in VARIANTS}
    a.results.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, seeds in runs.items():
        if not seeds:
            continue
        n = min(len(s) for s in seeds)
        tail = max(1, n // 5)
        summary[name] = {"seeds": len(seeds), "steps": n, **{
            f"{key}_{part}": [sum(r[key] for r in s[sl]) / len(s[sl]) for s in seeds]
            for key in ("reward", "kl", "clip_ratio/region_mean", "off_policy_masked")
            for part, sl in (("first", slice(0, tail)), ("last", slice(n - tail, n)))}}
    for name in list(VARIANTS)[1:]:
        if runs[name] and runs["baseline"]:
            extra = (("off_policy_masked", "sequences masked (share)"),) if name == "off-policy-mask" else ()
            written = plot_variants({"baseline": runs["baseline"], name: runs[name]}, a.results / f"{name}.png",
                                    title=f"--{name} vs baseline (tiny GRPO, μ 2 × 2 minibatches, top-p 0.8; "
                                          f"seeds: mean and range)", keys=KEYS + extra)
            print("wrote", written)
    (a.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary.items():
        print(f"{name:<20} reward first {_fmt(s['reward_first'])} -> last {_fmt(s['reward_last'])}  "
              f"kl last {_fmt(s['kl_last'])}  clip last {_fmt(s['clip_ratio/region_mean_last'])}  "
              f"masked last {_fmt(s['off_policy_masked_last'])}")
    return 0


def _fmt(xs: list[float]) -> str:
    return f"{sum(xs) / len(xs):.4f} [{min(xs):.4f}, {max(xs):.4f}]"


if __name__ == "__main__":
    sys.exit(main())
