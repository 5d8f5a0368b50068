"""Load-test the OpenAI-compatible server: TTFT, TPOT, ITL and throughput at several concurrencies.

    nanoseek bench serve --model runs/tiny/model [--concurrency 1,4,16] [--num-prompts 64]
                         [--input-len 32] [--output-len 64] [--duration 60] [--out serve.jsonl]
                         [--serve-args="--threads 1"]
    nanoseek bench serve --url http://127.0.0.1:8000 --concurrency 1,8

With --model it starts `nanoseek serve` on a free loopback port (one engine slot per client of
the largest level, plus --serve-args) and stops it afterwards; with --url it measures a server
already running. --nproc-per-node N starts that server on N ranks under torchrun (the multi-rank
engine, nanoseek/inference/distributed.py); launched under torchrun itself
(`torchrun --nproc-per-node N -m nanoseek bench serve --model DIR`), rank 0 does the same with N
and the other ranks leave at once: the load generator is one process either way.
Only loopback addresses are accepted: a load generator aimed elsewhere by a typo is an attack.

The metrics are those of vLLM's benchmark_serving, per request then summarised:
    TTFT   time to first token: request sent -> first text chunk
    TPOT   time per output token: (latency - TTFT) / (output tokens - 1)
    ITL    inter-token latency: gaps between consecutive text chunks, pooled over requests
    output tokens/s: all output tokens of a level / its wall time
    engine step: the server's mean time in engine.step() calls that only decoded, from its
           /metrics (nanoseek_engine_decode_step_seconds) over the level; TPOT / step is what a
           streamed token costs against the engine's own work (1.0 = no server overhead)
Each client sends its requests back to back (a closed loop, like vLLM's --max-concurrency), so
"clients" is the number of requests in flight. Requests go to /v1/completions with greedy
sampling and `ignore_eos`, so every request generates exactly --output-len tokens and levels
are comparable. A level stops after --num-prompts requests or --duration seconds, whichever
comes first (requests in flight then finish, each bounded by --timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

# Prompts are random sentences over a small word list: every tokenizer can encode them.
WORDS = ("the model reads a long story about seven small robots who learn to count rivers "
         "mountains stars and every quiet number hidden inside old maps while the sun moves "
         "slowly over green fields").split()


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool
    latency: float = 0.0
    ttft: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek bench serve", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="model dir: start a server on loopback for the run")
    src.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000 (loopback only)")
    p.add_argument("--concurrency", default="1,4,16",
                   help="comma-separated client counts, one level each (default 1,4,16)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="requests per level (default: 8 per client, at least 16)")
    p.add_argument("--input-len", type=int, default=32, help="prompt length in words (default 32)")
    p.add_argument("--output-len", type=int, default=64, help="tokens generated per request (default 64)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="most seconds a level may spend sending requests (default 60)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds the started server may take to load and compile (default 900)")
    p.add_argument("--serve-args", default="",
                   help="extra `nanoseek serve` flags with --model, e.g. "
                        "--serve-args=\"--threads 1\"")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="with --model: serve on N ranks under torchrun (default: the torchrun world size this "
                        "bench was launched with, else 1)")
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"))
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per level here")
    a = p.parse_args(argv)
    try:
        a.levels = [int(c) for c in a.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency {a.concurrency!r}: expected numbers like 1,4,16")
    if not a.levels or min(a.levels) < 1 or max(a.levels) > 256:
        p.error("--concurrency: each level must be between 1 and 256 clients")
    if a.output_len < 2 or a.input_len < 1:
        p.error("--output-len must be at least 2 (TPOT needs two tokens), --input-len at least 1")
    a.nproc_per_node = a.nproc_per_node or int(os.environ.get("WORLD_SIZE", 1))
    if a.nproc_per_node < 1 or (a.nproc_per_node > 1 and a.model is None):
        p.error("--nproc-per-node must be >= 1, and more than 1 needs --model (the bench starts that server)")
    if a.url is not None and not _is_loopback(urlparse(a.url).hostname or ""):
        p.error(f"--url {a.url}: only loopback servers (127.0.0.1, ::1, localhost) may be benchmarked")
    return a


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def one_request(client: httpx.AsyncClient, model: str | None, prompt: str,
                      a: argparse.Namespace) -> Result:
    """Stream one completion and time its chunks."""
    body = {"model": model, "prompt": prompt, "max_tokens": a.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last, res = start, Result(ok=False)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = chunk["error"]["message"]
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = time.perf_counter() - start
    res.ok = res.output_tokens > 0 and res.ttft > 0
    if not res.ok:
        res.error = "no text or no usage in the stream"
    return res


async def run_level(url: str, model: str | None, clients: int, prompts: list[str],
                    a: argparse.Namespace) -> tuple[list[Result], float]:
    """`clients` closed-loop clients share the prompts; returns results and the wall time."""
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    todo = list(reversed(prompts))
    results: list[Result] = []
    # trust_env=False: no proxy from the environment ever sees this traffic.
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, trust_env=False,
                                 timeout=a.timeout) as client:
        start = time.perf_counter()
        deadline = start + a.duration

        async def worker():
            while todo and time.perf_counter() < deadline:
                results.append(await one_request(client, model, todo.pop(), a))

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
    return results, wall


def summarize(clients: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]

    def stats(values, scale=1000.0):
        if not values:
            return {"mean": None, "p50": None, "p99": None}
        v = np.asarray(values) * scale
        return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
                "p99": float(np.percentile(v, 99))}

    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "clients": clients, "requests": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": wall, "output_tokens": out_tokens,
        "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "requests_s": len(ok) / wall if wall > 0 else 0.0,
        "mean_prompt_tokens": float(np.mean([r.prompt_tokens for r in ok])) if ok else None,
        "ttft_ms": stats([r.ttft for r in ok]),
        "tpot_ms": stats([(r.latency - r.ttft) / (r.output_tokens - 1)
                          for r in ok if r.output_tokens > 1]),
        "itl_ms": stats([gap for r in ok for gap in r.itl]),
    }


def report(rows: list[dict]) -> str:
    """A markdown table, plus the throughput ratio of the largest level to the smallest."""
    def trio(s):
        return "/".join("-" if s[k] is None else f"{s[k]:.1f}" for k in ("mean", "p50", "p99"))

    lines = ["| clients | requests | TTFT ms mean/p50/p99 | TPOT ms mean/p50/p99 | "
             "ITL ms mean/p50/p99 | output tok/s | req/s | engine step ms | TPOT / step |",
             "|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        failed = f" ({r['failed']} failed)" if r["failed"] else ""
        lines.append(f"| {r['clients']} | {r['requests']}{failed} | {trio(r['ttft_ms'])} | "
                     f"{trio(r['tpot_ms'])} | {trio(r['itl_ms'])} | {r['output_tok_s']:.1f} | "
                     f"{r['requests_s']:.2f} | {_opt(r.get('engine_step_ms'), 2)} | "
                     f"{_opt(r.get('tpot_over_step'), 2, 'x')} |")
    lo = min(rows, key=lambda r: r["clients"])
    hi = max(rows, key=lambda r: r["clients"])
    if hi is not lo and lo["output_tok_s"] > 0:
        lines.append(f"\nthroughput at {hi['clients']} clients = "
                     f"{hi['output_tok_s'] / lo['output_tok_s']:.1f}x that at {lo['clients']} "
                     f"(perfect batching: {hi['clients'] / lo['clients']:.0f}x)")
    return "\n".join(lines)


def _opt(x, digits: int, suffix: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{suffix}"


async def engine_steps(client: httpx.AsyncClient) -> tuple[float, int] | None:
    """(seconds, count) of the server's decode-only engine steps so far; None if not exposed."""
    try:
        r = await client.get("/metrics")
        values = dict(line.split(" ", 1) for line in r.text.splitlines()
                      if line.startswith("nanoseek_engine_decode_step_seconds_"))
        return (float(values["nanoseek_engine_decode_step_seconds_sum"]),
                int(float(values["nanoseek_engine_decode_step_seconds_count"])))
    except (httpx.HTTPError, KeyError, ValueError):
        return None


async def bench(url: str, a: argparse.Namespace) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30,
                                 headers={"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}) as c:
        r = await c.get("/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    # One untimed request first: the first forward pass pays for allocations and warm-up.
    await run_level(url, model, 1, make_prompts(1, a.input_len, a.seed + 999), a)
    rows = []
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=30) as c:
        for clients in a.levels:
            n = a.num_prompts or max(16, 8 * clients)
            before = await engine_steps(c)
            results, wall = await run_level(url, model, clients, make_prompts(n, a.input_len, a.seed), a)
            after = await engine_steps(c)
            row = summarize(clients, results, wall)
            row["engine_step_ms"] = row["tpot_over_step"] = None
            if before and after and after[1] > before[1]:
                row["engine_step_ms"] = 1e3 * (after[0] - before[0]) / (after[1] - before[1])
                if row["tpot_ms"]["mean"]:
                    row["tpot_over_step"] = row["tpot_ms"]["mean"] / row["engine_step_ms"]
            rows.append(row)
            print(f"  {clients} clients: {row['requests']} requests in {wall:.1f}s, "
                  f"{row['output_tok_s']:.1f} output tok/s", file=sys.stderr)
    return rows


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`nanoseek serve` on a free loopback port; returns once /health says ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanoseek", "serve", "--model", str(a.model), "--port", str(port),
           "--max-batch-size", str(max(a.levels)), "--max-queue", str(4 * max(a.levels)),
           "--log-level", "warning", *shlex.split(a.serve_args)]
    env = dict(os.environ)
    if a.nproc_per_node > 1:  # a torchrun job of its own: none of this bench's torchrun variables
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            master = s.getsockname()[1]
        cmd[1:2] = ["-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc_per_node),
                    "--master-port", str(master), "-m"]
        env = {k: v for k, v in env.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    if a.api_key:
        cmd += ["--api-key", a.api_key]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + a.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nanoseek serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"nanoseek serve did not become ready within {a.start_timeout:.0f}s (--start-timeout)")


# What torchrun sets for its workers (removed before starting the server's own torchrun job).
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def main(argv: list[str] | None = None) -> int:
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun: rank 0 runs the bench (and the server's ranks)
        return 0
    a = parse_args(argv)
    proc = None
    if a.model is not None:
        proc, url = start_server(a)
    else:
        url = a.url.rstrip("/")
    try:
        print(f"bench serve: {url}, levels {a.levels}, {a.input_len}-word prompts, "
              f"{a.output_len} output tokens, server on {a.nproc_per_node} rank(s)", file=sys.stderr)
        rows = asyncio.run(bench(url, a))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(report(rows))
    if a.out is not None:
        with open(a.out, "a") as f:
            for row in rows:
                f.write(json.dumps({"bench": "serve", "url": url, "ranks": a.nproc_per_node, "input_len": a.input_len,
                                    "output_len": a.output_len, **row}) + "\n")
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
