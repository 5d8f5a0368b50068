"""Plan where experts live for expert-parallel serving, from the loads a run recorded (EPLB).

    nanoseek plan-experts --loads runs/tiny/metrics.jsonl --gpus 4 --nodes 2 --replicas 4
    nanoseek plan-experts --loads loads.json --gpus 32 --nodes 4 --replicas 32 --groups 8 --out plan.json

--loads is a training run's metrics.jsonl (the `load` field of its train records: per MoE layer,
each expert's share of the routed tokens; the last --last records are summed) or a JSON file
holding {"load": [[...], ...]} ([layers][experts], any non-negative measure, e.g. token counts).
The expert groups (hierarchical placement) come from --groups, or else from the run's checkpoint
config (n_group) next to metrics.jsonl. See nanoseek/parallel/eplb.py for the algorithm.

Prints each layer's max/mean GPU load for the plain layout (E/G consecutive experts per GPU) and
for the plan, and writes the plan as JSON (default: next to the loads, expert_plan.json):
{"gpus", "nodes", "replicas", "hierarchical", "slots_per_gpu", "layers": [{"phy2log": [...],
"logcnt": [...], "log2phy": [[...], ...]}], "max_mean_before": [...], "max_mean_after": [...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from nanoseek.parallel.eplb import gpu_loads, identity_placement, imbalance, plan


def read_loads(path: Path, last: int | None) -> torch.Tensor:
    """[L, E] loads from a metrics.jsonl or a {"load": ...} JSON file; ValueError names the problem."""
    if not path.is_file():
        raise ValueError(f"--loads {path}: no such file")
    text = path.read_text()
    rows = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if n == len(text.splitlines()):
                    continue  # a torn last line of a run that is still writing
                raise ValueError(f"{path}:{n}: not valid JSON") from None
            if isinstance(rec, dict) and rec.get("kind", "train") == "train" and rec.get("load"):
                rows.append(rec["load"])
        if not rows:
            raise ValueError(f"{path}: no train records with a `load` field (was the model a MoE?)")
        rows = rows[-last:] if last else rows
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        rows = [data.get("load") if isinstance(data, dict) else data]
    try:
        loads = torch.tensor(rows, dtype=torch.float64).sum(dim=0)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{path}: loads must be [layers][experts] numbers, the same shape in every record") from None
    if loads.dim() == 1:
        loads = loads[None]
    if loads.dim() != 2 or loads.shape[1] < 1:
        raise ValueError(f"{path}: loads must be [layers][experts], got shape {list(loads.shape)}")
    return loads


def groups_from_run(path: Path) -> int | None:
    """n_group of the run's latest checkpoint (metrics.jsonl sits in the run directory)."""
    ckpts = path.parent / "checkpoints"
    latest = ckpts / "latest"
    if not latest.is_file():
        return None
    config = ckpts / latest.read_text().strip() / "config.json"
    try:
        return int(json.loads(config.read_text()).get("n_group") or 1)
    except (OSError, ValueError, TypeError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek plan-experts", description=__doc__.split("\n\n")[0])
    p.add_argument("--loads", required=True, type=Path, help="metrics.jsonl of a run, or a JSON {\"load\": [[...]]}")
    p.add_argument("--gpus", required=True, type=int, help="GPUs the experts are spread over (G)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are in (hierarchical when it divides --groups)")
    p.add_argument("--replicas", type=int, default=0, help="redundant expert copies in total (R; V3 prefill: 32)")
    p.add_argument("--groups", type=int, help="expert groups (default: n_group of the run's checkpoint, else 1)")
    p.add_argument("--last", type=int, help="sum only the last N train records (default: all)")
    p.add_argument("--out", type=Path, help="plan JSON (default: expert_plan.json next to --loads)")
    a = p.parse_args(argv)
    for flag in ("gpus", "nodes", "groups", "last"):
        v = getattr(a, flag)
        if v is not None and v < 1:
            p.error(f"--{flag} must be >= 1")
    if a.replicas < 0:
        p.error("--replicas must be >= 0")
    try:
        loads = read_loads(a.loads, a.last)
        groups = a.groups or groups_from_run(a.loads) or 1
        L, E = loads.shape
        placement = plan(loads, a.replicas, a.gpus, a.nodes, groups)
        before = imbalance(gpu_loads(loads, identity_placement(L, E, a.gpus))) if E % a.gpus == 0 else None
    except ValueError as e:
        print(f"nanoseek plan-experts: error: {e}", file=sys.stderr)
        return 2
    after = imbalance(gpu_loads(loads, placement))
    slots = (E + a.replicas) // a.gpus
    kind = "hierarchical (groups packed to nodes first)" if placement.hierarchical else "global"
    print(f"{L} MoE layers x {E} experts + {a.replicas} replicas on {a.gpus} GPUs in {a.nodes} node(s), "
          f"{slots} slots per GPU, {groups} groups: {kind}")
    print(f"{'layer':>5}  {'max/mean before':>15}  {'max/mean after':>14}  copies of the busiest expert")
    for i in range(L):
        b = f"{before[i]:.3f}" if before is not None else "n/a"
        print(f"{i:>5}  {b:>15}  {after[i]:.3f}{'':>9}  {int(placement.logcnt[i, loads[i].argmax()])}")
    b = f"{before.mean():.3f}" if before is not None else "n/a"
    print(f"{'mean':>5}  {b:>15}  {after.mean():.3f}")
    log2phy = placement.log2phy()
    doc = {"gpus": a.gpus, "nodes": a.nodes, "replicas": a.replicas, "groups": groups,
           "hierarchical": placement.hierarchical, "slots_per_gpu": slots,
           "layers": [{"phy2log": placement.phy2log[i].tolist(), "logcnt": placement.logcnt[i].tolist(),
                       "log2phy": log2phy[i]} for i in range(L)],
           "max_mean_before": before.tolist() if before is not None else None, "max_mean_after": after.tolist()}
    out = a.out or a.loads.parent / "expert_plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
