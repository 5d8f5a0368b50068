"""The OpenAI-compatible server (`nanoseek serve`).

    protocol.py   request validation, response and SSE chunk shapes, OpenAI-shaped errors
    scheduler.py  the thread that owns the engine: continuous batching, queue, cancellation
    metrics.py    Prometheus text for GET /metrics
    app.py        the FastAPI routes tying them together
    static/       the web chat page served at /

The R1 <think>...</think> split into reasoning_content / content is nanoseek/inference/reasoning.py.
The entry point is nanoseek/stages/serve.py; the load generator is nanoseek/bench/serve.py.
"""

from nanoseek.serve.app import ServerState, create_app
from nanoseek.serve.scheduler import Scheduler

__all__ = ["Scheduler", "ServerState", "create_app"]
