"""The FastAPI app: OpenAI-compatible routes over the scheduler, plus health, metrics and a chat page.

    POST /v1/chat/completions   chat, streamed (SSE) or not; n choices; reasoning split
    POST /v1/completions        plain completion of a prompt (text or token ids, one or many)
    GET  /v1/models             the one served model
    GET  /health                200 once the model is loaded, 503 while loading
    GET  /metrics               Prometheus text (metrics.py)
    GET  /                      the web chat page (static/index.html)

A request goes: read and validate the body (protocol.py) -> render the chat template and
tokenize -> check it fits the context -> one SamplingParams per choice -> `scheduler.submit`
-> read the job's events, either into one JSON reply or into SSE chunks as they come.

Every failure a client can cause is an OpenAI-shaped 4xx: the handlers below turn APIError,
unknown routes and anything unexpected into JSON, and the scheduler thread survives a failing
engine. A client that disconnects has its job cancelled: for streams, Starlette cancels the
response generator and its `finally` cancels the job; a non-streaming request races its
collection against the disconnect message.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.inference import SamplingParams
from nanoseek.serve import protocol as P
from nanoseek.serve.metrics import Metrics
from nanoseek.inference.reasoning import ReasoningParser, prompt_opens_thinking
from nanoseek.serve.scheduler import EngineFailure, Job, QueueFull, Scheduler

log = logging.getLogger("nanoseek.serve")

STATIC = Path(__file__).parent / "static"
REASONING_PARSERS = ("deepseek-r1",)
# Paths counted by name in nanoseek_requests_total; anything else counts as "other", so a
# scanner probing random URLs cannot grow the metrics without bound.
KNOWN_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/")


class ServerState:
    """What the routes share. The engine side is None until `start` (the model has loaded).

    model_name: the id clients send as "model".
    api_key: required as "Authorization: Bearer KEY" on /v1/* when set.
    max_queue: sequences allowed to wait for a batch slot (503 past that).
    reasoning_parser: None or "deepseek-r1".
    """

    def __init__(self, model_name: str, api_key: str | None = None, max_queue: int = 128,
                 reasoning_parser: str | None = None):
        if reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"unknown reasoning parser {reasoning_parser!r}; "
                             f"choose from {REASONING_PARSERS}")
        self.model_name = model_name
        self.api_key = api_key
        self.max_queue = max_queue
        self.reasoning_parser = reasoning_parser
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.tokenizer = None
        self.load_error: str | None = None

    def start(self, engine, tokenizer) -> None:
        """The model is loaded: start the scheduler thread and begin answering."""
        args = engine.model.args
        self.max_model_len = engine.max_seq_len
        self.vocab_size = args.vocab_size
        self.eos_ids = set(args.eos_token_ids) | {tokenizer.eos_id}
        self.tokenizer = tokenizer
        self.token_text = P.TokenText(tokenizer)
        scheduler = Scheduler(engine, self.max_queue, self.metrics)
        scheduler.start()
        self.scheduler = scheduler  # last: the routes treat a scheduler as "ready"

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()


def create_app(state: ServerState) -> FastAPI:
    """The ASGI app for one model. Start the engine side with `state.start(engine, tokenizer)`."""

    @asynccontextmanager
    async def lifespan(app):
        yield
        state.close()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    app.add_middleware(CountRequests, metrics=state.metrics)
    app.add_exception_handler(P.APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(api)
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---------------------------------------------------------------------------------------------
# Plumbing: auth, readiness, body size, errors, request counting


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _endpoint(path: str) -> str:
    return path if path in KNOWN_PATHS else "other"


async def require_api_key(request: Request) -> None:
    key = _state(request).api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # compare_digest: the time taken must not reveal how much of the key matched.
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise P.APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                         param=None, code="invalid_api_key")


def _ready(request: Request) -> ServerState:
    state = _state(request)
    if state.scheduler is None:
        raise P.APIError(503, state.load_error or "the model is still loading",
                         type="server_error", code="model_not_ready")
    return state


async def _read_body(request: Request) -> bytes:
    """The request body, refusing one past MAX_BODY_BYTES before it is all in memory."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > P.MAX_BODY_BYTES:
            raise P.APIError(413, f"the request body is larger than {P.MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes (404) and wrong methods (405), in the same shape as everything else.
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(P.error_body(str(exc.detail), code=code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(P.error_body(f"invalid request: {exc.errors()}"), status_code=400)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not the client's doing: keep serving and say so in the usual shape.
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(P.error_body(f"internal error: {type(exc).__name__}", type="server_error"),
                        status_code=500)


class CountRequests:
    """ASGI middleware: count every answered request by path and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = _endpoint(scope["path"])

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.request(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


# ---------------------------------------------------------------------------------------------
# Turning a validated request into engine work


def check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise P.APIError(404, f"the model '{model}' does not exist; this server serves "
                              f"'{state.model_name}'", param="model", code="model_not_found")


def plan_tokens(state: ServerState, prompt_len: int, requested: int | None, param: str) -> int:
    """max_new_tokens for a prompt: the request's, or what is left of the context."""
    limit = state.max_model_len
    if prompt_len == 0:
        raise P.APIError(400, f"the {param} is empty", param=param)
    if requested is None:
        if prompt_len < limit:
            return limit - prompt_len
        requested = 1
    if prompt_len + requested > limit:
        raise P.APIError(
            400, f"This model's maximum context length is {limit} tokens. However, you "
                 f"requested {prompt_len + requested} tokens ({prompt_len} in the {param}, "
                 f"{requested} in the completion). Please reduce the length of the {param} "
                 f"or the completion.", param=param, code="context_length_exceeded")
    return requested


def sampling_params(req, max_new_tokens: int, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice. With a seed, choice i uses seed + i, so n seeded choices
    differ from each other yet reproduce run to run."""
    return [SamplingParams(
        max_new_tokens=max_new_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=max(req.top_k, 0), min_p=req.min_p,
        seed=None if req.seed is None else (req.seed + i) % (P.MAX_SEED + 1),
        stop=list(req.stop), ignore_eos=req.ignore_eos, logprobs=req.num_logprobs)
        for i in range(n)]


def submit(state: ServerState, prompts: list[list[int]], params: list) -> Job:
    if len(params) > state.max_queue:  # could never be queued, however long it waited
        raise P.APIError(400, f"the request asks for {len(params)} sequences (n times prompts); "
                              f"this server queues at most {state.max_queue}", param="n")
    try:
        return state.scheduler.submit(prompts, params)
    except QueueFull as e:
        raise P.APIError(503, str(e), type="server_error", code="queue_full") from None


class Choice:
    """What one sequence has produced so far, and how each new event changes the reply."""

    def __init__(self, index: int, state: ServerState, want_logprobs: bool,
                 tokens_as_ids: bool = False, parser: ReasoningParser | None = None):
        self.index = index
        self.state = state
        self.want_logprobs = want_logprobs
        self.tokens_as_ids = tokens_as_ids
        self.parser = parser
        self.text = self.reasoning = self.content = ""
        self.tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list = []  # (token, logprob, top) triples

    def add(self, ev) -> tuple[str, str, list]:
        """Take one StepEvent; return the (reasoning, content, logprob triples) it adds."""
        self.tokens += 1
        new_logprobs = []
        # A terminating EOS is counted in usage but not shown, as OpenAI shows no end token.
        is_end = ev.finished and ev.finish_reason == "stop" and ev.token_id in self.state.eos_ids
        if self.want_logprobs and not is_end:
            text_of = self.state.token_text
            top = [(text_of(t, self.tokens_as_ids), lp) for t, lp in ev.top_logprobs or []]
            new_logprobs.append((text_of(ev.token_id, self.tokens_as_ids), ev.logprob, top))
            self.logprobs += new_logprobs
        text = ev.text or ""
        self.text += text
        reasoning, content = self.parser.feed(text) if self.parser else ("", text)
        if ev.finished:
            self.finish_reason = ev.finish_reason or "stop"
            if self.parser:
                r, c = self.parser.finish()
                reasoning, content = reasoning + r, content + c
        self.reasoning += reasoning
        self.content += content
        return reasoning, content, new_logprobs


def _chat_logprobs(triples: list) -> list[dict]:
    return [P.chat_logprob_entry(tok, lp, top) for tok, lp, top in triples]


def _job_error(e: Exception) -> P.APIError:
    """What a failure delivered through a job becomes for the client."""
    if isinstance(e, ValueError):  # the engine refused the sequence (e.g. too long)
        return P.APIError(400, str(e))
    if isinstance(e, EngineFailure):
        return P.APIError(500, str(e), type="server_error", code="engine_failure")
    return P.APIError(503, str(e), type="server_error", code="shutting_down")


async def collect(request: Request, state: ServerState, job: Job, choices: list[Choice]) -> bool:
    """Read a job's events into its choices. False if the client disconnected first (the
    job is then cancelled); a failure delivered by the scheduler raises an APIError."""

    async def read():
        async for i, ev in job.events():
            choices[i].add(ev)

    async def disconnected():
        # The body has been read, so the next ASGI message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(read()), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        work.cancel()
        state.scheduler.cancel(job)  # a no-op when the job finished
    if work not in done:
        return False
    try:
        work.result()
    except (ValueError, EngineFailure, RuntimeError) as e:
        raise _job_error(e) from None
    return True


async def _tokenize(fn, *args):
    """Run tokenizer work off the event loop: a megabyte prompt must not stall other streams."""
    try:
        return await asyncio.to_thread(fn, *args)
    except P.APIError:
        raise
    except Exception as e:
        raise P.APIError(400, f"could not tokenize the input: {e}") from None


# ---------------------------------------------------------------------------------------------
# Routes

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
pages = APIRouter()


@api.get("/models")
async def models(request: Request):
    state = _ready(request)
    return {"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": 0, "owned_by": "nanoseek",
        "max_model_len": state.max_model_len}]}


@api.post("/chat/completions")
async def chat_completions(request: Request):
    state = _ready(request)
    req = P.parse_request(P.ChatCompletionRequest, await _read_body(request))
    check_model(state, req.model)
    tok = state.tokenizer
    prompt = await _tokenize(tok.apply_chat_template, req.conversation())
    dropped = req.unrendered_tool_call(prompt)
    if dropped:  # refuse rather than answer a history the model never saw
        raise P.APIError(400, f"{dropped}: this model's chat template does not render tool calls, so "
                              f"the model would not see them; send the history without tool_calls "
                              f"(e.g. as assistant text)", param="messages")
    prompt_ids = await _tokenize(tok.encode, prompt)
    max_new = plan_tokens(state, len(prompt_ids), req.max_new_tokens, "messages")
    job = submit(state, [prompt_ids] * req.n, sampling_params(req, max_new, req.n))

    in_reasoning = prompt_opens_thinking(prompt)
    with_reasoning = state.reasoning_parser is not None
    choices = [Choice(i, state, req.logprobs, req.return_tokens_as_token_ids,
                      ReasoningParser(in_reasoning) if with_reasoning else None)
               for i in range(req.n)]
    rid, created = P.new_id("chatcmpl"), P.now()

    def usage():
        return P.usage(len(prompt_ids), sum(c.tokens for c in choices))

    if req.stream:
        async def stream():
            def chunk(choice_list, usage_=None):
                return P.sse(P.chat_chunk(rid, created, state.model_name, choice_list, usage_,
                                          with_usage=req.include_usage))
            try:
                for c in choices:
                    yield chunk([P.chat_delta(c.index, {"role": "assistant", "content": ""})])
                async for i, ev in job.events():
                    reasoning, content, lps = choices[i].add(ev)
                    delta = {}
                    if reasoning:
                        delta["reasoning_content"] = reasoning
                    if content:
                        delta["content"] = content
                    if delta or lps or ev.finished:
                        yield chunk([P.chat_delta(
                            i, delta, choices[i].finish_reason,
                            _chat_logprobs(lps) if req.logprobs else None)])
                if req.include_usage:
                    yield chunk([], usage())
            except (ValueError, EngineFailure, RuntimeError) as e:
                yield P.sse(_job_error(e).body())
            finally:
                state.scheduler.cancel(job)  # the client left early: free the slots now
            yield P.SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    if not await collect(request, state, job, choices):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return P.chat_completion(rid, created, state.model_name, [
        P.chat_choice(c.index, c.content, c.reasoning, c.finish_reason,
                      _chat_logprobs(c.logprobs) if req.logprobs else None, with_reasoning)
        for c in choices], usage())


@api.post("/completions")
async def completions(request: Request):
    state = _ready(request)
    req = P.parse_request(P.CompletionRequest, await _read_body(request))
    check_model(state, req.model)
    tok = state.tokenizer
    prompts = []
    for p in req.prompt:
        if isinstance(p, str):
            # Documents were trained with BOS in front; a raw completion starts one.
            prompts.append(await _tokenize(tok.encode, p, True))
        elif max(p) >= state.vocab_size:
            raise P.APIError(400, f"token id {max(p)} is out of range (vocabulary size "
                                  f"{state.vocab_size})", param="prompt")
        else:
            prompts.append(p)
    # Every prompt gets the same max_new_tokens: the request's, or what the longest prompt leaves.
    max_new = min(plan_tokens(state, len(p), req.max_new_tokens, "prompt") for p in prompts)
    seqs = [(p, params) for p in prompts for params in sampling_params(req, max_new, req.n)]
    job = submit(state, [p for p, _ in seqs], [params for _, params in seqs])

    choices = [Choice(i, state, req.logprobs is not None, req.return_tokens_as_token_ids)
               for i in range(job.n)]
    rid, created = P.new_id("cmpl"), P.now()

    def usage():
        return P.usage(sum(len(p) for p in prompts), sum(c.tokens for c in choices))

    def logprobs(triples, offset=0):
        return P.completion_logprobs(triples, offset) if req.logprobs is not None else None

    if req.stream:
        async def stream():
            def chunk(choice_list, usage_=None):
                return P.sse(P.completion_chunk(rid, created, state.model_name, choice_list,
                                                usage_, with_usage=req.include_usage))
            try:
                async for i, ev in job.events():
                    c = choices[i]
                    offset = len(c.text)
                    _, text, lps = c.add(ev)
                    if text or lps or ev.finished:
                        yield chunk([P.completion_choice(i, text, c.finish_reason,
                                                         logprobs(lps, offset))])
                if req.include_usage:
                    yield chunk([], usage())
            except (ValueError, EngineFailure, RuntimeError) as e:
                yield P.sse(_job_error(e).body())
            finally:
                state.scheduler.cancel(job)
            yield P.SSE_DONE

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    if not await collect(request, state, job, choices):
        return Response(status_code=499)
    return P.completion(rid, created, state.model_name, [
        P.completion_choice(c.index, c.text, c.finish_reason, logprobs(c.logprobs))
        for c in choices], usage())


@pages.get("/health")
async def health(request: Request):
    state = _state(request)
    if state.scheduler is not None:
        return {"status": "ok"}
    status = "failed" if state.load_error else "loading"
    return JSONResponse({"status": status, "error": state.load_error}, status_code=503)


@pages.get("/metrics")
async def metrics(request: Request):
    state = _state(request)
    s = state.scheduler
    text = state.metrics.render(s.num_running if s else 0, s.num_waiting if s else 0)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@pages.get("/")
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html")
