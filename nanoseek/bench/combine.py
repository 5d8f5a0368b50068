"""Sharded inference's MoE combine: one all-reduce against an all-to-all dispatch + combine.

    nanoseek bench combine                         # 2 ranks, small and DeepSeek-V3 widths, decode and prefill sizes
    nanoseek bench combine --ranks 2 --tokens 1 16 64 512 --iters 20

What nanoseek/parallel/inference.py does per MoE layer: hidden states are replicated on every rank
(attention is head-parallel), each rank runs its own experts on the tokens routed to them, and one
all_reduce of [tokens, hidden] sums the partial outputs. The alternative is expert parallelism's
all-to-all (nanoseek/parallel/expert.py, what training uses): each rank owns tokens/N of the tokens
(data-parallel attention), sends each token's K expert copies to the experts' ranks and gets them back:
an all_to_all of the per-rank counts (the split sizes must reach the host: a sync), then dispatch and
combine, K·tokens/N·(1 − 1/N) rows each way per rank for uniform routing. Expert compute is the same
in both and not timed; only the collectives and their bookkeeping are. Each case runs under torchrun
(gloo on CPU, NCCL on GPU); rank 0 reports the best and the range of `--iters` timed calls.

On a CPU with few cores the ranks share the cores: these are latencies of local gloo collectives,
which is what a CPU run of the sharded engine pays, not a network figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

# name: (hidden_size, n_routed_experts, num_experts_per_tok)
WIDTHS = {"small": (512, 32, 4), "v3": (7168, 256, 8)}


def worker(cfg: dict) -> list[dict]:
    """One rank: time all_reduce and all-to-all for every (width, tokens) case."""
    import torch.distributed as dist

    from nanoseek.parallel import init_distributed

    d = init_distributed(cfg["device"])
    N, rank = d.world_size, d.rank
    dtype = torch.float32 if d.device.type == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(rank)
    rows = []
    for width in cfg["widths"]:
        D, E, K = WIDTHS[width]
        for T in cfg["tokens"]:
            x = torch.randn(T, D, generator=gen).to(d.device, dtype)
            mine = torch.randn(-(-T // N), D, generator=gen).to(d.device, dtype)  # this rank's tokens under DP attention
            indices = torch.randint(0, E, (mine.shape[0], K), generator=gen).to(d.device)

            def all_reduce():
                y = x.clone()
                dist.all_reduce(y)
                return y

            def all_to_all():
                flat = indices.flatten()
                order = flat.argsort(stable=True)  # copies grouped by expert, hence by destination rank
                send = torch.bincount(flat // (E // N), minlength=N)
                recv = torch.empty_like(send)
                dist.all_to_all_single(recv, send)
                send_splits, recv_splits = send.tolist(), recv.tolist()  # the host sync
                sent = mine[order // K]
                got = sent.new_empty(sum(recv_splits), D)
                dist.all_to_all_single(got, sent, recv_splits, send_splits)
                back = sent.new_empty(sent.shape)
                dist.all_to_all_single(back, got, send_splits, recv_splits)
                return torch.zeros_like(mine).index_add_(0, order // K, back)

            for name, fn in (("all_reduce", all_reduce), ("all_to_all", all_to_all)):
                times = []
                for i in range(cfg["warmup"] + cfg["iters"]):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    if d.device.type == "cuda":
                        torch.cuda.synchronize()
                    if i >= cfg["warmup"]:
                        times.append(time.perf_counter() - t0)
                elem = x.element_size()
                # bytes this rank sends: ring all-reduce 2(N-1)/N of the tensor; all-to-all the copies
                # bound for other ranks, both ways (expected for uniform routing)
                sent = (2 * (N - 1) / N * T * D * elem if name == "all_reduce"
                        else 2 * mine.shape[0] * K * (1 - 1 / N) * D * elem)
                rows.append({"width": width, "tokens": T, "op": name, "best_ms": min(times) * 1e3,
                             "max_ms": max(times) * 1e3, "median_ms": sorted(times)[len(times) // 2] * 1e3,
                             "sent_kb": sent / 1e3})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek bench combine", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 512],
                   help="tokens per forward (decode: the batch; prefill: the chunk)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        rows = worker(json.loads(a.worker))
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(rows), flush=True)
        from nanoseek.parallel import shutdown

        shutdown()
        return 0
    if a.ranks < 2 or a.iters < 1 or min(a.tokens) < 1:
        p.error("--ranks must be >= 2, --iters and every --tokens >= 1")
    from nanoseek.bench.parallel import free_port

    cfg = {"widths": a.widths, "tokens": a.tokens, "iters": a.iters, "warmup": a.warmup, "device": a.device}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "nanoseek.bench.combine", "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        print(f"nanoseek bench combine: error: no result within --timeout {a.timeout:g} s", file=sys.stderr)
        return 2
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    if proc.returncode or not lines:
        print(f"nanoseek bench combine: error: the ranks failed (exit {proc.returncode}): "
              f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}", file=sys.stderr)
        return 2
    rows = json.loads(lines[-1])
    print(f"{a.ranks} ranks, best of {a.iters} calls after {a.warmup} warm-up, rank 0's time; "
          f"{os.cpu_count()} CPU cores" if not torch.cuda.is_available() else f"{a.ranks} ranks on GPUs")
    print(f"{'width':<7}{'tokens':>7}  {'op':<11}{'best ms':>9}{'range ms':>17}{'KB sent/rank':>14}{'a2a / ar':>10}")
    best = {}
    for r in rows:
        best[(r["width"], r["tokens"], r["op"])] = r["best_ms"]
        ratio = (f"{r['best_ms'] / best[(r['width'], r['tokens'], 'all_reduce')]:.2f}x"
                 if r["op"] == "all_to_all" else "")
        print(f"{r['width']:<7}{r['tokens']:>7}  {r['op']:<11}{r['best_ms']:>9.3f}"
              f"{r['best_ms']:>8.3f}-{r['max_ms']:<8.3f}{r['sent_kb']:>14.1f}{ratio:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
