"""Step time of each parallel layout at 1, 2 and 4 processes, same model and global batch; all-to-all bytes.

    nanoseek bench parallel                                   # tiny preset, all layouts
    nanoseek bench parallel --layouts 1 fsdp2 ep2 --steps 5 --batch-size 16 --micro-batch 2

Each layout runs in its own gloo (CPU) or NCCL (GPU) process group, launched with torchrun, on
random tokens: `--warmup` steps, then `--steps` timed optimizer steps (forward, backward,
gradient reduction, AdamW, bias update), the best and the range over steps reported by rank 0.

On a CPU with few cores every extra process shares the same cores: this measures the *overhead*
of each layout (collectives, all-to-all bookkeeping, pipeline bubbles), not a speed-up.

All-to-all: the rows each rank actually sent to other EP ranks in the last step (dispatch; combine
returns as many, and the backward moves both again), against the uniform-routing formula
4 · tokens · K · (1 − 1/ep) · hidden · 4 bytes per MoE layer per micro-batch (nanoseek/parallel/expert.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch

# name: (world size, pp, dp_shard, ep, schedule)
LAYOUTS = {
    "1": (1, 1, 1, 1, None),
    "fsdp2": (2, 1, 2, 1, None),
    "ep2": (2, 1, 1, 2, None),
    "pp2-1f1b": (2, 2, 1, 1, "1f1b"),
    "pp2-dualpipev": (2, 2, 1, 1, "dualpipev"),
    "fsdp4": (4, 1, 4, 1, None),
    "ep2xfsdp2": (4, 1, 2, 2, None),
    "ep4": (4, 1, 1, 4, None),
    "pp2xep2": (4, 2, 1, 2, "1f1b"),
}


def worker(cfg: dict) -> dict:
    """One rank of one layout (under torchrun): time cfg["steps"] optimizer steps."""
    from nanoseek.model import Transformer, preset
    from nanoseek.model.args import parse_overrides
    from nanoseek.parallel import build_mesh, check_layout, init_distributed, parallelize
    from nanoseek.parallel.expert import ExpertParallel, a2a_bytes_per_layer
    from nanoseek.parallel.parallelize import a2a_rows
    from nanoseek.parallel.step import train_step

    d = init_distributed(cfg["device"])
    _, pp, dp_shard, ep, schedule = LAYOUTS[cfg["layout"]]
    args = preset(cfg["preset"], **parse_overrides(cfg["overrides"]))
    layout = check_layout(d.world_size, dp_shard, ep, pp, args, cfg["micro"], cfg["batch"])
    mesh = build_mesh(layout, d)
    torch.manual_seed(0)
    model = Transformer(args).to(d.device)
    bf16 = d.device.type == "cuda"
    if pp > 1:
        from nanoseek.parallel.pipeline import build_pipeline

        pipe = build_pipeline(model, mesh, cfg["micro"], cfg["seq"], schedule=schedule, bf16=bf16,
                              n_microbatches=cfg["batch"] // layout.dp // cfg["micro"], mtp_lambda=0.3, seq_alpha=1e-4)
        model = pipe.module
    else:
        parallelize(model, mesh, bf16=bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    rows = cfg["batch"] // layout.dp
    gen = torch.Generator().manual_seed(0)
    times, sent = [], 0
    for step in range(cfg["warmup"] + cfg["steps"]):
        ids = torch.randint(0, args.vocab_size, (cfg["batch"], cfg["seq"] + 1), generator=gen)
        ids = ids[dp_rank * rows:(dp_rank + 1) * rows].to(d.device)
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        before = a2a_rows(model)
        if pp > 1:
            pipe.step(ids[:, :-1], ids[:, 1:], optimizer, gamma=1e-3)
        else:
            micro = [(x[:, :-1], x[:, 1:]) for x in ids.split(cfg["micro"])]
            train_step(model, optimizer, micro, mtp_lambda=0.3, seq_alpha=1e-4, gamma=1e-3)
        sent = a2a_rows(model) - before
        if d.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - t0)
    # the MoE layers this rank holds (with a pipeline: its stages' only; rank 0 reports)
    moe_layers = sum(isinstance(m, ExpertParallel) for m in model.modules()) if ep > 1 else 0
    elem = 2 if bf16 else 4
    formula = moe_layers * (rows // cfg["micro"]) * a2a_bytes_per_layer(
        cfg["micro"] * cfg["seq"], args.num_experts_per_tok, args.hidden_size, ep, elem) if ep > 1 else 0.0
    return {"layout": cfg["layout"], "world": d.world_size, "best_s": min(times), "max_s": max(times),
            "median_s": sorted(times)[len(times) // 2], "tokens": cfg["batch"] * cfg["seq"],
            "a2a_bytes_measured": 4 * sent * args.hidden_size * elem, "a2a_bytes_formula": formula}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: dict, timeout: float) -> dict:
    """One layout under torchrun; returns rank 0's JSON line."""
    world = LAYOUTS[cfg["layout"]][0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "nanoseek.bench.parallel", "--worker", json.dumps(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"layout {cfg['layout']} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek bench parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--batch-size", type=int, default=16, help="global sequences per step, every layout")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per forward, per rank")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (1: the single-process "
                   "baseline uses one core; more threads than free cores make CPU timings erratic)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per layout")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        res = worker(json.loads(a.worker))
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(res), flush=True)
        from nanoseek.parallel import shutdown

        shutdown()
        return 0
    for flag in ("batch_size", "micro_batch", "seq_len", "steps", "threads"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    cfg = {"preset": a.preset, "overrides": a.overrides, "batch": a.batch_size, "micro": a.micro_batch,
           "seq": a.seq_len, "steps": a.steps, "warmup": a.warmup, "device": a.device, "threads": a.threads}
    print(f"{a.preset} preset, global batch {a.batch_size} x {a.seq_len} tokens, micro-batch {a.micro_batch} per rank, "
          f"best of {a.steps} steps after {a.warmup} warm-up; {a.threads} thread(s) per process, {os.cpu_count()} CPU cores"
          f"{'' if torch.cuda.is_available() else ': more processes share the same cores (overhead, not speed-up)'}")
    print(f"{'layout':<15}{'ranks':>6}{'step s (best)':>15}{'range':>17}{'tokens/s':>10}{'vs 1':>7}"
          f"{'a2a MB/rank measured':>22}{'formula':>9}")
    base = None
    for name in a.layouts:
        try:
            r = launch({**cfg, "layout": name}, a.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"{name:<15} failed: {str(e).splitlines()[0]}")
            continue
        base = base or (r["best_s"] if name == "1" else None)
        rel = f"{r['best_s'] / base:.2f}x" if base else "n/a"
        mb = (f"{r['a2a_bytes_measured'] / 1e6:>22.2f}{r['a2a_bytes_formula'] / 1e6:>9.2f}"
              if r["a2a_bytes_formula"] else f"{'-':>22}{'-':>9}")
        print(f"{name:<15}{r['world']:>6}{r['best_s']:>15.3f}{r['best_s']:>8.3f}-{r['max_s']:<8.3f}"
              f"{r['tokens'] / r['best_s']:>10,.0f}{rel:>7}{mb}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
