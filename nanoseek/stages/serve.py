"""Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /.

    nanoseek serve --model runs/tiny/model [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                   [--max-batch-size 16] [--max-queue 128] [--max-model-len 4096]
                   [--reasoning-parser deepseek-r1] [--served-model-name NAME] [--threads N] [--no-compile] [--speculative auto|mtp|off]

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

The server binds to loopback unless --host says otherwise. The port opens at once, before the
model loads (a port in use, out of range or not allowed is one line and exit status 2): /health
answers 503 while the model loads in a background thread, 200 after. The API key may also
come from the NANOSEEK_API_KEY environment variable, which keeps it out of `ps`.

Under torchrun (`torchrun --nproc-per-node N -m nanoseek serve ...`) rank 0 is the server (port,
HTTP, tokenizer, scheduler) and every other rank loads its share of the model and replays rank 0's
engine steps (nanoseek/inference/distributed.py). Stopping the server (Ctrl-C, SIGTERM) stops every
rank; a failure on any rank (loading, or inside a step) stops every rank with one line from rank 0.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import uvicorn

from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.cli import int_in
from nanoseek.data import DataError, Tokenizer
from nanoseek.device import DeviceError, resolve_device
from nanoseek.inference.distributed import RankFailed, Runtime, load_model, rank0_output
from nanoseek.model import ConfigError, ModelArgs
from nanoseek.serve import ServerState, create_app
from nanoseek.serve.app import REASONING_PARSERS

log = logging.getLogger("nanoseek.serve")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp8": "fp8"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path,
                   help="model directory (HF layout), or a training run (RUN, RUN/checkpoints or "
                        "RUN/checkpoints/latest: its latest checkpoint)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer directory (default: the model directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int_in(1, 65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("NANOSEEK_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (or NANOSEEK_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients use (default: the model directory's name)")
    p.add_argument("--max-batch-size", type=int_in(1, 65536), default=16,
                   help="sequences decoded together (engine slots, default 16)")
    p.add_argument("--max-queue", type=int_in(1, 2**31 - 1), default=128,
                   help="sequences allowed to wait for a slot; more get a 503 (default 128)")
    p.add_argument("--max-model-len", type=int_in(2, 2**31 - 1), default=4096,
                   help="context length: prompt + completion, capped by the model's "
                        "max_position_embeddings (default 4096); sizes the KV cache")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="split <think>...</think> into reasoning_content (R1-style models)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype (default: float32 on CPU, the checkpoint's otherwise); fp8 keeps the "
                        "FP8 layers as FP8 + block scales in memory, dequantised per matmul")
    p.add_argument("--threads", type=int_in(1, 4096), default=None,
                   help="torch intra-op threads on CPU (default: torch's, one per core); 1 is "
                        "fastest for tiny models and on a busy machine")
    p.add_argument("--speculative", choices=["auto", "mtp", "off"], default="auto",
                   help="MTP speculative decoding: auto (default: per batch size, while it is faster; off "
                        "without MTP modules), mtp (always) or off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default on: compiled at start-up, seconds from "
                        "the disk cache, tens of seconds cold; faster per token "
                        "while batch x experts per token <= routed experts)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    a = p.parse_args(argv)
    a.model_arg = a.model  # the name clients see by default: what the user passed, not step-000120
    try:
        a.model = resolve_model_dir(a.model)
    except CheckpointError as e:
        p.error(f"--model {e}")
    try:
        a.device = resolve_device(a.device)
    except DeviceError as e:
        p.error(f"--device {e}")
    a.tokenizer = a.tokenizer or a.model
    if not (a.tokenizer / "tokenizer.json").is_file():
        p.error(f"no tokenizer.json in {a.tokenizer} (pass --tokenizer DIR)")
    # The files a user can get wrong are read now, so they are one line and exit 2, not a failed
    # load in the background after the port opened. (The weights are checked as they load.)
    try:
        args = ModelArgs.from_json(a.model / "config.json")
        a.tokenizer = Tokenizer.from_dir(a.tokenizer)
    except (ConfigError, DataError, OSError) as e:
        p.error(str(e))
    if a.tokenizer.vocab_size > args.vocab_size:
        p.error(f"the tokenizer has {a.tokenizer.vocab_size} ids but the model's vocab_size is {args.vocab_size}")
    return a


def bind(host: str, port: int) -> socket.socket:
    """Open the listening socket now, so a port that cannot be had is a clear error before any
    thread starts (uvicorn's own bind exits from deep inside, with the model loader running)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror):
            why = f"--host {host}: not a known host name or address ({e.strerror})"
        elif e.errno == errno.EADDRINUSE:
            why = f"--port {port} is already in use on {host} (another server?); pick another --port"
        elif e.errno == errno.EACCES:
            why = f"--port {port}: permission denied (ports below 1024 need privileges); pick another --port"
        elif e.errno == errno.EADDRNOTAVAIL:
            why = f"--host {host} is not an address of this machine"
        else:
            why = f"cannot listen on {host}:{port}: {e.strerror or e}"
        raise OSError(why) from None
    sock.set_inheritable(True)
    return sock


def load_weights(a: argparse.Namespace, rt: Runtime):
    """This rank's model; a failure on any rank raises on every rank (rt.check)."""
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    model = error = None
    try:
        model = load_model(a.model, dtype=DTYPES.get(a.dtype), device=a.device)
    except Exception as e:
        error = e
    rt.check(error)
    return model


def load(a: argparse.Namespace, state: ServerState, rt: Runtime) -> None:
    """Load tokenizer, model and engine, then hand them to the server (a background thread)."""
    t0 = time.perf_counter()
    tokenizer = a.tokenizer  # read and checked against config.json by parse_args
    model = load_weights(a, rt)
    rt.lead()
    max_len = min(a.max_model_len, model.args.max_position_embeddings)
    engine = rt.engine(model, max_batch_size=a.max_batch_size, max_seq_len=max_len,
                       tokenizer=tokenizer, compile=a.compile,
                       speculative=None if a.speculative == "off" else a.speculative)
    engine.warmup()  # compile now (unless --no-compile), not during the first requests
    state.start(engine, tokenizer)
    log.info("model %s ready in %.1fs: %d slots, context %d tokens", state.model_name,
             time.perf_counter() - t0, a.max_batch_size, max_len)


def main(argv: list[str] | None = None) -> int:
    with rank0_output():
        a = parse_args(argv)
    rt = Runtime.start(str(a.device))
    a.device = rt.dist.device  # under torchrun: this rank's GPU (LOCAL_RANK), whatever --device named
    sock = error = None
    if rt.leader:
        try:
            sock = bind(a.host, a.port)
        except OSError as e:
            error = e
    try:
        rt.check(error, 2)
    except (OSError, RankFailed) as e:
        if rt.leader:
            print(f"nanoseek serve: error: {e}", file=sys.stderr)
        rt.close(2)
        return 2
    if not rt.leader:
        code = follow(a, rt)
        rt.close(code)
        return code
    logging.basicConfig(level=a.log_level.upper(), format="%(levelname)s:     %(message)s")
    if a.api_key is None and not _is_loopback(a.host):
        log.warning("binding %s without --api-key: anyone who can reach it can use it", a.host)
    state = ServerState(a.served_model_name or _model_name(a.model_arg), api_key=a.api_key,
                        max_queue=a.max_queue, reasoning_parser=a.reasoning_parser)
    server = uvicorn.Server(uvicorn.Config(
        create_app(state), host=a.host, port=a.port, log_level=a.log_level,
        timeout_graceful_shutdown=5))

    def load_or_stop():
        try:
            load(a, state, rt)
        except Exception as e:
            why = str(e) if isinstance(e, RankFailed) else f"{type(e).__name__}: {e}"
            state.load_error = f"loading the model failed: {why}"
            log.error(state.load_error)
            server.should_exit = True

    def ranks_failed(why: str):  # a step failed on this rank or lost another: the engine is gone
        log.error("the engine's ranks stopped: %s", why)
        server.should_exit = True

    rt.on_failure = ranks_failed

    threading.Thread(target=load_or_stop, name="nanoseek-load", daemon=True).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on SIGINT, then re-raises it: that is a normal stop.
        pass
    code = 0
    if state.load_error:
        print(f"nanoseek serve: {state.load_error}", file=sys.stderr)
        code = 1
    elif rt.failure:
        print(f"nanoseek serve: error: the engine's ranks stopped: {rt.failure}", file=sys.stderr)
        code = 1
    rt.close(code)
    return code


def follow(a: argparse.Namespace, rt: Runtime) -> int:
    """A rank other than 0: load this rank's share, then replay rank 0's engine until it stops."""
    try:
        model = load_weights(a, rt)
    except RankFailed as e:  # rank 0 says why
        return e.code
    try:
        return rt.follow(model, a.tokenizer)
    except Exception as e:  # rank 0 went away, or this rank's step failed
        rt.mark_broken()
        print(f"[rank {rt.dist.rank}] nanoseek serve: error: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)
        return 1


def _model_name(path: Path) -> str:
    """runs/tiny, runs/tiny/checkpoints and runs/tiny/checkpoints/latest are all served as 'tiny'."""
    path = path.resolve()
    while path.name in ("latest", "checkpoints") and path.parent != path:
        path = path.parent
    return path.name


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
