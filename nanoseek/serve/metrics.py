"""Server metrics in the Prometheus text format, written by hand (no client library).

What `GET /metrics` shows, with vLLM's meanings:

    nanoseek_requests_total{endpoint,status}      HTTP requests answered, by route and status
    nanoseek_request_finished_total{reason}       sequences ended: stop | length | cancelled | error
    nanoseek_prompt_tokens_total                  prompt tokens admitted to the engine
    nanoseek_generation_tokens_total              tokens generated
    nanoseek_num_requests_running                 sequences in the running batch (gauge)
    nanoseek_num_requests_waiting                 sequences queued for a slot (gauge)
    nanoseek_time_to_first_token_seconds          arrival -> first token, per sequence (histogram)
    nanoseek_time_per_output_token_seconds        (last - first token time) / (tokens - 1)
    nanoseek_e2e_request_latency_seconds          arrival -> last token, per sequence
    nanoseek_engine_decode_step_seconds_{sum,count}  engine.step() calls that only decoded (no
                                                  prefill): the engine's share of a token's time

The scheduler thread and the event loop both record, so every update takes a lock.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

# Latency buckets in seconds: fine at the bottom, where a tiny model lives, up to minutes.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0,
               120.0, 300.0)


class Histogram:
    """Cumulative buckets, a sum and a count: Prometheus' histogram type."""

    def __init__(self, buckets: tuple[float, ...]):
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out += [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """All counters of one server. Gauges are read at render time from the scheduler."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.finished: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.decode_steps, self.decode_step_s = 0, 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[endpoint, status] += 1

    def admitted(self, prompt_tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens

    def tokens(self, n: int) -> None:
        with self.lock:
            self.generation_tokens += n

    def decode_step(self, seconds: float) -> None:
        with self.lock:
            self.decode_steps += 1
            self.decode_step_s += seconds

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def sequence_done(self, reason: str, e2e: float | None = None,
                      tpot: float | None = None) -> None:
        """One sequence left the engine; latencies only for those that produced tokens."""
        with self.lock:
            self.finished[reason] += 1
            if e2e is not None:
                self.e2e.observe(e2e)
            if tpot is not None:
                self.tpot.observe(tpot)

    def render(self, running: int, waiting: int) -> str:
        """The /metrics page."""
        with self.lock:
            out = ["# HELP nanoseek_requests_total HTTP requests answered.",
                   "# TYPE nanoseek_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                out.append(f'nanoseek_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
            out += ["# HELP nanoseek_request_finished_total Sequences that left the engine, "
                    "by reason.", "# TYPE nanoseek_request_finished_total counter"]
            for reason in sorted(set(self.finished) | {"stop", "length", "cancelled", "error"}):
                out.append(f'nanoseek_request_finished_total{{reason="{reason}"}} '
                           f'{self.finished[reason]}')
            out += _scalar("nanoseek_prompt_tokens_total", "counter",
                           "Prompt tokens admitted to the engine.", self.prompt_tokens)
            out += _scalar("nanoseek_generation_tokens_total", "counter",
                           "Tokens generated.", self.generation_tokens)
            out += _scalar("nanoseek_engine_decode_step_seconds_sum", "counter",
                           "Seconds in engine steps that only decoded (no prefill).", self.decode_step_s)
            out += _scalar("nanoseek_engine_decode_step_seconds_count", "counter",
                           "Engine steps that only decoded (no prefill).", self.decode_steps)
            out += _scalar("nanoseek_num_requests_running", "gauge",
                           "Sequences in the running batch.", running)
            out += _scalar("nanoseek_num_requests_waiting", "gauge",
                           "Sequences queued for a batch slot.", waiting)
            for name, hist, help_ in (
                    ("nanoseek_time_to_first_token_seconds", self.ttft,
                     "Time from arrival to the first generated token."),
                    ("nanoseek_time_per_output_token_seconds", self.tpot,
                     "Mean time between output tokens of a sequence, after the first."),
                    ("nanoseek_e2e_request_latency_seconds", self.e2e,
                     "Time from arrival to the last generated token.")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"] + hist.lines(name)
        return "\n".join(out) + "\n"


def _scalar(name: str, kind: str, help_: str, value) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
