"""Load-balancing ablation on the tiny preset: same data, same steps, same seed, three recipes.

    nanoseek prepare --out runs/tiny/data                     # once
    nanoseek bench balance --data runs/tiny/data --out runs/bench-balance [--steps 300]

Arms (each a `nanoseek train` run in its own process):
    none       no balancing at all (γ = 0, α = 0)
    aux-loss   the classic batch-wide auxiliary loss only (α_aux = 0.01, DeepSeek-V2/GShard style)
    loss-free  V3: aux-loss-free bias updates (γ) + the tiny sequence-wise loss (α = 1e-4)

Reported per arm: MaxVio_batch (per training batch, the mean over the last 10% of steps and over
MoE layers, MTP included), MaxVio on the validation set (all validation tokens at once, the
"global" figure of Wang et al. 2024), and the final validation loss / bits per byte. Writes
OUT/ablation.jsonl, OUT/maxvio_ablation.png and OUT/ablation.md next to each arm's run directory.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from nanoseek.train.metrics import read_jsonl
from nanoseek.train.report import smooth

ARMS = {
    "none": ["--bias-gamma", "0", "--seq-alpha", "0", "--aux-alpha", "0"],
    "aux-loss": ["--bias-gamma", "0", "--seq-alpha", "0", "--aux-alpha", "0.01"],
    "loss-free": ["--seq-alpha", "1e-4", "--aux-alpha", "0"],  # γ from --gamma below
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek bench balance", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("runs/tiny/data"), help="a `nanoseek prepare` output dir")
    p.add_argument("--out", type=Path, default=Path("runs/bench-balance"))
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per arm")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gamma", type=float, default=3e-3,
                   help="bias speed of the loss-free arm (V3's 0.001 is tuned for 14.8T tokens; at 150 steps it "
                        "lags the fast-moving router: MaxVio 0.50 vs 0.15 with 0.003 and 0.23 with 0.01)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    a = p.parse_args(argv)
    if not (a.data / "meta.json").exists():
        p.error(f"--data {a.data}: no prepared dataset there (run `nanoseek prepare --out {a.data}`)")

    rows = []
    for arm in a.arms:
        out = a.out / arm
        cmd = [sys.executable, "-m", "nanoseek.stages.train", "--data", str(a.data), "--out", str(out),
               "--preset", "tiny", "--steps", str(a.steps), "--batch-size", str(a.batch_size),
               "--batch-start", str(a.batch_size), "--eval-every", "0", "--samples", "0", "--quiet",
               *[f"--set={s}" for s in a.overrides], *ARMS[arm]]
        if arm == "loss-free":
            cmd += ["--bias-gamma", str(a.gamma)]
        shutil.rmtree(out, ignore_errors=True)  # an arm from an earlier invocation is redone
        print(f"--- {arm}: {' '.join(cmd[3:])}", flush=True)
        subprocess.run(cmd, check=True)
        s = json.loads((out / "summary.json").read_text())
        rows.append({"arm": arm, "maxvio_batch": s["maxvio_batch_mean"], "maxvio_batch_layers": s["maxvio_batch"],
                     "val_maxvio": sum(s["val_maxvio"]) / len(s["val_maxvio"]), "val_loss": s["final_val_loss"],
                     "val_bpb": s["final_val_bpb"], "steps": s["steps"], "tokens": s["tokens"]})

    header = f"{'arm':<12}{'MaxVio_batch':>14}{'MaxVio_val':>12}{'val loss':>10}{'val bpb':>9}"
    lines = [header] + [f"{r['arm']:<12}{r['maxvio_batch']:>14.3f}{r['val_maxvio']:>12.3f}{r['val_loss']:>10.4f}"
                        f"{r['val_bpb']:>9.3f}" for r in rows]
    print(f"\nbalance ablation: tiny preset, {rows[0]['steps']} steps, {rows[0]['tokens']:,} tokens per arm")
    print("\n".join(lines))
    with open(a.out / "ablation.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    md = ["# Balance ablation (tiny preset)", "",
          f"{rows[0]['steps']} steps, {rows[0]['tokens']:,} tokens per arm, same data order and seed. MaxVio_batch: "
          "mean over the last 10% of training batches and over MoE layers (MTP included); MaxVio_val: over all "
          "validation tokens at once.", "",
          "| arm | MaxVio_batch | MaxVio_val | val loss | val bits/byte |", "|---|---|---|---|---|"]
    md += [f"| {r['arm']} | {r['maxvio_batch']:.3f} | {r['val_maxvio']:.3f} | {r['val_loss']:.4f} | {r['val_bpb']:.3f} |"
           for r in rows]
    if plot(a.out, a.arms):
        md += ["", "![MaxVio_batch per arm](maxvio_ablation.png)"]
    (a.out / "ablation.md").write_text("\n".join(md) + "\n")
    print(f"wrote {a.out / 'ablation.md'}")
    return 0


def plot(out: Path, arms: list[str]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for arm in arms:
        recs = [r for r in read_jsonl(out / arm / "metrics.jsonl") if r["kind"] == "train" and "maxvio" in r]
        vio = [sum(r["maxvio"]) / len(r["maxvio"]) for r in recs]
        ax.plot([r["step"] for r in recs], smooth(np.array(vio)), label=arm)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MaxVio_batch (mean over layers, smoothed)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "maxvio_ablation.png", dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
