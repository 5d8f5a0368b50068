"""One engine over several ranks (torchrun): rank 0 leads, every other rank replays its steps.

    torchrun --nproc-per-node 8 -m nanoseek serve --model DIR        # generate, bench decode too

    rt = Runtime.start("auto")                  # torchrun's process group; one rank without torchrun
    model, tok = rt.load(model_dir, ...), ...   # each rank its share; a failure on any rank stops all
    if rt.leader:
        rt.lead()                               # where the followers call follow
        engine = rt.engine(model, tokenizer=tok, max_batch_size=8, max_seq_len=4096)   # an Engine
        ...                                     # generate / stream / add_request+step+cancel / Scheduler
        rt.close(0)                             # the followers leave their loop with this exit status
    else:
        code = rt.follow(model, tok)            # replays rank 0's engines until it closes

Without torchrun `Runtime` is one rank: `engine` returns a plain Engine, and nothing is sent.

How the ranks stay in step. The sharded model (nanoseek.parallel.inference) gives every rank the
same full logits provided every rank makes the same forward calls with the same inputs. So rank 0
owns the tokenizer side, the CLI or HTTP side and the scheduler, and at the start of each engine step
broadcasts what changed since the previous one: requests added (token ids, sampling parameters),
requests cancelled, the speculative mode; the followers apply the same changes to their own Engine
(same constructor arguments, sent when rank 0 made its engine) and run the same step. Everything
inside a step that could differ between ranks is rank 0's on every rank:
* the tokens: plain samples, MTP drafts (before the verify forward reads them) and the tokens a
  speculative step keeps are broadcast from rank 0 (a few int64 per request). With identical
  logits and seeds the followers compute the same ones anyway; `replaced` counts where they did not
  (0 for greedy and seeded requests: tested), so a wrong shard shows up as a count, not as text;
* choices made from timings: speculative="auto"'s per-step verdict and whether a prefill writes
  the MTP caches (one broadcast flag each);
* torch.compile is off under torchrun (one logged line): its automatic mode switches on after a
  measured time, which differs per rank, and the sharded forward's collectives are eager code.
Each step's header carries a fingerprint of rank 0's requests (ids, positions, finished or not)
after the previous step and the new commands; a follower whose own differs stops with "the ranks
diverged" rather than computing on different batches.

Failure and shutdown. An exception inside a step ends the process on the rank that raised it (one
process fails just those requests and goes on; across ranks the others are already inside the
step's collectives, which cannot be undone); its sockets close and gloo raises "connection closed"
on the other ranks at once (under NCCL torchrun stops them when one rank exits). Followers ignore
SIGINT and SIGTERM and leave when rank 0 tells them; on rank 0 an interrupt that arrives inside a
step is held until the step ends, so the stop message always comes at a step boundary. While rank 0
is idle (an idle server, a user typing) it sends a no-op every HEARTBEAT_S, so the followers' wait
for the next step never reaches the process group's timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..parallel.env import Dist, init_distributed, quiet_other_ranks, shutdown, torchrun_world
from ..parallel.inference import load_sharded
from .engine import Engine
from .sampling import SamplingParams

log = logging.getLogger("nanoseek")

# Seconds rank 0 may stay silent before it sends a no-op step (well under any process-group timeout).
HEARTBEAT_S = 30.0
# Header ops: [op, payload bytes, fingerprint].
NOOP, STEP, ENGINE, STOP = 0, 1, 2, 3
# Bytes of one rank's error message in `check` (longer messages are cut).
MESSAGE_BYTES = 1024


class RankFailed(RuntimeError):
    """A rank failed (loading, a bad flag, a step); `message` is the failing rank's one line."""

    def __init__(self, message: str, rank: int, code: int = 1):
        super().__init__(message)
        self.rank, self.code = rank, code


class RanksDiverged(RuntimeError):
    """A follower's engine no longer matches rank 0's (different requests or positions)."""


def load_model(model_dir, *, dtype=None, device=None):
    """This rank's model: under torchrun its share of the weights, read from the HF files
    (nanoseek.parallel.inference.load_sharded); in one process the whole checkpoint."""
    return load_sharded(model_dir, dtype=dtype, device=device)


class Runtime:
    """This process's place in a multi-rank engine, and the messages between the ranks.

    dist: the process group (nanoseek.parallel.env.Dist). `leader` is rank 0.
    replaced: tokens a follower computed differently from rank 0 and took rank 0's (see the module
    docstring); always 0 on rank 0.
    """

    def __init__(self, d: Dist):
        self.dist = d
        self.lock = threading.Lock()  # one sender at a time: a step, or the heartbeat
        self.replaced = 0
        self._following = False  # rank 0: the followers are in their loop (they take messages)
        self._closed = False
        self._broken = False  # an exception left a step half done: the followers cannot be told
        self._last_send = time.monotonic()
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        self.failure: str | None = None  # rank 0: why a step failed half way (the engine is unusable)
        self.on_failure = None  # rank 0: called with that reason (a server stops itself)

    @classmethod
    def start(cls, device: str = "auto") -> "Runtime":
        """Join torchrun's process group (gloo on CPU, NCCL on CUDA; none without torchrun). Other
        ranks' stdout goes to /dev/null; rank 0 treats SIGTERM like Ctrl-C (KeyboardInterrupt: torchrun
        passes on the signal it gets), so it stops the followers before it exits."""
        rt = cls(init_distributed(device))
        if rt.enabled:
            quiet_other_ranks(rt.dist)
            if rt.leader and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, _interrupt)
        return rt

    @property
    def enabled(self) -> bool:
        return self.dist.enabled

    @property
    def leader(self) -> bool:
        return self.dist.is_main

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    # --- every rank together -----------------------------------------------------------------
    def check(self, error: BaseException | None, code: int = 1) -> None:
        """Every rank calls this at the same point with what went wrong on it (None: nothing). If
        any rank failed, every rank raises RankFailed with the lowest failing rank's message (rank
        0's own error is re-raised as it is). One rank: re-raises `error`."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        text = "" if error is None else str(error) or type(error).__name__
        mine = torch.zeros(MESSAGE_BYTES + 2, dtype=torch.uint8)
        data = text.encode()[:MESSAGE_BYTES]
        mine[0], mine[1] = error is not None, code
        mine[2:2 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        every = [self._wire(torch.zeros_like(mine)) for _ in range(self.world_size)]
        dist.all_gather(every, self._wire(mine))
        for rank, t in enumerate(every):
            t = t.cpu()
            if t[0]:
                if rank == self.dist.rank and error is not None and rank == 0:
                    raise error
                message = bytes(t[2:].tolist()).rstrip(b"\0").decode(errors="replace")
                raise RankFailed(message if rank == 0 else f"[rank {rank}] {message}", rank, int(t[1]))

    def load(self, model_dir, *, dtype=None, device=None):
        """`load_model` on every rank, then `check`: a failure on any rank is RankFailed on all."""
        model, error = None, None
        try:
            model = load_model(model_dir, dtype=dtype, device=device)
        except Exception as e:
            error = e
        self.check(error)
        return model

    # --- rank 0 ------------------------------------------------------------------------------
    def lead(self) -> None:
        """Rank 0, where the followers call `follow`: from now on they take messages (and `close`
        must tell them to leave); a heartbeat keeps them from timing out while rank 0 is idle."""
        if not self.enabled or self._following:
            return
        self._following = True
        self._heartbeat = threading.Thread(target=self._beat, name="nanoseek-heartbeat", daemon=True)
        self._heartbeat.start()

    def mark_broken(self, why: str | None = None) -> None:
        """A collective failed half way (a rank went away): send nothing more, not even the stop."""
        self._broken = True
        if why is not None and self.failure is None:
            self.failure = why
            if self.on_failure is not None:
                self.on_failure(why)

    def engine(self, model, **kwargs) -> Engine:
        """An Engine (Engine's arguments). Under torchrun, rank 0's engine whose changes and steps
        the followers replay (they build the same engine now); compiling is off there."""
        if not self.enabled:
            return Engine(model, **kwargs)
        if kwargs.get("compile") is not False:
            log.warning("nanoseek: torch.compile is off under torchrun (%d ranks); decoding eagerly", self.world_size)
        kwargs["compile"] = False
        if not self._following:
            raise RuntimeError("Runtime.engine: call lead() first (where the followers call follow())")
        tokenizer = kwargs.pop("tokenizer", None)
        engine = LeaderEngine(self, model, tokenizer=tokenizer, **kwargs)
        with self.lock:
            self._send(ENGINE, kwargs)
        return engine

    def release(self, code: int = 0, timeout: float = 10.0) -> None:
        """Rank 0: the followers leave `follow` with exit status `code` (when they can still be told:
        not after a step failed half way, nor while a step runs past `timeout`). The process group
        stays: every rank may run collectives of its own after this (a benchmark's figures)."""
        self._stop_heartbeat.set()
        if self.enabled and self.leader and self._following and not self._closed and not self._broken:
            if self.lock.acquire(timeout=timeout):  # no step in progress
                try:
                    self._send(STOP, {"code": code})
                except Exception as e:  # a follower is already gone
                    log.warning("nanoseek: could not stop the other ranks: %s", e)
                finally:
                    self._closed = True
                    self.lock.release()
        self._closed = True

    def close(self, code: int = 0) -> None:
        """`release`, then leave the process group (unless a step failed half way)."""
        self.release(code)
        if self.enabled and not self._broken:
            shutdown()

    def _beat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_S / 4):
            if time.monotonic() - self._last_send < HEARTBEAT_S or not self.lock.acquire(blocking=False):
                continue
            try:
                if not self._closed and not self._broken:
                    self._send(NOOP)
            except Exception:
                self._broken = True
                return
            finally:
                self.lock.release()

    def _send(self, op: int, payload=None, fingerprint: int = 0) -> None:
        """Rank 0 (holding `lock`): one header broadcast, then the JSON payload if there is one."""
        if self._closed or self._broken:
            raise RuntimeError(f"the multi-rank engine is {'closed' if self._closed else 'broken'}")
        data = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        dist.broadcast(self._wire(torch.tensor([op, len(data), fingerprint])), src=0)
        if data:
            dist.broadcast(self._wire(torch.frombuffer(bytearray(data), dtype=torch.uint8)), src=0)
        self._last_send = time.monotonic()

    # --- followers ---------------------------------------------------------------------------
    def _receive(self) -> tuple[int, object, int]:
        header = self._wire(torch.zeros(3, dtype=torch.long))
        dist.broadcast(header, src=0)
        op, size, fingerprint = header.tolist()
        payload = None
        if size:
            data = self._wire(torch.zeros(size, dtype=torch.uint8))
            dist.broadcast(data, src=0)
            payload = json.loads(bytes(data.cpu().tolist()))
        return op, payload, fingerprint

    def follow(self, model, tokenizer=None) -> int:
        """A follower's life: build the engines rank 0 builds, apply its changes, run its steps.
        Returns the exit status rank 0 closed with."""
        for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when everybody stops
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, signal.SIG_IGN)
        engine: Engine | None = None
        while True:
            op, payload, fingerprint = self._receive()
            if op == STOP:
                return int(payload["code"])
            if op == ENGINE:
                engine = Engine(model, tokenizer=tokenizer, **payload)
                engine.replicas = self
            elif op == STEP:
                for command in payload or []:
                    _apply(engine, command)
                mine = _fingerprint(engine)
                if mine != fingerprint:
                    raise RanksDiverged(f"the ranks diverged: rank {self.dist.rank}'s requests differ from rank 0's "
                                        f"before a step ({len(engine.running)} running, {len(engine.waiting)} waiting)")
                engine.step()

    # --- inside a step: what the Engine asks (engine.replicas) --------------------------------
    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Rank 0's token ids [...] (int64) on every rank; counts the ones this rank had differently."""
        own = ids.contiguous()
        out = self._wire(own.clone())
        dist.broadcast(out, src=0)
        out = out.to(ids.device)
        if not self.leader:
            self.replaced += int((out != own).sum())
        return out

    def token_lists(self, lists: list[list[int]], width: int) -> list[list[int]]:
        """Rank 0's lists of token ids (each at most `width` long) on every rank."""
        padded = torch.full((len(lists), width), -1, dtype=torch.long)
        for i, row in enumerate(lists):
            padded[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        out = self.tokens(padded)
        return [[t for t in row if t >= 0] for row in out.tolist()]

    def decide(self, flag: bool) -> bool:
        """Rank 0's choice on every rank (a timing-based one)."""
        t = self._wire(torch.tensor([int(flag)]))
        dist.broadcast(t, src=0)
        return bool(t.item())

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        """Where collectives need their tensors: the rank's GPU under NCCL, the CPU under gloo."""
        return t.to(self.dist.device) if self.dist.backend == "nccl" else t


class LeaderEngine(Engine):
    """Rank 0's engine: every change is recorded for the followers and sent with the next step."""

    def __init__(self, runtime: Runtime, model, **kwargs):
        self._pending: list | None = None  # None while Engine.__init__ runs: the followers get the kwargs
        super().__init__(model, **kwargs)
        self.runtime, self.replicas = runtime, runtime
        self._pending = []

    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        rid = super().add_request(prompt_ids, params)
        req = self.waiting[-1]
        self._pending.append(["add", rid, req.prompt, asdict(req.params)])
        return rid

    def cancel(self, request_id: int) -> bool:
        done = super().cancel(request_id)
        if done:
            self._pending.append(["cancel", request_id])
        return done

    def set_speculative(self, mode: str | None) -> None:
        before = self.speculative
        super().set_speculative(mode)
        if self._pending is not None and self.speculative != before:
            self._pending.append(["speculative", mode])

    def step(self):
        rt = self.runtime
        with rt.lock, _held_interrupts():
            try:
                rt._send(STEP, self._pending, _fingerprint(self))
                self._pending = []
                return super().step()
            except BaseException as e:  # the followers are somewhere inside this step
                rt.mark_broken(f"{type(e).__name__}: {e}".splitlines()[0])
                raise


def _apply(engine: Engine, command: list) -> None:
    """A follower replays one of rank 0's changes."""
    kind = command[0]
    if kind == "add":
        _, rid, prompt, params = command
        got = engine.add_request(prompt, SamplingParams(**params))
        if got != rid:
            raise RanksDiverged(f"the ranks diverged: request {got} here is request {rid} on rank 0")
    elif kind == "cancel":
        engine.cancel(command[1])
    elif kind == "speculative":
        engine.set_speculative(command[1])
    else:
        raise RanksDiverged(f"unknown command from rank 0: {kind!r}")


def _fingerprint(engine: Engine) -> int:
    """A number that changes with the engine's requests: ids, positions, finished or not, in row order."""
    h = 0
    for r in list(engine.running) + list(engine.waiting):
        for x in (r.id, len(r.tokens), r.finish_reason is not None):
            h = (h * 1_000_003 + int(x)) % (2**61 - 1)
    return h


@contextlib.contextmanager
def rank0_output():
    """Under torchrun, what the block prints (argparse's usage errors, --help: every rank parses the
    same command line) comes from rank 0 alone."""
    if torchrun_world()[0] == 0:
        yield
        return
    saved = sys.stdout, sys.stderr
    with open(os.devnull, "w") as null:
        sys.stdout = sys.stderr = null
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _held_interrupts():
    """On the main thread, hold SIGINT/SIGTERM until the block ends, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        raise KeyboardInterrupt
