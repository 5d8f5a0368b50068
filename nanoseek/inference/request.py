"""What the engine schedules and what it hands back: a `Request` (one generation, its prompt, the
tokens so far, its sampling state), the `StepEvent` each new token produces, and the checks a
prompt passes before it touches the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import RandomStream, SamplingParams, _is_int
from .text import TextStream


@dataclass
class StepEvent:
    """One generated token of one request.

    text: the decoded text delta (needs a tokenizer; "" while text is held back because it may
    be the start of a stop string or half a character; stop strings and special tokens are cut
    out). logprob: raw-model log-probability of `token_id`, and top_logprobs: [(token_id,
    logprob), ...] best first, when the request asked for logprobs (else None).
    finish_reason: "stop" (EOS, a stop token id or a stop string) | "length" | "error" | None while
    running. "error": the request's forward or sampling raised inside `step()`; the request is
    over and its slot free, token_id is -1 (no token), and `error` holds "ExceptionType: message".
    routing (engines made with record_routing=True): LongTensor[n, moe_layers, K], the experts each
    MoE layer chose for the inputs of the forward that produced this token: the whole prompt (n =
    its length) for a request's first token, the previous token (n = 1) after. Concatenated over a
    request's events: the routing of positions 0 .. prompt + new tokens - 2, what a training
    forward over that sequence needs to replay it (nanoseek.rl.rollout).
    """

    request_id: int
    token_id: int
    text: str
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None
    finished: bool
    finish_reason: str | None
    error: str | None = None
    routing: torch.Tensor | None = None
    sampling_mask: torch.Tensor | None = None  # record_sampling_mask: LongTensor of the kept token ids


class RequestFailed(RuntimeError):
    """`generate`/`stream`: a request ended with finish_reason "error" (the engine stays usable)."""


class Request:
    """One generation. `tokens` are the generated ids; the newest is not in the cache yet."""

    def __init__(self, rid: int, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 text: TextStream | None):
        self.id, self.prompt, self.params = rid, prompt, params
        self.random = RandomStream(params.seed)  # its U[0, 1) numbers (sampling, speculative acceptance)
        self.stop_ids, self.text = stop_ids, text
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.hidden: torch.Tensor | None = None  # speculative: main hidden at positions pos-D-1 .. pos-1
        self.routing: torch.Tensor | None = None  # record_routing: what the next event carries

    @property
    def pos(self) -> int:
        """Position of the newest token = number of filled cache rows."""
        return len(self.prompt) + len(self.tokens) - 1

    def token_at(self, position: int) -> int:
        if position < 0:
            return 0
        if position < len(self.prompt):
            return self.prompt[position]
        return self.tokens[position - len(self.prompt)]


def check_prompt(prompt_ids, params: SamplingParams, vocab_size: int, max_seq_len: int, has_tokenizer: bool) -> list[int]:
    """Validate a request before it touches the engine; returns the prompt as a list of ints.
    ValueError with one clear message for anything wrong."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    params.validate(vocab_size)
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dtype.is_floating_point or prompt_ids.dtype.is_complex or prompt_ids.dim() != 1:
            raise ValueError(f"prompt token ids must be a list or 1-d integer tensor, got a "
                             f"{prompt_ids.dim()}-d {prompt_ids.dtype} tensor")
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
        raise ValueError(f"prompt token ids must be a list of integers, got {type(prompt_ids).__name__}")
    prompt = list(prompt_ids)
    bad = next((t for t in prompt if not _is_int(t)), None)
    if bad is not None:  # a float id is an error, never truncated
        raise ValueError(f"prompt token ids must be integers, got {bad!r} ({type(bad).__name__})")
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token (e.g. BOS)")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab_size})")
    if len(prompt) + params.max_new_tokens > max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                         f"max_seq_len={max_seq_len}")
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need an engine with a tokenizer (Engine(..., tokenizer=tok))")
    return prompt


def per_row(routing: list, n: int) -> list[torch.Tensor]:
    """A forward's Routing list (indices [n*T, K] per MoE layer) -> n tensors [T, layers, K] on the CPU."""
    if not routing:
        return [None] * n
    indices = torch.stack([r.indices for r in routing], dim=1).cpu()  # [n*T, layers, K]
    return list(indices.view(n, -1, *indices.shape[1:]).unbind(0))
