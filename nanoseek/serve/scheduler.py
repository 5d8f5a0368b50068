"""The scheduler: one thread owns the engine and runs continuous batching.

    event loop (uvicorn, many requests)            scheduler thread (the only engine user)
    -----------------------------------            -----------------------------------------
    submit(prompt, params) -> Job  --waiting--->   admit waiting sequences into free slots
    cancel(job)  (client went away) --cancels-->   engine.cancel(rid): the slot is free at once
    async for i, event in job.events()  <-----    engine.step(): one token for every running
                 (call_soon_threadsafe)            sequence, delivered to each job's queue

Why a thread and not an asyncio task: `engine.step()` is a blocking forward pass. Run on the
event loop it would stall every open stream for its duration; in a thread, PyTorch releases
the GIL inside its kernels and the loop keeps sending chunks. Exactly one thread touches the
engine, so the engine itself needs no locks. The two threads share only the waiting queue and
the cancel list, under one lock, plus each job's asyncio.Queue, fed with
`loop.call_soon_threadsafe` (one call per step for all jobs).

The hand-off waits: after a step the scheduler thread blocks (up to HANDOFF_TIMEOUT) until the
event loop has put the step's events on the jobs' queues and run the streams they woke, i.e. until
the chunks are written. Without it the scheduler thread went straight into the next step holding
the GIL, and the event loop got it back only at CPython's forced switch (every 5 ms): a streamed
token took ~5 ms at one client while the engine step took ~0.7 ms.

Requests join the running batch between decode steps and leave when they finish: the loop
admits whatever waits whenever the engine has free slots, then steps. Admission is first come,
first served. The waiting queue is bounded (`max_queue` sequences); past it `submit` raises
QueueFull and the server answers 503. With nothing running and nothing waiting the thread
sleeps on a condition variable rather than spinning.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from nanoseek.serve.metrics import Metrics

log = logging.getLogger("nanoseek.serve")

# Longest the scheduler waits for the event loop to stream a step's tokens before stepping again.
HANDOFF_TIMEOUT = 0.05


class QueueFull(Exception):
    """The waiting queue has no room for this request's sequences."""


class EngineFailure(Exception):
    """The engine raised while stepping; the sequences that were running are lost."""


class Job:
    """One HTTP request: n sequences (choices), each with its prompt and sampling params.

    A chat request with n choices repeats one prompt n times; a completion request with several
    prompts lists them all. The route reads `events()`; everything else is the scheduler's
    bookkeeping, and the per-sequence lists are touched only by the scheduler thread.
    """

    def __init__(self, prompts: list[list[int]], params: list, loop: asyncio.AbstractEventLoop):
        assert len(prompts) == len(params)
        self.prompts = prompts
        self.params = params  # one SamplingParams per sequence
        self.n = len(params)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()  # (choice index, StepEvent | Exception)
        self.arrival = time.perf_counter()
        self.cancelled = False
        self.finished = False  # set by events() once every sequence has ended
        self.rids: list[int | None] = [None] * self.n
        self.first_token_at: list[float | None] = [None] * self.n
        self.num_tokens = [0] * self.n

    async def events(self):
        """Yield (choice index, StepEvent) until every sequence has finished.

        Raises what the scheduler delivered instead of an event: the engine's ValueError when
        a sequence could not be added, EngineFailure, or RuntimeError at shutdown.
        """
        remaining = self.n
        while remaining:
            index, item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                remaining -= 1
            yield index, item
        self.finished = True


class Scheduler:
    """Continuous batching around one engine (see the module docstring).

    engine: nanoseek.inference.Engine (add_request, step, cancel, free_slots).
    max_queue: sequences allowed to wait for a slot before submit() refuses.
    """

    def __init__(self, engine, max_queue: int = 128, metrics: Metrics | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._wake = threading.Condition()
        self._waiting: deque[tuple[Job, int]] = deque()  # (job, choice index), under _wake
        self._cancels: list[Job] = []  # under _wake
        self._stopping = False
        self._running: dict[int, tuple[Job, int]] = {}  # engine rid -> (job, index); thread only
        self._thread = threading.Thread(target=self._loop, name="nanoseek-scheduler", daemon=True)

    # -- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop; jobs still waiting or running receive a RuntimeError."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, prompts: list[list[int]], params: list) -> Job:
        """Queue a request's sequences (prompt i sampled with params i). Must run on the event
        loop that will read the events. Raises QueueFull when the waiting queue cannot take
        all of them.
        """
        job = Job(prompts, params, asyncio.get_running_loop())
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + job.n > self.max_queue:
                raise QueueFull(f"the server is busy: {len(self._waiting)} sequences are "
                                f"waiting for a slot (--max-queue {self.max_queue})")
            self._waiting.extend((job, i) for i in range(job.n))
            self._wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job: its waiting sequences are removed, its running ones freed at the next
        loop turn (before the next decode step). Safe to call twice or after it finished."""
        if job.cancelled or job.finished:
            return
        job.cancelled = True
        with self._wake:
            self._cancels.append(job)
            self._wake.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._cancels or self._running):
                    self._wake.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, []
                if cancels:
                    kept = deque(s for s in self._waiting if not s[0].cancelled)
                    for _ in range(len(self._waiting) - len(kept)):
                        self.metrics.sequence_done("cancelled")
                    self._waiting = kept
                admit = []
                while self._waiting and len(admit) < self.engine.free_slots:
                    admit.append(self._waiting.popleft())
            for job in cancels:
                self._free(job)
            for job, index in admit:
                self._add(job, index)
            if self._running:
                self._step(prefill=bool(admit))
        self._shutdown()

    def _add(self, job: Job, index: int) -> None:
        if job.cancelled:
            self.metrics.sequence_done("cancelled")
            return
        try:
            rid = self.engine.add_request(job.prompts[index], job.params[index])
        except Exception as e:  # ValueError: too long for the context; anything else: a bug
            log.warning("could not add a sequence: %s", e)
            self.metrics.sequence_done("error")
            self._send(job, [(index, e)])
            return
        job.rids[index] = rid
        self._running[rid] = (job, index)
        self.metrics.admitted(len(job.prompts[index]))

    def _free(self, job: Job) -> None:
        """Cancel a job's running sequences in the engine."""
        for rid in job.rids:
            if rid is not None and rid in self._running:
                del self._running[rid]
                self.engine.cancel(rid)
                self.metrics.sequence_done("cancelled")

    def _step(self, prefill: bool) -> None:
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:
            log.exception("engine.step() failed; failing the %d running sequences",
                          len(self._running))
            self._fail_running(EngineFailure(f"the engine failed: {type(e).__name__}: {e}"))
            return
        now = time.perf_counter()
        if not prefill:
            self.metrics.decode_step(now - t0)
        batches: dict[Job, list] = {}
        for ev in events:
            entry = self._running.get(ev.request_id)
            if entry is None:  # cancelled by a previous turn
                continue
            job, i = entry
            if ev.finish_reason == "error":  # this sequence's forward failed; the engine freed its slot
                del self._running[ev.request_id]
                log.error("a sequence failed in the engine: %s", ev.error)
                self.metrics.sequence_done("error")
                if not job.cancelled:
                    batches.setdefault(job, []).append((i, EngineFailure(f"the engine failed: {ev.error}")))
                continue
            job.num_tokens[i] += 1
            if job.first_token_at[i] is None:
                job.first_token_at[i] = now
                self.metrics.first_token(now - job.arrival)
            if ev.finished:
                del self._running[ev.request_id]
                self._record_done(job, i, ev.finish_reason or "stop", now)
            if not job.cancelled:
                batches.setdefault(job, []).append((i, ev))
        self.metrics.tokens(len(events))
        self._send_all(batches, wait=True)

    def _record_done(self, job: Job, i: int, reason: str, now: float) -> None:
        first, n = job.first_token_at[i], job.num_tokens[i]
        tpot = (now - first) / (n - 1) if first is not None and n > 1 else None
        e2e = now - job.arrival if first is not None else None
        self.metrics.sequence_done(reason, e2e=e2e, tpot=tpot)

    def _fail_running(self, error: Exception) -> None:
        running, self._running = self._running, {}
        for rid, (job, index) in running.items():
            try:
                self.engine.cancel(rid)
            except Exception:  # the engine is already in trouble; the slot bookkeeping is its own
                log.exception("engine.cancel(%s) failed", rid)
            self.metrics.sequence_done("error")
            self._send(job, [(index, error)])

    def _shutdown(self) -> None:
        error = RuntimeError("the server is shutting down")
        self._fail_running(error)
        with self._wake:
            waiting, self._waiting = self._waiting, deque()
        for job, index in waiting:
            self._send(job, [(index, error)])

    def _send(self, job: Job, items: list) -> None:
        self._send_all({job: items})

    @staticmethod
    def _send_all(batches: dict[Job, list], wait: bool = False) -> None:
        """Hand each job its items: one wake-up of each event loop per step, not one per job
        (each call_soon_threadsafe writes to the loop's self-pipe). wait: block until each loop has
        run the streams the items woke (see the module docstring)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, items in batches.items():
            by_loop.setdefault(job.loop, []).append((job, items))
        handed = []
        for loop, pairs in by_loop.items():
            done = threading.Event() if wait else None
            try:
                loop.call_soon_threadsafe(_deliver_all, pairs, done)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                continue
            if done is not None:
                handed.append(done)
        for done in handed:
            done.wait(HANDOFF_TIMEOUT)


def _deliver_all(pairs: list[tuple[Job, list]], done: threading.Event | None = None) -> None:
    """Runs on the event loop: put each job's items on its queue; then, once the readers those
    items woke have run (they were scheduled first), set `done`."""
    for job, items in pairs:
        for item in items:
            job.queue.put_nowait(item)
    if done is not None:
        asyncio.get_running_loop().call_soon(done.set)
