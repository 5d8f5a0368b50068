"""End-of-run report: PNG plots from metrics.jsonl and a short report.md.

    loss.png         train loss, MTP loss and validation loss against tokens; learning rate below
    expert_load.png  per MoE layer, each expert's share of the load over time (1.0 = its fair share)
    maxvio.png       MaxVio_batch per MoE layer over time

matplotlib is an optional dependency (`extras`); without it the plots are skipped with a note and
report.md is still written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_run(records: list[dict], out: Path) -> list[str]:
    """Write the three PNGs into `out`; returns the file names written (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    train = [r for r in records if r.get("kind") == "train" and not r.get("skipped")]
    val = [r for r in records if r.get("kind") == "val"]
    if not train:
        return []
    written = []

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    tokens = np.array([r["tokens"] for r in train]) / 1e6
    ax.plot(tokens, [r["loss"] for r in train], lw=0.8, label="train (next token)")
    if any(r.get("mtp_loss") for r in train):
        ax.plot(tokens, [r["mtp_loss"] for r in train], lw=0.8, alpha=0.7, label="train (MTP depth 1+)")
    if val:
        ax.plot(np.array([r["tokens"] for r in val]) / 1e6, [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(tokens, [r["lr"] for r in train], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("tokens (M)")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    written.append("loss.png")

    loads = [r["load"] for r in train if r.get("load")]
    if loads:
        load = np.array(loads)  # [steps, layers, experts], fractions of tokens
        steps = [r["step"] for r in train if r.get("load")]
        n_layers, n_experts = load.shape[1], load.shape[2]
        fig, axes = plt.subplots(n_layers, 1, figsize=(9, 1.2 + 1.1 * n_layers), sharex=True, squeeze=False)
        for i, a in enumerate(axes[:, 0]):
            im = a.imshow((load[:, i, :] * n_experts).T, aspect="auto", cmap="coolwarm", vmin=0, vmax=2,
                          extent=(steps[0], steps[-1], n_experts - 0.5, -0.5), interpolation="nearest")
            a.set_ylabel(f"MoE {i}\nexpert", fontsize=8)
        axes[-1, 0].set_xlabel("step")
        fig.colorbar(im, ax=axes[:, 0].tolist(), label="load / fair share")
        fig.suptitle("expert load over training (MoE layers, MTP last)")
        fig.savefig(out / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append("expert_load.png")

        vio = np.array([r["maxvio"] for r in train if r.get("load")])
        fig, ax = plt.subplots(figsize=(8, 4))
        for i in range(vio.shape[1]):
            ax.plot(steps, smooth(vio[:, i]), lw=1, label=f"MoE layer {i}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio_batch (smoothed)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(out / "maxvio.png", dpi=110)
        plt.close(fig)
        written.append("maxvio.png")
    return written


def write_report(out: Path, summary: dict, plots: list[str], samples: list[tuple[str, str]],
                 title: str = "nanoseek pre-training run") -> Path:
    """report.md: the run's key figures, its plots and a few samples. Returns its path."""
    lines = [f"# {title}: {summary['preset']}", ""]
    lines += ["| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["table"].items()]
    lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    if samples:
        lines += ["## Samples", ""]
        for prompt, text in samples:
            lines += [f"**{prompt}**", "", "```", text, "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def smooth(x: np.ndarray, window: int = 10) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), same length as x."""
    if len(x) < window:
        return x
    kernel = np.ones(window) / window
    head = np.array([x[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(x, kernel, mode="valid")])
