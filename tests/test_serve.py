"""The OpenAI-compatible server, end to end: the official `openai` client against a live uvicorn
server on loopback, running the real engine on a tiny random checkpoint.

Servers run in-process (uvicorn in a thread, port 0; tests/serving.py), so a test can start one with its own
settings in well under a second and look at the engine behind it. Expected outputs come from a
second engine on a second copy of the model, run alone: greedy decoding through the server,
batched with other requests or not, must give exactly the tokens the engine gives by itself.
Token ids are compared exactly through logprobs with vLLM's `return_tokens_as_token_ids`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from nanoseek.inference import Engine
from nanoseek.model import Transformer
from serving import CONTEXT, SLOTS, checkpoint, r1_tokenizer, serve, thinking_model, tokenizer  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Fixtures (the checkpoint and the server harness are in serving.py): live servers, reference
# generation


@pytest.fixture(scope="module")
def model(checkpoint):
    return Transformer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    with serve(model, tokenizer, max_queue=32) as s:
        yield s


@pytest.fixture(scope="module")
def alone(checkpoint, tokenizer):
    """generate(prompt_ids, n) -> the greedy token ids of an engine running only this prompt,
    on its own copy of the model (the server's runs in another thread)."""
    engine = Engine(Transformer.from_pretrained(checkpoint), max_batch_size=1,
                    max_seq_len=CONTEXT, tokenizer=tokenizer)

    def generate(prompt_ids: list[int], n: int) -> list[int]:
        return engine.generate([prompt_ids], max_new_tokens=n, temperature=0.0)[0]

    return generate


def chat_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def token_ids(logprobs_content) -> list[int]:
    """Ids back from logprob entries of a return_tokens_as_token_ids request."""
    return [int(e.token.removeprefix("token_id:")) for e in logprobs_content]


AS_IDS = {"return_tokens_as_token_ids": True}
HELLO = [{"role": "user", "content": "Hello, how are you?"}]


# ---------------------------------------------------------------------------------------------
# Plain requests through the openai client


def test_chat_matches_engine_alone_with_usage(live, tokenizer, alone):
    r = live.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, temperature=0, logprobs=True,
        extra_body=AS_IDS)
    prompt = chat_ids(tokenizer, HELLO)
    expected = alone(prompt, 12)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny"
    assert choice.message.role == "assistant"
    assert token_ids(choice.logprobs.content) == expected[:len(choice.logprobs.content)]
    assert choice.message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.total_tokens == len(prompt) + len(expected)
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")


def test_completion_matches_engine_alone(live, tokenizer, alone):
    c = live.client()
    r = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10,
                             temperature=0, logprobs=0, extra_body=AS_IDS)
    prompt = tokenizer.encode("Once upon a time", add_bos=True)
    expected = alone(prompt, 10)
    assert r.object == "text_completion"
    assert [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens] == \
        expected[:len(r.choices[0].logprobs.tokens)]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(expected)
    # Token-id prompts, several at once: one choice each, in order.
    r2 = c.completions.create(model="tiny", prompt=[prompt, prompt[:3]], max_tokens=10,
                              temperature=0)
    assert [ch.index for ch in r2.choices] == [0, 1]
    assert r2.choices[0].text == r.choices[0].text
    assert r2.usage.prompt_tokens == len(prompt) + 3


def test_streaming_equals_non_streaming(live):
    c = live.client()
    full = c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, temperature=0)
    # max_completion_tokens is OpenAI's newer name for max_tokens.
    chunks = list(c.chat.completions.create(model="tiny", messages=HELLO,
                                            max_completion_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == full.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage  # the usage chunk
    assert all(ch.usage is None for ch in chunks[:-1])

    comp = c.completions.create(model="tiny", prompt="abc", max_tokens=8, temperature=0)
    stream = list(c.completions.create(model="tiny", prompt="abc", max_tokens=8,
                                       temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in stream) == comp.choices[0].text


def test_sse_wire_format(live):
    body = {"messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, trust_env=False) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_n_choices_and_seed(live):
    c = live.client()
    kw = dict(model="tiny", messages=HELLO, max_tokens=10, temperature=1.0, n=3, seed=7,
              extra_body={"ignore_eos": True})
    a = c.chat.completions.create(**kw)
    b = c.chat.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1  # seed + i per choice
    assert all(ch.finish_reason == "length" for ch in a.choices)
    assert a.usage.completion_tokens == 30  # the prompt is counted once, the choices summed
    assert a.usage.prompt_tokens == b.usage.prompt_tokens < 30
    # Streaming with n=2: every choice streams and finishes exactly once.
    chunks = list(c.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, n=2,
                                            temperature=1.0, seed=7, stream=True))
    finished = [ch.choices[0].index for ch in chunks if ch.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    texts = ["".join(ch.choices[0].delta.content or "" for ch in chunks
                     if ch.choices[0].index == i) for i in range(2)]
    assert texts == [ch.message.content for ch in c.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=6, n=2, temperature=1.0, seed=7).choices]


def test_stop_sequences(live):
    c = live.client()
    full = c.completions.create(model="tiny", prompt="The weather", max_tokens=24,
                                temperature=0).choices[0].text
    # A stop string from the middle of the greedy text: the reply must end right before its
    # first occurrence.
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2)
                if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    cut = full[:full.index(stop)]
    r = c.completions.create(model="tiny", prompt="The weather", max_tokens=24, temperature=0,
                             stop=[stop, "never-appears"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24
    streamed = list(c.completions.create(model="tiny", prompt="The weather", max_tokens=24,
                                         temperature=0, stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs_shape(live):
    r = live.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=5,
                                              temperature=0, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert e.token == e.top_logprobs[0].token  # greedy picks the most likely token
        assert e.bytes == list(e.token.encode()) or "\ufffd" in e.token


def test_models_health_metrics(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(live.url + "/health", trust_env=False).json() == {"status": "ok"}
    m = live.metrics()
    for name in ("nanoseek_num_requests_running", "nanoseek_num_requests_waiting",
                 "nanoseek_prompt_tokens_total", "nanoseek_generation_tokens_total",
                 "nanoseek_time_to_first_token_seconds_count",
                 "nanoseek_time_per_output_token_seconds_count"):
        assert name in m
    assert m["nanoseek_time_to_first_token_seconds_count"] > 0
    assert m['nanoseek_requests_total{endpoint="/v1/chat/completions",status="200"}'] > 0


# ---------------------------------------------------------------------------------------------
# Continuous batching


def test_concurrent_streams_match_engine_alone(live, tokenizer, alone):
    """More clients than slots, arriving at staggered times: requests join the running batch
    mid-flight, others queue; every stream completes with the engine's own greedy tokens."""
    prompts = [[{"role": "user", "content": f"Count to {i}: one, two"}] for i in range(2 * SLOTS)]
    lengths = [20 + 4 * i for i in range(len(prompts))]

    async def one(client, i):
        await asyncio.sleep(0.01 * i)
        stream = await client.chat.completions.create(
            model="tiny", messages=prompts[i], max_tokens=lengths[i], temperature=0,
            stream=True, logprobs=True, extra_body=AS_IDS)
        ids, text = [], ""
        async for ch in stream:
            if ch.choices and ch.choices[0].logprobs:
                ids += token_ids(ch.choices[0].logprobs.content)
            if ch.choices:
                text += ch.choices[0].delta.content or ""
        return ids, text

    async def main():
        client = live.async_client()
        try:
            return await asyncio.gather(*(one(client, i) for i in range(len(prompts))))
        finally:
            await client.close()

    before = dict(live.engine.stats)
    results = asyncio.run(main())
    after = live.engine.stats
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["row_steps"] - before["row_steps"]
    assert rows / steps > 2, f"mean batch {rows / steps:.2f}: the requests were not batched"
    for i, (ids, text) in enumerate(results):
        expected = alone(chat_ids(tokenizer, prompts[i]), lengths[i])
        # a terminating EOS is counted in usage but not shown, as OpenAI shows no end token
        shown = expected[:-1] if expected[-1] in live.state.eos_ids else expected
        assert ids == shown, f"client {i}"
        assert text == tokenizer.decode(shown, skip_special_tokens=True), f"client {i}"
    assert live.metrics()["nanoseek_num_requests_running"] == 0


def _wait_idle(live, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live.metrics()["nanoseek_num_requests_running"] == 0 and live.engine.free_slots == SLOTS:
            return True
        time.sleep(0.05)
    return False


def test_disconnect_mid_stream_frees_the_slot(live):
    before = live.metrics()['nanoseek_request_finished_total{reason="cancelled"}']
    body = {"messages": HELLO, "max_tokens": CONTEXT - 40, "stream": True, "ignore_eos": True}
    with httpx.Client(trust_env=False) as client:
        with client.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(4)]  # a couple of chunks, then hang up
            assert all(g.startswith("data: ") or g == "" for g in got)
            assert live.metrics()["nanoseek_num_requests_running"] == 1
    assert _wait_idle(live), "the cancelled stream still holds its slot"
    assert live.metrics()['nanoseek_request_finished_total{reason="cancelled"}'] == before + 1
    # A non-streaming request abandoned by its client is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False},
                   timeout=httpx.Timeout(10, read=0.2), trust_env=False)
    assert _wait_idle(live), "the abandoned request still holds its slot"
    assert live.metrics()['nanoseek_request_finished_total{reason="cancelled"}'] == before + 2
    r = live.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_full_queue_answers_503(model, tokenizer):
    def wait_for(s, gauge):
        deadline = time.monotonic() + 5
        while s.metrics()[gauge] < 1:
            assert time.monotonic() < deadline, f"{gauge} never reached 1"
            time.sleep(0.01)

    with serve(model, tokenizer, slots=1, max_queue=1) as s:
        body = {"messages": HELLO, "max_tokens": CONTEXT - 40, "stream": True, "ignore_eos": True}
        url = s.url + "/v1/chat/completions"
        with httpx.Client(trust_env=False) as client:
            with client.stream("POST", url, json=body) as running:  # takes the only slot
                wait_for(s, "nanoseek_num_requests_running")
                with client.stream("POST", url, json=body) as waiting:  # fills the queue
                    assert waiting.status_code == 200
                    wait_for(s, "nanoseek_num_requests_waiting")
                    with pytest.raises(openai.APIStatusError) as e:
                        s.client().chat.completions.create(model="tiny", messages=HELLO,
                                                           max_tokens=2)
                    assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
                assert running.status_code == 200
        # Both hung up: the queue drains and the server answers again.
        assert s.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)


# ---------------------------------------------------------------------------------------------
# Errors


def test_named_errors(live):
    c = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi " * 400}])
    assert str(CONTEXT) in e.value.message and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="hi", max_tokens=CONTEXT)
    assert str(CONTEXT) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HELLO, temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=HELLO, presence_penalty=1.0)
    assert e.value.body["param"] == "presence_penalty"


VALID = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_VALUES = [None, True, -1, 0, 1e308, float("nan"), 2**70, "", "x" * 50, [], [1, "a"], {},
              {"a": {"b": []}}, [[[]]], "\u0000", -0.5]
FUZZ_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "n", "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs",
               "prompt", "top_k", "min_p", "tools", "echo"]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _key(*parts):
    return tuple(json.dumps(p, allow_nan=True) for p in parts)


# The fuzzer's mutations of VALID that may be answered 200, pinned: a value that means "default" or
# "off", a valid value, or a field the endpoint ignores. Anything else must be a 4xx: a server that
# coerces "stream": 1 or "max_tokens": true, or ignores a misspelt type, fails here.
CHAT_MAY_SUCCEED = {_key(f, v) for f, v in [
    ("model", None), ("max_tokens", None), ("max_completion_tokens", None), ("temperature", 0),
    ("stop", None), ("stop", "x" * 50), ("stop", []), ("stop", "\u0000"), ("seed", None), ("seed", 0),
    ("stream", True), ("stream_options", None), ("logprobs", True), ("top_logprobs", None),
    ("top_k", -1), ("top_k", 0), ("min_p", 0), ("tools", None), ("tools", []), ("echo", None),
    ("echo", 0)]} | {_key("prompt", v) for v in BAD_VALUES}  # not a chat field: ignored, as vLLM does
MESSAGE_MAY_SUCCEED = {_key("user", c) for c in ("", "x" * 50, [], "\u0000", "ok")}
# VALID has no prompt (and /v1/completions ignores messages): only a valid prompt can succeed there.
COMPLETIONS_MAY_SUCCEED = {_key("prompt", v) for v in ("", "x" * 50, "\u0000")}


def may_succeed(path, key) -> bool:
    """key: None (broken JSON) or (field mutation or None, message mutation or None)."""
    if key is None:
        return False
    field, message = key
    if path == COMPLETIONS:
        return field in COMPLETIONS_MAY_SUCCEED
    return (field is None or field in CHAT_MAY_SUCCEED) and (message is None or message in MESSAGE_MAY_SUCCEED)


def fuzz_bodies(rng: random.Random, n: int):
    """(body, key) pairs: broken JSON and wrong shapes (key None), and VALID with one field spoiled
    and sometimes its message too (key (field mutation, message mutation), either None when not
    made or overwritten); truncated or bit-flipped JSON gets key None."""
    fixed = [b"", b"{", b"null", b"[]", b'"text"', b"{}", b"\xff\xfe", b'{"messages": 1}',
             b'{"model": "tiny", "messages": [{"role": "user"}]}',
             b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
             b'{"messages": [{"role": "assistant", "content": "x"}]}',
             json.dumps({**VALID, "top_logprobs": 2}).encode(),
             json.dumps({**VALID, "stop": [""]}).encode(),
             json.dumps({**VALID, "n": 1000}).encode()]
    yield from ((raw, None) for raw in fixed)
    for _ in range(n):
        body = json.loads(json.dumps(VALID))
        field, value = rng.choice(FUZZ_FIELDS), rng.choice(BAD_VALUES)
        body[field] = value
        key = (_key(field, value), None)
        if rng.random() < 0.3:
            role, content = rng.choice(["user", "bot", 3]), rng.choice(BAD_VALUES + ["ok"])
            body["messages"] = [{"role": role, "content": content}]
            key = (None if field == "messages" else key[0], _key(role, content))
        raw = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.2:  # truncated or bit-flipped JSON
            raw = raw[:rng.randrange(len(raw))] + bytes([rng.randrange(256)])
            key = None
        yield raw, key


def test_fuzzed_bad_requests_get_4xx_json(live):
    rng = random.Random(0)
    statuses, succeeded = {}, set()
    with httpx.Client(base_url=live.url, trust_env=False, timeout=30) as client:
        for raw, key in fuzz_bodies(rng, 300):
            for path in (CHAT, COMPLETIONS):
                r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
                if r.status_code == 200:
                    assert may_succeed(path, key), (path, raw, "accepted, but not a valid request")
                    succeeded.add((path, key))
                    continue
                assert 400 <= r.status_code < 500, (raw, r.status_code, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        for method, path, expect in [("GET", CHAT, 405), ("GET", "/nope", 404),
                                     ("DELETE", "/v1/models", 405)]:
            r = client.request(method, path)
            assert r.status_code == expect and "error" in r.json()
        r = client.post(COMPLETIONS, content=b"x" * (9 * 1024 * 1024))
        assert r.status_code == 413 and "error" in r.json()
    assert statuses.get(400, 0) > 300 and len(succeeded) > 10
    assert live.metrics().get('nanoseek_requests_total{endpoint="/v1/chat/completions",status="500"}') is None
    # ... and the server still serves.
    assert live.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=2)


COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
# Bodies that must be refused with a 400 naming `param`: wrong types are never coerced, every range
# is enforced, unsupported features are refused rather than ignored.
MUST_REJECT = [
    (CHAT, {"max_tokens": True}, "max_tokens"), (CHAT, {"max_tokens": 2.0}, "max_tokens"),
    (CHAT, {"max_tokens": "5"}, "max_tokens"), (CHAT, {"max_tokens": 0}, "max_tokens"),
    (CHAT, {"max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"stream": 1}, "stream"), (CHAT, {"stream": "true"}, "stream"),
    (CHAT, {"temperature": "0.5"}, "temperature"), (CHAT, {"temperature": 2.5}, "temperature"),
    (CHAT, {"temperature": None}, "temperature"), (CHAT, {"top_p": 0}, "top_p"), (CHAT, {"top_p": 1.5}, "top_p"),
    (CHAT, {"n": 1.0}, "n"), (CHAT, {"n": True}, "n"), (CHAT, {"n": 0}, "n"), (CHAT, {"n": 65}, "n"),
    (CHAT, {"seed": -1}, "seed"), (CHAT, {"seed": 2**63}, "seed"), (CHAT, {"seed": "1"}, "seed"),
    (CHAT, {"stop": [""]}, "stop"), (CHAT, {"stop": ["a"] * 17}, "stop"), (CHAT, {"stop": [1]}, "stop"),
    (CHAT, {"stop": 5}, "stop"), (CHAT, {"logprobs": 1}, "logprobs"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"), (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"stream_options": {"include_usage": True}}, "stream_options"),
    (CHAT, {"stream": True, "stream_options": True}, "stream_options"),
    (CHAT, {"stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    (CHAT, {"presence_penalty": 0.5}, "presence_penalty"), (CHAT, {"logit_bias": {"1": 5}}, "logit_bias"),
    (CHAT, {"response_format": {"type": "json_object"}}, "response_format"),
    (CHAT, {"messages": []}, "messages"), (CHAT, {"messages": [3]}, "messages"),
    (CHAT, {"messages": [{"role": "bot", "content": "x"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
    (CHAT, {"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
    (CHAT, {"top_k": -2}, "top_k"), (CHAT, {"top_k": 1.5}, "top_k"), (CHAT, {"min_p": 1.0}, "min_p"),
    (CHAT, {"ignore_eos": "yes"}, "ignore_eos"), (CHAT, {"return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
    (CHAT, {"model": 5}, "model"), (CHAT, {"user": 3}, "user"),
    (COMPLETIONS, {"prompt": None}, "prompt"), (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [1, "a"]}, "prompt"), (COMPLETIONS, {"prompt": [[]]}, "prompt"),
    (COMPLETIONS, {"prompt": [True]}, "prompt"), (COMPLETIONS, {"prompt": [-1]}, "prompt"),
    (COMPLETIONS, {"prompt": 5}, "prompt"), (COMPLETIONS, {"logprobs": True}, "logprobs"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"), (COMPLETIONS, {"echo": True}, "echo"),
    (COMPLETIONS, {"suffix": "x"}, "suffix"), (COMPLETIONS, {"best_of": 2}, "best_of"),
    (COMPLETIONS, {"max_tokens": 1.5}, "max_tokens"),
]


def test_bodies_that_must_be_rejected_name_their_param(live):
    with httpx.Client(base_url=live.url, trust_env=False, timeout=30) as client:
        for path, change, param in MUST_REJECT:
            body = {**(VALID if path == CHAT else COMPLETION), **change}
            r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, change, r.status_code, r.text[:200])
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], (change, err)
        for path, body in ((CHAT, VALID), (COMPLETIONS, COMPLETION)):  # the bodies themselves are fine
            assert client.post(path, json=body).status_code == 200


def test_bugs_answer_500_and_the_server_survives(model, tokenizer, monkeypatch):
    """Not the client's fault, so a 500, but still JSON, and nothing stays broken."""
    with serve(model, tokenizer) as s:
        real_step = s.engine.step

        def failing_step():  # the engine raises once, mid-generation
            s.engine.step = real_step
            raise RuntimeError("boom")

        s.engine.step = failing_step
        with pytest.raises(openai.InternalServerError) as e:
            s.client().chat.completions.create(**VALID)
        assert e.value.status_code == 500 and e.value.body["code"] == "engine_failure"
        assert s.client().chat.completions.create(**VALID).choices  # the scheduler lives on
        assert s.engine.free_slots == SLOTS

        monkeypatch.setattr("nanoseek.serve.protocol.chat_completion", lambda *a: 1 / 0)
        r = httpx.post(s.url + "/v1/chat/completions", json=VALID, trust_env=False)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert s.metrics()['nanoseek_requests_total{endpoint="/v1/chat/completions",status="500"}'] == 1
        monkeypatch.undo()
        assert s.client().chat.completions.create(**VALID).choices


def test_api_key(model, tokenizer):
    with serve(model, tokenizer, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").models.list()
        assert e.value.body["code"] == "invalid_api_key"
        for headers in ({}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"}):
            r = httpx.post(s.url + "/v1/chat/completions", json=VALID, headers=headers,
                           trust_env=False)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert s.client(api_key="s3cret").chat.completions.create(**VALID).choices
        for path in ("/health", "/metrics", "/"):  # only /v1/* is guarded
            assert httpx.get(s.url + path, trust_env=False).status_code == 200


def test_health_is_503_while_loading(model, tokenizer):
    with serve(model, tokenizer, start=False) as s:
        r = httpx.get(s.url + "/health", trust_env=False)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as e:
            s.client().chat.completions.create(**VALID)
        assert e.value.status_code == 503
        s.state.start(Engine(model, max_batch_size=1, max_seq_len=CONTEXT, tokenizer=tokenizer),
                      tokenizer)
        assert httpx.get(s.url + "/health", trust_env=False).status_code == 200
        assert s.client().chat.completions.create(**VALID).choices


# ---------------------------------------------------------------------------------------------
# R1-style reasoning


def test_reasoning_split(checkpoint, tokenizer):
    tok = r1_tokenizer(tokenizer)
    with serve(thinking_model(checkpoint, tokenizer), tok, reasoning_parser="deepseek-r1") as s:
        c = s.client()
        messages = [{"role": "user", "content": "And 7 times 8?"}]
        prompt = chat_ids(tok, messages)
        assert tok.decode(prompt).endswith("<think>\n")
        # The raw text, through /v1/completions (no parser) from the same prompt ids.
        raw = c.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                   temperature=0).choices[0].text
        assert "</think>" in raw, f"the boosted model should emit </think>: {raw!r}"
        thought, answer = raw.split("</think>", 1)
        assert thought.strip() and answer.strip(), f"want both parts to be non-empty: {raw!r}"
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                      temperature=0)
        msg = r.choices[0].message
        assert msg.reasoning_content == thought.strip()
        assert msg.content == answer.lstrip()
        chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                                temperature=0, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks]
        streamed_thought = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert streamed_thought == msg.reasoning_content
        assert "".join(d.content or "" for d in deltas) == msg.content


# ---------------------------------------------------------------------------------------------
# The command line: `nanoseek serve` and `nanoseek bench serve`


def test_cli_serve(checkpoint):
    # A bad --model is refused by the argument parser, before anything loads (run alongside).
    bad = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", "/nonexistent"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(checkpoint),
                             "--port", str(port), "--max-batch-size", "2", "--max-model-len", "128",
                             "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "nanoseek serve never became ready"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", trust_env=False, timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                               http_client=httpx.Client(trust_env=False))
        model_id = client.models.list().data[0].id
        assert model_id == checkpoint.name
        r = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        with pytest.raises(openai.BadRequestError, match="128"):
            client.completions.create(model=model_id, prompt="hi", max_tokens=200)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and "config.json" in err


def test_bench_serve_runs(live, tmp_path, capsys):
    from nanoseek.bench import serve as bench_serve

    out = tmp_path / "bench.jsonl"
    assert bench_serve.main(["--url", live.url, "--concurrency", "1,2", "--num-prompts", "4",
                             "--output-len", "6", "--input-len", "4", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["clients"] for r in rows] == [1, 2] and all(r["requests"] == 4 for r in rows)
    assert all(r["output_tokens"] == 4 * 6 for r in rows)  # ignore_eos: exact lengths
    table = capsys.readouterr().out
    assert re.search(r"\| 2 \| 4 \|", table) and "throughput at 2 clients" in table
    with pytest.raises(SystemExit):
        bench_serve.main(["--url", "http://10.0.0.1:8000"])  # loopback only
