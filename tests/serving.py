"""What the server tests share (test_serve.py, test_web.py): a tiny random checkpoint with a
small BPE tokenizer, servers run in-process (uvicorn in a thread, port 0) on the real engine, and
R1-style variants of the tokenizer and model.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from nanoseek.data import Tokenizer, train_bpe
from nanoseek.data.tokenizer import CHAT_TEMPLATE
from nanoseek.inference import Engine
from nanoseek.model import Transformer
from nanoseek.serve import ServerState, create_app
from nanoseek.stages import init as init_stage

CONTEXT = 256  # small, so the context-limit error is cheap to reach
SLOTS = 4  # engine batch slots of the shared server
# A few sentences are enough for a BPE: the model is random anyway.
CORPUS = [
    "Hello, how are you today? I am fine, thank you. The weather is nice and the sky is blue.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Once upon a time a small model learned to count: one, two, three, four, five.",
    "Question: what is seven times six? Answer: forty-two. Think first, then answer.",
] * 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random 2-layer tiny model with a small BPE tokenizer next to it."""
    root = tmp_path_factory.mktemp("serve")
    tok = train_bpe(CORPUS, vocab_size=512)
    tok.save(root / "tokenizer")
    out = root / "tiny"
    assert init_stage.main(["--preset", "tiny", "--out", str(out), "--set", "num_hidden_layers=2",
                            "--set", f"vocab_size={tok.vocab_size}",
                            "--tokenizer", str(root / "tokenizer")]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(checkpoint) -> Tokenizer:
    return Tokenizer.from_dir(checkpoint)


@dataclass
class Live:
    """A running server and what is behind it."""

    url: str
    state: ServerState
    engine: Engine | None
    server: uvicorn.Server

    def client(self, **kw) -> openai.OpenAI:
        kw.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60,
                             http_client=httpx.Client(trust_env=False), **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0,
                                  timeout=60, http_client=httpx.AsyncClient(trust_env=False))

    def metrics(self) -> dict[str, float]:
        """The /metrics page as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", trust_env=False).text
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                         if line and not line.startswith("#"))}


@contextlib.contextmanager
def serve(model, tokenizer, *, start=True, slots=SLOTS, context=CONTEXT, **state_kw):
    """Run create_app(...) under uvicorn in a thread on a free loopback port."""
    state = ServerState(state_kw.pop("model_name", "tiny"), **state_kw)
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    engine = None
    if start:
        engine = Engine(model, max_batch_size=slots, max_seq_len=context, tokenizer=tokenizer)
        state.start(engine, tokenizer)
    try:
        yield Live(f"http://127.0.0.1:{port}", state, engine, server)
    finally:
        server.should_exit = True
        thread.join(20)



def r1_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The same vocabulary with R1's later chat template, which opens <think> itself."""
    config = dict(tokenizer.config)
    config["chat_template"] = CHAT_TEMPLATE.replace(
        "{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    assert config["chat_template"] != CHAT_TEMPLATE
    return Tokenizer(tokenizer.tk, config)


def thinking_model(checkpoint, tokenizer) -> Transformer:
    """A copy of the random model whose </think> logit is scaled up, so greedy decoding emits
    </think> early: a stand-in for a model that reasons then answers."""
    model = Transformer.from_pretrained(checkpoint)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.think_end_id] *= 2.0
    return model
