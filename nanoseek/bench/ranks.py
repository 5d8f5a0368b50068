"""Decoding on N ranks against 1: tokens/s and what each rank holds (`nanoseek bench decode`'s ranks table).

    nanoseek bench decode --tables ranks --preset tiny --batch-sizes 1,8 --prompt-lens 128      # 1 rank
    torchrun --nproc-per-node 2 -m nanoseek bench decode --preset tiny --batch-sizes 1,8 --prompt-lens 128

Under torchrun this is the table `bench decode` prints (the transformers peer and the other tables
are one-process measurements); without it `--tables ranks` prints the same table for one rank, so
the two runs differ only in the launch. Per (batch, prompt length) cell: rank 0's engine decodes
greedily with EOS ignored, and the cell reports decode tokens/s (best of --repeats passes after a
warm-up, with the range), the mean step time and the latent cache's bytes per token. Every row is
eager: under torchrun compiling is off, so the one-rank row is eager too. Then per rank: the
parameter and buffer bytes of its share (`resident_bytes`, nanoseek.parallel.inference), its latent
cache (one row per token shared by all heads, so every rank holds the whole batch's cache) and its
resident memory (RSS: the Python process, torch and the rest included) at the end and at most (with
a random --preset, rank 0's peak includes building the whole model to write the checkpoint: pass
--model for per-rank peaks).

Several ranks on one 2-core CPU are overhead, not speed-up: the ranks share the cores, and every
step adds its broadcasts (commands, tokens) and the sharded model's collectives.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from nanoseek.inference.distributed import Runtime
from nanoseek.model import Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.parallel.inference import resident_bytes


def shared_checkpoint(a, rt: Runtime) -> tuple[Path, bool]:
    """--model, or a random --preset checkpoint rank 0 writes where every rank of this machine reads
    it. Returns (path, whether this rank should delete it at the end)."""
    if a.model:
        return a.model, False
    path = Path(tempfile.gettempdir()) / f"nanoseek-bench-ranks-{os.getppid()}-{a.preset}"
    error = None
    if rt.leader:
        try:
            need = max(a.prompt_lens) + a.new_tokens + 8
            args = preset(a.preset, **{"torch_dtype": "float32", **parse_overrides(a.overrides)})
            if args.max_position_embeddings < need:
                args = args.replace(max_position_embeddings=need)
            torch.manual_seed(a.seed)
            Transformer(args).save_pretrained(path)
        except Exception as e:
            error = e
    rt.check(error)  # also the barrier: the files are there
    return path, rt.leader


def rss() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process (Linux)."""
    now = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                now = int(line.split()[1]) * 1024
    except OSError:
        pass
    return now, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def cells(a, rt: Runtime, model) -> list[dict]:
    """Rank 0: the timed cells (the followers replay them inside `follow`)."""
    rows = []
    for batch in a.batch_sizes:
        for length in a.prompt_lens:
            g = torch.Generator().manual_seed(a.seed + 1000 * batch + length)
            prompts = torch.randint(3, model.args.vocab_size, (batch, length), generator=g).tolist()
            engine = rt.engine(model, max_batch_size=batch, max_seq_len=length + a.new_tokens, compile=False,
                               speculative=None)
            engine.generate([p[:16] for p in prompts], max_new_tokens=min(4, a.new_tokens), ignore_eos=True)  # warm-up
            passes = []
            for _ in range(a.repeats):
                engine.generate(prompts, max_new_tokens=a.new_tokens, ignore_eos=True)
                s = engine.stats
                passes.append((s["decode_tokens_per_s"], s["decode_s"] / max(s["decode_steps"], 1)))
            best = max(passes)
            rows.append(dict(ranks=rt.world_size, batch=batch, prompt=length, new_tokens=a.new_tokens,
                             decode_tok_s=best[0], range=[min(p[0] for p in passes), best[0]], step_ms=1e3 * best[1],
                             cache_bytes_per_token=engine.cache_bytes_per_token, cache_bytes=engine.cache.nbytes))
            print(f"{rt.world_size:>5} {batch:>5} {length:>6} {best[0]:>12.1f} "
                  f"({rows[-1]['range'][0]:.1f}-{best[0]:.1f}) {1e3 * best[1]:>8.2f} "
                  f"{engine.cache_bytes_per_token:>10}", flush=True)
            del engine
    return rows


def main(a, pressure) -> int:
    """The ranks table; `pressure()` says how busy the CPU is (printed with the figures)."""
    rt = Runtime.start("cpu")
    torch.set_num_threads(a.threads or 1)
    path, owner = shared_checkpoint(a, rt)
    try:
        model = rt.load(path)
    finally:
        if owner:
            shutil.rmtree(path, ignore_errors=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    if rt.leader:
        print(f"ranks table: {rt.world_size} rank(s) ({rt.dist.backend or 'one process'}), "
              f"{a.model or 'random ' + a.preset}, {model.num_params() / 1e6:.1f}M params on rank 0, fp32, "
              f"{torch.get_num_threads()} thread(s) per rank, eager, {a.new_tokens} new tokens, best of {a.repeats} "
              f"| cpu pressure {pressure()}", flush=True)
        print(f"{'ranks':>5} {'batch':>5} {'prompt':>6} {'decode tok/s':>12} (range) {'step ms':>8} {'cache B/tok':>10}")
        rt.lead()
        rows = cells(a, rt, model)
        rt.release(0)
    else:
        rt.follow(model)
    largest_cache = max((r["cache_bytes"] for r in rows), default=0)
    mine = torch.tensor([resident_bytes(model), largest_cache, *rss()], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(rt.world_size)]
    if rt.enabled:
        dist.all_gather(every, mine)
    else:
        every = [mine]
    if rt.leader:
        for rank, (params, _, now, peak) in enumerate(t.tolist() for t in every):
            print(f"rank {rank}: parameters {params / 2**20:.1f} MiB, latent cache {largest_cache / 2**20:.1f} MiB "
                  f"(largest cell), RSS {now / 2**20:.0f} MiB at the end, {peak / 2**20:.0f} MiB at most")
            rows.append(dict(ranks=rt.world_size, rank=rank, param_bytes=params, cache_bytes=largest_cache,
                             rss=now, peak_rss=peak))
        print(f"cpu pressure at the end: {pressure()} ({time.perf_counter() - t0:.0f}s)")
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rt.close(0)
    return 0
