"""What a GRPO run leaves to look at: plots of its per-step metrics, tables of sample completions,
and report.md.

    grpo.png      reward (total and per function), accuracy and format rate; completion length
                  (mean, max, fraction truncated); KL to the reference and clip fractions
    plot_variants  several variants of a run (each a few seeds) side by side: reward, KL and clip
                  fraction per step, the seeds' mean and range (scripts/v32_refinements.py)
matplotlib is optional: without it the plots are skipped and report.md is still written.
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.train.report import smooth


def plot_grpo(records: list[dict], out: Path) -> list[str]:
    """Write grpo.png from the step records; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    recs = [r for r in records if r.get("kind") == "grpo"]
    if not recs:
        return []
    steps = [r["step"] for r in recs]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax = axes[0]
    ax.plot(steps, smooth(np.array([r["reward"] for r in recs])), label="reward (total)")
    for key in sorted({k for r in recs for k in r if k.startswith("rewards/")}):
        ax.plot(steps, smooth(np.array([r.get(key, np.nan) for r in recs])), lw=0.8, label=key)
    for key in ("accuracy", "format_rate"):
        if any(r.get(key) is not None for r in recs):
            ax.plot(steps, smooth(np.array([r.get(key) if r.get(key) is not None else np.nan for r in recs])),
                    "--", lw=1, label=key)
    ax.set_ylabel("mean per completion (smoothed)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(steps, [r["completion_length"] for r in recs], label="mean length")
    ax.plot(steps, [r["completion_length_max"] for r in recs], lw=0.6, label="max length")
    ax.set_ylabel("tokens")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["truncated"] for r in recs], color="gray", lw=0.6, label="fraction truncated")
    ax2.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    ax = axes[2]
    ax.plot(steps, [r["kl"] for r in recs], label="KL to reference (k3)")
    ax.plot(steps, [r["clip_ratio/region_mean"] for r in recs], label="clipped fraction")
    ax.plot(steps, [r["frac_reward_zero_std"] for r in recs], lw=0.6, label="zero-variance groups")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "grpo.png", dpi=110)
    plt.close(fig)
    return ["grpo.png"]


KEYS = (("reward", "reward (mean per completion)"), ("kl", "KL to the reference (k3)"),
        ("clip_ratio/region_mean", "clipped fraction"))


def plot_variants(variants: dict[str, list[list[dict]]], path: Path, title: str = "",
                  keys: tuple[tuple[str, str], ...] = KEYS) -> list[str]:
    """One PNG comparing variants: {name: [one seed's grpo step records, ...]} -> a panel per key, each
    variant's mean over seeds (line) and min-max range (band) per step, over the steps all seeds have."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True)
    for ax, (key, label) in zip(np.atleast_1d(axes), keys):
        for name, seeds in variants.items():
            n = min(len(s) for s in seeds)
            values = np.array([[r.get(key) or 0.0 for r in s[:n]] for s in seeds])  # [seeds, steps]
            steps = [r["step"] for r in seeds[0][:n]]
            line, = ax.plot(steps, values.mean(0), label=f"{name} ({len(seeds)} seeds)")
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes = np.atleast_1d(axes)
    axes[0].legend(fontsize=7)
    axes[-1].set_xlabel("step")
    if title:
        axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path.name]


def sample_table(step: int, rows: list[tuple[str, str, float]], width: int = 160) -> str:
    """A markdown table of (prompt, completion, reward) rows, cells flattened to one line."""
    def cell(text: str) -> str:
        text = text.replace("|", "\\|").replace("\n", " ⏎ ")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = [f"### step {step}", "", "| prompt | completion | reward |", "|---|---|---|"]
    lines += [f"| {cell(p)} | {cell(c)} | {r:.3f} |" for p, c, r in rows]
    return "\n".join(lines) + "\n\n"


def write_report(out: Path, title: str, table: dict, plots: list[str], samples: str) -> Path:
    """report.md: the run's key figures, its plots and the last sample table."""
    lines = [f"# {title}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in table.items()] + [""]
    lines += [f"![{p}]({p})\n" for p in plots]
    if samples:
        lines += ["## Samples (last table; all of them in samples.md)", "", samples]
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    return path
