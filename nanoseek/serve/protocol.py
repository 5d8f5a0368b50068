"""The OpenAI wire format: request validation, response and chunk shapes, errors.

Everything here is plain data in, plain dicts out; no engine, no web framework. The routes in
app.py parse a body with `parse_request`, turn a validated request into engine work, and build
the replies with the functions at the bottom of this file.

Validation choices (compared with api.openai.com and vLLM):
- Types are strict: `"max_tokens": "5"` or `"stream": 1` is a 400, not silently coerced.
- Unknown fields are ignored, as vLLM does, so newer clients keep working. Fields OpenAI
  defines but this server does not implement (`tools`, penalties, `logit_bias`, `echo`, ...)
  are accepted only at their "off" value: a client that relies on them gets a 400 naming the
  field instead of silently different output.
- vLLM's sampling extras are accepted too (`top_k`, `min_p`, `ignore_eos`,
  `return_tokens_as_token_ids`), sent by the openai client through `extra_body`.
- `model` may be omitted and then means the served model (vLLM's behaviour); a wrong name is
  a 404.
"""

from __future__ import annotations

import json
import time
import uuid
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Request limits. Every number a client sends is bounded, so no value can make the server
# allocate something absurd.
MAX_N = 64  # choices per request
MAX_STOP = 16  # stop strings per request (OpenAI allows 4; vLLM any number)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat
MAX_BODY_BYTES = 8 * 1024 * 1024  # a request body past this is a 413
MAX_SEED = 2**63 - 1
MAX_TOKENS_LIMIT = 2**31 - 1  # the real cap is the context; this only keeps ints sane

# Parameters OpenAI defines that this server does not implement, with the values that mean
# "off" (compared with ==, so 0 also matches 0.0 and False).
UNSUPPORTED = {
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


# ---------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

    status: the HTTP status (400 bad request, 401 bad key, 404 unknown model, 413 body too
    large, 503 loading or queue full).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The JSON body of an error reply."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Requests


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Request(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Any = Field(None, validate_default=True)  # str | list[str] | None, see _stop
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras.
    top_k: int = Field(0, ge=-1, le=1_000_000)  # 0 or -1: off
    min_p: float = Field(0.0, ge=0.0, lt=1.0)
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise ValueError("must be a string or a list of strings")
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    @model_validator(mode="after")
    def _common(self):
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "'stream_options' is only allowed when 'stream' "
                                                "is true")
        for name, off in UNSUPPORTED.items():
            if name in (self.model_extra or {}) and self.model_extra[name] not in off:
                raise _FieldError(name, f"'{name}' is not supported by this server")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


class ToolCall(BaseModel):
    """A tool call of a past assistant turn. Kept in the history the template renders (never
    dropped): a template that does not render it makes the request a 400 (see app.py)."""
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content parts of type {part.type!r} are not supported "
                                 f"(text only)")
            parts.append(part.text)
        return "".join(parts)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _FieldError("top_logprobs", "'top_logprobs' requires 'logprobs': true")
        if self.messages[-1].role == "assistant":
            # The DeepSeek template has no way to continue a final assistant turn.
            raise _FieldError("messages", "the last message must not be from the assistant")
        for i, m in enumerate(self.messages):
            if m.content is None and m.role != "assistant":
                raise _FieldError("messages", f"messages[{i}].content is required for role "
                                              f"{m.role!r}")
            if m.tool_calls and m.role != "assistant":
                raise _FieldError("messages", f"messages[{i}].tool_calls is only allowed on "
                                              f"assistant messages")
            try:
                m.text()
            except ValueError as e:
                raise _FieldError("messages", f"messages[{i}]: {e}") from None
        return self

    @property
    def max_new_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """The engine's logprobs setting: None (off) or the number of alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        """The messages as the tokenizer's chat template wants them: role, content str and, for
        assistant turns that made them, tool_calls [{type, function: {name, arguments}}]."""
        out = []
        for m in self.messages:
            message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                message["tool_calls"] = [{"type": c.type, "function": {"name": c.function.name,
                                                                      "arguments": c.function.arguments}}
                                         for c in m.tool_calls]
            out.append(message)
        return out

    def unrendered_tool_call(self, prompt: str) -> str | None:
        """The first tool call whose name or arguments the rendered `prompt` lacks (a chat template
        that drops tool calls), as "messages[i].tool_calls[j]"; None when all are there."""
        for i, m in enumerate(self.messages):
            for j, c in enumerate(m.tool_calls or []):
                if c.function.name not in prompt or c.function.arguments not in prompt:
                    return f"messages[{i}].tool_calls[{j}]"
        return None


class CompletionRequest(_Request):
    # str | list[str] | list[int] | list[list[int]]; normalised by the validator to a list of
    # prompts, each a str or a list of token ids.
    prompt: Any
    max_tokens: int | None = Field(16, ge=1, le=MAX_TOKENS_LIMIT)  # OpenAI's default here
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v:
            if all(isinstance(p, str) for p in v):
                return v
            if all(_is_token_id(t) for t in v):
                return [v]
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in v):
                return v
        raise ValueError("must be a string, a non-empty list of strings, a non-empty list of "
                         "token ids or a list of such lists")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


def _is_token_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31


class _FieldError(ValueError):
    """A validation failure that knows which request field it is about."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def parse_request(cls: type[_Request], raw: bytes) -> _Request:
    """Validate a request body; any problem becomes a 400 APIError naming the field."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err['msg']}") from None
        if err["type"] == "model_type" and not err["loc"]:  # a nested field's wrong type names its field below
            raise APIError(400, "the request body must be a JSON object") from None
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            raise APIError(400, str(cause), param=cause.param) from None
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        param = str(err["loc"][0]) if err["loc"] else None
        raise APIError(400, f"'{loc}': {msg}" if loc else msg, param=param) from None


# ---------------------------------------------------------------------------------------------
# Token text for logprobs


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable char standing for each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


class TokenText:
    """The text and bytes of single tokens, as the logprobs fields show them (one per server,
    caching what it has looked up).

    A byte-level BPE token can be part of a UTF-8 character, so its exact bytes come from the
    vocabulary string (the byte-level alphabet mapped back) rather than from decoding it alone.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.added = set(tokenizer.tk.get_added_tokens_decoder())  # ids of <think>, specials, ...
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int, as_id: bool = False) -> tuple[str, list[int]]:
        """token id -> (display string, its UTF-8 bytes). as_id: vLLM's
        return_tokens_as_token_ids, the string is "token_id:123"."""
        if token_id not in self.cache:
            self.cache[token_id] = self._lookup(token_id)
        text, raw = self.cache[token_id]
        return (f"token_id:{token_id}" if as_id else text), raw

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.tk.id_to_token(token_id)
        table = _byte_decoder()
        if piece is None:
            raw = b""
        elif token_id not in self.added and all(c in table for c in piece):
            raw = bytes(table[c] for c in piece)
        else:  # an added token (<think>, specials) or a non-byte-level vocabulary
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        return raw.decode("utf-8", errors="replace"), list(raw)


# ---------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    """A response id the way OpenAI spells them: chatcmpl-..., cmpl-..."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprob_entry(token: tuple[str, list[int]], logprob: float,
                       top: list[tuple[tuple[str, list[int]], float]]) -> dict:
    """One element of choices[i].logprobs.content."""
    return {"token": token[0], "logprob": logprob, "bytes": token[1],
            "top_logprobs": [{"token": t[0], "logprob": lp, "bytes": t[1]} for t, lp in top]}


def chat_completion(rid: str, created: int, model: str, choices: list[dict],
                    usage_: dict) -> dict:
    """The non-streaming /v1/chat/completions reply."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_, "system_fingerprint": None}


def chat_choice(index: int, content: str, reasoning: str | None, finish_reason: str | None,
                logprobs: list[dict] | None, with_reasoning: bool) -> dict:
    message = {"role": "assistant", "content": content}
    if with_reasoning:  # only when the reasoning parser is on, as DeepSeek's API does
        message["reasoning_content"] = reasoning or None
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict],
               usage_: dict | None = None, with_usage: bool = False) -> dict:
    """One SSE chunk of a streamed chat completion.

    With stream_options.include_usage every chunk carries "usage": null and a last chunk with
    no choices carries the totals, as OpenAI does.
    """
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": choices, "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def chat_delta(index: int, delta: dict, finish_reason: str | None = None,
               logprobs: list[dict] | None = None) -> dict:
    return {"index": index, "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
            "finish_reason": finish_reason}


def completion_logprobs(entries: list[tuple[tuple[str, list[int]], float, list]],
                        offset: int = 0) -> dict:
    """choices[i].logprobs of /v1/completions, from (token, logprob, top) triples.

    top is a list of ((text, bytes), logprob); None in top_logprobs when no alternatives were
    asked for. text_offset counts characters from `offset` (the text already sent).
    """
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for token, logprob, top in entries:
        offsets.append(offset)
        offset += len(token[0])
        tokens.append(token[0])
        token_logprobs.append(logprob)
        tops.append({t[0]: lp for t, lp in top} if top is not None else None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


def completion(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    """The non-streaming /v1/completions reply."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_, "system_fingerprint": None}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict],
                     usage_: dict | None = None, with_usage: bool = False) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": choices, "system_fingerprint": None}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def sse(obj: dict) -> str:
    """One Server-Sent Event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
