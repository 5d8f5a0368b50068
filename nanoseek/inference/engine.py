"""The inference engine: continuous batching over a preallocated MLA latent cache.

    engine = Engine(model, max_batch_size=8, max_seq_len=4096, tokenizer=tok)
    outs = engine.generate([[0, 5, 9], [0, 7]], max_new_tokens=64)        # new ids per prompt
    for ev in engine.stream(ids, max_new_tokens=64, temperature=0.7):   # StepEvents as they come
        print(ev.text, end="")
    rid = engine.add_request(ids, SamplingParams(...))                   # a server's loop:
    events = engine.step()                                               # one token per request
    engine.cancel(rid)

A step first decodes one token for every running request (absorbed attention over the latent
cache, batch rows 0..n-1, attending over the longest running sequence), drops the finished ones,
then prefills the waiting requests into the freed rows and samples their first token from the
prefill logits. So each request gets exactly one token per step (more with speculative decoding)
and new requests join between decode steps. `generate` and `stream` drive the same `step`.

Design choices, with the measurements behind them (the `small` preset, 2-core CPU, fp32):
* Decode uses the absorbed path: per step it reads kv_lora_rank + rope values per cached token
  and never re-expands the cache. Prefill uses the naive path (expand the chunk's latents to
  per-head K/V and run SDPA): for a 4096-token prompt it is several times cheaper than absorbed,
  which materialises [heads, T, S] scores in the 512-dim latent space.
* Running requests occupy cache rows 0..n-1; a finished request's row is refilled by moving the
  last row into it (a copy of that request's cached tokens, once). Every decode step then passes
  plain slices of the cache to the model: no gather, no copy.
* Prompts are prefilled in padded groups of similar length and at most `prefill_chunk` tokens
  (padding writes positions past a prompt's end, which decoding overwrites before any query can
  see them); a prompt longer than that is prefilled alone in chunks, which bounds memory.
* Compiled decoding (`compiled.py`) wraps the decode (and speculative verify/draft) forward in
  torch.compile, gpt-fast style: attention then reads all max_seq_len cache rows under the position
  mask, so the shape is static and one graph serves every step and every prompt length (the batch
  size stays a dynamic dimension). It cuts the per-token Python and kernel-launch overhead that
  dominates small models on CPU (tiny preset, batch 1, prompt 512: ~0.7 ms/step against ~2.2 ms
  eager), at the price of compiling (25-45 s cold, a few seconds from the disk cache). It is used
  while the step's tokens fit the MoE's gathered-experts path; larger batches run eagerly (fp32
  grouped GEMMs cannot be traced on CPU, and a graph broken around them measured slower).
  compile=None (the default) decides by itself: eager first, compiled once the eager time spent
  reaches the recorded price of compiling this shape (`CompiledSteps`); `warmup()` compiles now.
* speculative="auto" (the default for a checkpoint with MTP modules) measures both decode modes
  per batch size and speculates only while it yields more tokens per second (`AutoSpeculation`).
  Requests with an explicit seed that sample stay on plain decoding, so a seed reproduces whatever
  the timings were. Plain steps keep each request's newest main hidden states; when speculation
  turns on, the MTP cache rows the plain steps skipped are written first (`spec.catch_up`).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from . import speculative as spec
from ..model.indexer import set_fp8_keys
from .cache import LatentCache
from .compiled import CompiledSteps
from .sampling import SamplingParams, _is_int, logprobs, make_generator, probabilities, sample
from .text import TextStream

# Prefill groups may be padded up to this factor of their real token count.
PAD_SLACK = 1.25
# speculative="auto": MTP cache rows a request may fall behind in plain steps before catching up.
CATCH_UP_ROWS = 256


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
        self.generator = make_generator(params.seed)
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


class Engine:
    """Batched generation for a `nanoseek.model.Transformer`.

    max_batch_size: requests decoded together (cache rows); max_seq_len: prompt + new tokens of
    one request (cache length); tokenizer: a `nanoseek.data.Tokenizer`, needed for stop strings
    and text deltas; speculative: "auto" (default: speculate with the MTP modules while it is
    faster; plain decoding for a checkpoint without them), "mtp" (always) or None (never) — the
    mode `step` uses, which `generate`/`stream` may override; absorbed: decode attention path
    (False re-expands the cache: for testing); prefill_chunk: tokens per prefill forward;
    compile: True / False force torch.compile of the decode step on / off; None (default):
    automatic (see the module docstring), and the environment variable NANOSEEK_COMPILE=1 / 0
    sets that default to on / off; fp8_index_keys: (deepseek_v32) cache the indexer's keys in FP8
    as the released model does (index_head_dim + 4 bytes a token; the model's own forward then scores
    FP8 keys too); None (default): on for CUDA, off on CPU, where cached decoding stays exactly the
    uncached forward; record_routing: every StepEvent carries the MoE routing of the
    forward that produced it (for routing replay in RL; decoding then runs eagerly);
    record_sampling_mask: every sampled StepEvent whose request truncates (top-k / top-p / min-p)
    carries the kept token ids (DeepSeek-V3.2's "keep sampling mask", nanoseek.rl.rollout); plain
    (non-speculative) steps only.
    """

    def __init__(self, model, max_batch_size: int = 8, max_seq_len: int = 4096, tokenizer=None,
                 speculative: str | None = "auto", absorbed: bool = True, prefill_chunk: int = 2048,
                 compile: bool | None = None, fp8_index_keys: bool | None = None, record_routing: bool = False,
                 record_sampling_mask: bool = False):
        args = model.args
        if max_seq_len > args.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's context "
                             f"(max_position_embeddings={args.max_position_embeddings})")
        if max_batch_size < 1 or max_seq_len < 2:
            raise ValueError("max_batch_size must be >= 1 and max_seq_len >= 2")
        self.model = model.eval()
        self.args, self.tokenizer = args, tokenizer
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.absorbed, self.prefill_chunk = absorbed, prefill_chunk
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.depth = len(model.mtp)
        if fp8_index_keys is None:  # the released model's format on GPUs; exact keys on CPU
            fp8_index_keys = model.embed_tokens.weight.device.type == "cuda"
        self.fp8_index_keys = fp8_index_keys and args.dsa
        set_fp8_keys(model, self.fp8_index_keys)
        # + depth rows: a speculative verify writes up to `depth` positions past the last token kept
        self.cache = LatentCache(args, args.num_hidden_layers, max_batch_size, max_seq_len + self.depth,
                                 self.dtype, self.device, self.fp8_index_keys)
        self.mtp_cache: LatentCache | None = None
        self.eos_ids = set(args.eos_token_ids) | ({tokenizer.eos_id} if tokenizer is not None else set())
        self.running: list[Request] = []  # index = cache row
        self.waiting: deque[Request] = deque()
        self._next_id = 0
        self.speculative: str | None = None
        self.auto = spec.AutoSpeculation()
        self.set_speculative(speculative)
        # Decode and verify forwards (and the MTP drafts) are the per-step hot path; prefill is not.
        self.record_routing = record_routing
        self.record_sampling_mask = record_sampling_mask
        self._routing: list | None = None  # the last decode/verify forward's Routing list (record_routing)
        if record_routing:
            compile = False
        if compile is None and os.environ.get("NANOSEEK_COMPILE") in ("0", "1"):
            compile = os.environ["NANOSEEK_COMPILE"] == "1"
        mode = {True: "on", False: "off", None: "auto"}[compile]
        self.steps = CompiledSteps({"decode step": self._forward_eager, "MTP draft step": model.mtp_step,
                                    "speculative step": self._greedy_speculative_step}, model, mode, self.device)
        self.reset_stats()

    # --- public state ------------------------------------------------------------------------
    @property
    def cache_bytes_per_token(self) -> int:
        """Bytes of main-model cache per token, all layers: layers × (kv_lora_rank + rope) × dtype size.
        (Speculative decoding adds the MTP layers' own cache, `mtp_cache.bytes_per_token`.)"""
        return self.cache.bytes_per_token

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.running) - len(self.waiting)

    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.waiting)

    def reset_stats(self) -> None:
        self._stats = dict(prompt_tokens=0, new_tokens=0, prefill_s=0.0, decode_s=0.0, decode_tokens=0,
                           decode_steps=0, row_steps=0, drafted=0, accepted=0)

    @property
    def stats(self) -> dict:
        """Counters since `reset_stats` (generate/stream reset them) and the rates derived from them:
        tokens_per_s (all new tokens / prefill + decode time), decode_tokens_per_s,
        prefill_tokens_per_s, tokens_per_row_step (tokens per request per decode step: 1 without
        speculation) and, when speculative drafts were made, acceptance_rate (kept / drafted)."""
        s = dict(self._stats)
        s["tokens_per_s"] = s["new_tokens"] / max(s["prefill_s"] + s["decode_s"], 1e-9)
        s["decode_tokens_per_s"] = s["decode_tokens"] / max(s["decode_s"], 1e-9)
        s["prefill_tokens_per_s"] = s["prompt_tokens"] / max(s["prefill_s"], 1e-9)
        s["tokens_per_row_step"] = s["decode_tokens"] / max(s["row_steps"], 1)
        if s["drafted"]:
            s["acceptance_rate"] = s["accepted"] / s["drafted"]
        s["cache_bytes_per_token"] = self.cache_bytes_per_token
        s["compiled"] = self.steps.active
        if self.speculative == "auto":
            s["speculative_auto"] = self.auto.summary()
        return s

    def set_speculative(self, mode: str | None) -> None:
        """None (plain decoding), "mtp" (draft with the MTP modules at every step) or "auto" (only
        while faster; plain for a checkpoint without MTP modules). Only while idle."""
        if mode not in (None, "mtp", "auto"):
            raise ValueError(f"speculative must be None, 'mtp' or 'auto', got {mode!r}")
        if mode == "auto" and not self.depth:
            mode = None
        if mode == self.speculative:
            return
        if self.num_active:
            raise RuntimeError("cannot change speculative decoding while requests are active")
        if mode is not None:
            if not self.depth:
                raise ValueError("speculative='mtp' needs a checkpoint with MTP modules (num_nextn_predict_layers > 0)")
            if self.mtp_cache is None:
                self.mtp_cache = LatentCache(self.args, self.depth, self.max_batch_size, self.max_seq_len + self.depth,
                                             self.dtype, self.device, self.fp8_index_keys)
        self.speculative = mode

    def warmup(self) -> None:
        """Compile the decode step now rather than during the first requests (unless compile=False
        or compiling cannot work here): a few tokens at batch 1 and at batch 2, since torch.compile
        specialises batch 1 and serves every larger batch with one dynamic-size graph; in plain and
        speculative mode when the engine's mode is "auto". With a warm disk cache this loads the
        compiled artefacts rather than compiling them."""
        if not self.steps.enable():
            return
        length = min(4, self.max_seq_len // 2)  # prompt and new tokens both fit any max_seq_len >= 2
        modes = [None, "mtp"] if self.speculative == "auto" else [self.speculative]
        for mode in modes:
            for n in sorted({1, min(2, self.max_batch_size)}):
                self.generate([[0] * length] * n, max_new_tokens=length, ignore_eos=True, speculative=mode)

    # --- continuous batching ---------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; it is prefilled at the next `step`. Returns its id.

        ValueError if the prompt is empty or has ids outside the vocabulary, if prompt +
        max_new_tokens exceeds max_seq_len, if stop strings are given without a tokenizer, or if
        no slot is free (check `free_slots` first).
        """
        params = params or SamplingParams()
        prompt = self._check(prompt_ids, params)
        if self.free_slots <= 0:
            raise ValueError(f"no free slot: {self.max_batch_size} requests are active (check engine.free_slots)")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        text = TextStream(self.tokenizer, params.stop) if self.tokenizer is not None else None
        req = Request(self._next_id, prompt, params, stop_ids, text)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def _check(self, prompt_ids, params: SamplingParams) -> list[int]:
        """Validate a request before it touches the engine; returns the prompt as a list of ints."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate(self.args.vocab_size)
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
        if min(prompt) < 0 or max(prompt) >= self.args.vocab_size:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.args.vocab_size})")
        if len(prompt) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                             f"max_seq_len={self.max_seq_len}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer (Engine(..., tokenizer=tok))")
        return prompt

    def cancel(self, request_id: int) -> bool:
        """Drop a request at once and free its slot. Returns False if it was not active."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                return True
        for row, req in enumerate(self.running):
            if req.id == request_id:
                self._free_row(row)
                return True
        return False

    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        """Decode one token for every running request, then prefill the waiting ones (their first
        token comes from the prefill). Finished requests free their slots before returning.

        An exception inside a forward or in sampling fails the requests it involved (the running
        batch for a decode, the prompt group for a prefill) with finish_reason "error" and frees
        their slots, so the engine stays usable; step() itself does not raise for it."""
        events: list[StepEvent] = []
        if self.running:
            n = len(self.running)
            self.steps.just_compiled, self._catch_up_s = False, 0.0
            t0 = time.perf_counter()
            try:
                speculate = self._speculate_now()
                new = self._decode_speculative() if speculate else self._decode()
            except Exception as e:
                speculate, new = False, self._fail(self.running, e)
            seconds = time.perf_counter() - t0
            if self.speculative == "auto" and not self.steps.just_compiled:
                # catching the MTP cache up is the price of switching, not of a speculative step
                self.auto.record(n, speculate, seconds - self._catch_up_s, len(new) / n)
            # rent for the automatic compile: eager steps that a compiled graph would have run
            if not self.steps.active and self._graph_fits(n) and self.steps.after_eager_step(seconds):
                self.auto = spec.AutoSpeculation()  # compiled steps cost differently: measure again
            self._stats["decode_s"] += seconds
            self._stats["decode_tokens"] += len(new)
            self._stats["decode_steps"] += 1
            self._stats["row_steps"] += len(self.running)
            events += new
            self._drop_finished()
        if self.waiting:
            t0 = time.perf_counter()
            reqs = list(self.waiting)
            self.waiting.clear()
            events += self._prefill(reqs)
            self._stats["prefill_s"] += time.perf_counter() - t0
            self._stats["prompt_tokens"] += sum(len(r.prompt) for r in reqs)
            self._drop_finished()
        self._stats["new_tokens"] += len(events)
        return events

    # --- one-call drivers ------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                 ignore_eos: bool = False, speculative: str | None = "engine") -> list[list[int]]:
        """Complete every prompt; returns the new ids of each (a stop token, when hit, is included).

        Any number of prompts: they join as slots free up. Prompt i is seeded with seed + i (seed
        None: from torch's global RNG). speculative: "engine" (default: the engine's mode), None,
        "mtp" or "auto" for this call. Needs an idle engine; stats are reset.
        """
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 min_p=min_p, seed=None if seed is None else seed + i, stop=list(stop or []),
                                 stop_token_ids=list(stop_token_ids or []), ignore_eos=ignore_eos)
                  for i in range(len(prompts))]
        outs: list[list[int]] = [[] for _ in prompts]
        for index, ev in self._drive(prompts, params, speculative):
            outs[index].append(ev.token_id)
        return outs

    def stream(self, prompt: list[int], params: SamplingParams | None = None, speculative: str | None = "engine",
               **kwargs) -> Iterator[StepEvent]:
        """Yield the StepEvents of one prompt as they are produced. `params` or SamplingParams fields
        as keywords. Stopping the iteration early cancels the request."""
        params = params or SamplingParams(**kwargs)
        for _, ev in self._drive([prompt], [params], speculative):
            yield ev

    def _drive(self, prompts, params, speculative) -> Iterator[tuple[int, StepEvent]]:
        if self.num_active:
            raise RuntimeError("generate/stream need an idle engine; drive add_request/step yourself to share it")
        prompts = [self._check(p, sp) for p, sp in zip(prompts, params)]  # fail before anything runs
        previous = self.speculative
        self.set_speculative(previous if speculative == "engine" else speculative)
        self.reset_stats()
        queue = deque(enumerate(zip(prompts, params)))
        index: dict[int, int] = {}
        try:
            while queue or self.num_active:
                while queue and self.free_slots:
                    i, (prompt, sp) = queue.popleft()
                    index[self.add_request(prompt, sp)] = i
                for ev in self.step():
                    if ev.finish_reason == "error":
                        raise RequestFailed(f"prompt {index[ev.request_id]} failed: {ev.error}")
                    yield index[ev.request_id], ev
        finally:
            for rid in index:
                self.cancel(rid)
            self.set_speculative(previous)

    # --- decoding --------------------------------------------------------------------------------
    def _forward_eager(self, ids: torch.Tensor, positions: torch.Tensor, cache: list, kv_len: int):
        """A decode or verify forward over cache rows 0..n-1.
        ids, positions [n, T] -> (logits [n, T, V], hidden [n, T, hidden])."""
        out = self.model.run(ids, positions=positions, cache=cache, kv_len=kv_len, absorbed=self.absorbed)
        if self.record_routing:
            self._routing = out.routing
        return out.logits, out.hidden

    def _greedy_speculative_step(self, prev, tokens, positions, newest, cache, mtp_cache, kv_len, verify_kv_len):
        """spec.greedy_step with this engine's model and attention path (compiled as one graph)."""
        return spec.greedy_step(self.model, prev, tokens, positions, newest, cache, mtp_cache, kv_len,
                                verify_kv_len, self.absorbed)

    def _compiled(self, tokens: int) -> bool:
        """Use the compiled graph for a forward over `tokens` tokens? Only while the MoE layers take
        their gathered-experts path (tokens × experts per token <= routed experts): beyond that, fp32
        F.grouped_mm breaks the graph on CPU and the broken graph measured slower than eager."""
        return self.steps.active and self._graph_fits(tokens)

    def _graph_fits(self, tokens: int) -> bool:
        return tokens * self.args.num_experts_per_tok <= self.args.n_routed_experts or self.dtype == torch.bfloat16

    def _kv_len(self, compiled: bool, needed: int) -> int:
        """Cache rows attention reads: just what is needed in eager mode; all of them when compiled,
        so the compiled step has one static shape (gpt-fast style) instead of a new one per length."""
        return self.cache.max_len if compiled else needed

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, needed: int):
        """The decode/verify forward over cache rows 0..n-1, compiled or eager; `needed`: rows in use."""
        compiled = self._compiled(ids.numel())
        return self.steps.call("decode step", compiled, ids, positions, self.cache.rows(0, ids.shape[0]),
                               self._kv_len(compiled, needed))

    def _mtp_step(self, compiled: bool):
        return lambda *args, **kwargs: self.steps.call("MTP draft step", compiled, *args, **kwargs)

    def _decode(self) -> list[StepEvent]:
        reqs = self.running
        ids = torch.tensor([[r.tokens[-1]] for r in reqs], device=self.device)
        positions = torch.tensor([[r.pos] for r in reqs], device=self.device)
        logits, hidden = self._forward(ids, positions, max(r.pos for r in reqs) + 1)
        if self.record_routing:
            for r, routing in zip(reqs, _per_row(self._routing, len(reqs))):
                r.routing = routing
        if self.speculative == "auto":  # keep what a later switch to speculation needs
            for row, r in enumerate(reqs):
                if r.hidden is not None:
                    r.hidden = torch.cat([r.hidden, hidden[row, -1:]])
                    if len(r.hidden) > CATCH_UP_ROWS:
                        self._catch_up(row, r)
        return self._sample_and_append(reqs, logits[:, -1])

    def _speculate_now(self) -> bool:
        """This step's mode: always / never for "mtp" / None; for "auto", the policy's choice for
        this batch size, when every running request has its MTP state and none samples with a seed."""
        if self.speculative != "auto":
            return self.speculative == "mtp"
        reqs = self.running
        if any(r.hidden is None or (r.params.seed is not None and not r.params.greedy) for r in reqs):
            return False
        if not self.auto.choose(len(reqs)):
            return False
        for row, r in enumerate(reqs):
            self._catch_up(row, r)
        return True

    def _catch_up(self, row: int, req: Request) -> None:
        """Write the MTP cache rows plain steps skipped; req.hidden keeps the D+1 newest states.
        req.hidden [k, hidden] holds the main hidden states at positions pos-k .. pos-1 (clamped at 0)."""
        extra = len(req.hidden) - (self.depth + 1)
        if extra <= 0:
            return
        t0 = time.perf_counter()
        positions = (torch.arange(req.pos - len(req.hidden), req.pos - self.depth - 1, device=self.device)
                     .clamp(min=0)[None])
        spec.catch_up(self.model.mtp_step, req.hidden[None, :extra], positions, req.token_at,
                      self.mtp_cache.rows(row, row + 1), kv_len=req.pos)
        req.hidden = req.hidden[extra:]
        self._catch_up_s += time.perf_counter() - t0

    def _decode_speculative(self) -> list[StepEvent]:
        """Draft D tokens per request with the MTP modules, verify them in one main forward."""
        reqs, n, D = self.running, len(self.running), self.depth
        W = D + 1
        newest = torch.tensor([r.pos for r in reqs], device=self.device)
        positions = spec.window(newest, D)
        tokens = torch.tensor([[r.token_at(p) for p in range(r.pos - W, r.pos + 1)] + [0] * D for r in reqs],
                              device=self.device)  # positions newest-W .. newest+D
        hidden = torch.stack([r.hidden for r in reqs])
        compiled = self._compiled(positions.numel())
        most = max(r.pos for r in reqs)
        if compiled and all(r.params.greedy for r in reqs):  # draft and verify in one compiled call
            kv = self._kv_len(compiled, most)
            drafts, logits, verify_hidden = self.steps.call(
                "speculative step", True, hidden, tokens, positions, newest, self.cache.rows(0, n),
                self.mtp_cache.rows(0, n), kv, kv)
            qs = [None] * D
        else:
            drafts, qs = spec.draft(self._mtp_step(compiled), hidden, tokens, positions, newest,
                                    self.mtp_cache.rows(0, n), reqs, kv_len=self._kv_len(compiled, most))
            verify_ids = tokens[:, W:]  # newest token, then the drafts
            verify_pos = newest[:, None] + torch.arange(D + 1, device=self.device)
            logits, verify_hidden = self._forward(verify_ids, verify_pos, most + D + 1)
        kept = spec.accept(logits, drafts, qs, reqs)
        routing = _per_row(self._routing, n) if self.record_routing else [None] * n
        both = torch.cat([hidden, verify_hidden], dim=1)  # main hidden at newest-W .. newest+D
        events = []
        for i, (req, toks) in enumerate(zip(reqs, kept)):
            a = len(toks) - 1
            self._stats["drafted"] += D
            self._stats["accepted"] += a
            req.hidden = both[i, a + 1 : a + 1 + W].clone()
            lp, top = [None] * len(toks), [None] * len(toks)
            if req.params.logprobs is not None:
                lp, top = logprobs(logits[i, : len(toks)], torch.tensor(toks, device=self.device),
                                   [req.params] * len(toks))
            for j, tok in enumerate(toks):
                req.routing = None if routing[i] is None else routing[i][j : j + 1]
                events.append(self._append(req, tok, lp[j], top[j]))
                if req.finish_reason:
                    break
        return events

    def _sample_and_append(self, reqs: list[Request], logits: torch.Tensor) -> list[StepEvent]:
        params = [r.params for r in reqs]
        ids = sample(logits, params, [r.generator for r in reqs])
        lp, top = logprobs(logits, ids, params)
        kept = [None] * len(reqs)
        if self.record_sampling_mask:  # the support `sample` drew from: the same function on the same logits
            for i, p in enumerate(params):
                if not p.greedy and (p.top_k > 0 or p.top_p < 1 or p.min_p > 0):
                    kept[i] = probabilities(logits[i:i + 1], [p])[0].nonzero().squeeze(-1).cpu()
        return [self._append(r, t, lp[i], top[i], kept[i]) for i, (r, t) in enumerate(zip(reqs, ids.tolist()))]

    def _append(self, req: Request, token: int, logprob, top, kept: torch.Tensor | None = None) -> StepEvent:
        """Record one new token: stop tokens, stop strings and the length limit end the request."""
        req.tokens.append(token)
        text, stop_string = "", False
        if token in req.stop_ids:
            req.finish_reason = "stop"
        elif req.text is not None:
            text, stop_string = req.text.push(token)
            if stop_string:
                req.finish_reason = "stop"
        if req.finish_reason is None and len(req.tokens) >= req.params.max_new_tokens:
            req.finish_reason = "length"
        if req.finish_reason and req.text is not None and not stop_string:
            text += req.text.flush()  # held-back text was not a stop string after all
        routing, req.routing = req.routing, None
        return StepEvent(req.id, token, text, logprob, top, req.finish_reason is not None, req.finish_reason,
                         routing=routing, sampling_mask=kept)

    # --- prefill -------------------------------------------------------------------------------
    def _prefill(self, reqs: list[Request]) -> list[StepEvent]:
        events = []
        for group in _groups(reqs, self.prefill_chunk):
            row = len(self.running)
            self.running.extend(group)
            try:
                logits = self._prefill_group(group, row)
                events += self._sample_and_append(group, logits)
            except Exception as e:
                events += self._fail(group, e)
        return events

    def _fail(self, reqs: list[Request], error: Exception) -> list[StepEvent]:
        """End `reqs` with finish_reason "error" (their rows are freed like finished ones)."""
        message = f"{type(error).__name__}: {error}"
        for r in reqs:
            r.finish_reason = "error"
        return [StepEvent(r.id, -1, "", None, None, True, "error", message) for r in reqs]

    def _prefill_group(self, group: list[Request], row: int) -> torch.Tensor:
        """Write the group's prompts into cache rows row.. and return logits [g, V] at each prompt's end."""
        g, D = len(group), self.depth
        lens = [len(r.prompt) for r in group]
        L = max(lens)
        ids = torch.zeros(g, L + D + 1, dtype=torch.long)  # padded; D+1 spare for the MTP's shifted inputs
        for b, r in enumerate(group):
            ids[b, : lens[b]] = torch.tensor(r.prompt)
        ids = ids.to(self.device)
        cache = self.cache.rows(row, row + g)
        # MTP state for speculation ("auto" skips it once speculation has lost at every batch size)
        mtp = self.speculative == "mtp" or (self.speculative == "auto" and self.auto.wants_mtp)
        mtp_cache = self.mtp_cache.rows(row, row + g) if mtp else None
        if mtp:  # the draft window of the first step: positions L_b-D-1 .. L_b-1
            want = spec.window(torch.tensor(lens), D).tolist()
            kept = [[None] * (D + 1) for _ in group]
        last = [None] * g
        chunks_routing = []
        # Chunks in time only for a prompt longer than prefill_chunk: each chunk re-expands the
        # latents cached before it, so fewer, longer chunks are cheaper.
        chunk = max(1, self.prefill_chunk // g)
        for s in range(0, L, chunk):
            e = min(L, s + chunk)
            positions = torch.arange(s, e, device=self.device).expand(g, e - s)
            out = self.model.run(ids[:, s:e], positions=positions, cache=cache, kv_len=e, absorbed=False,
                                 logits=False)
            if self.record_routing:
                chunks_routing.append(_per_row(out.routing, g))
            for b, n in enumerate(lens):
                if s <= n - 1 < e:
                    last[b] = out.hidden[b, n - 1 - s]
            if mtp:
                spec.prefill_mtp(self.model, out.hidden, ids, s, mtp_cache)
                for b in range(g):
                    for j, p in enumerate(want[b]):
                        if s <= p < e:
                            kept[b][j] = out.hidden[b, p - s]
        if mtp:
            for b, r in enumerate(group):
                r.hidden = torch.stack(kept[b])
        if self.record_routing:
            for b, r in enumerate(group):
                r.routing = torch.cat([chunk[b] for chunk in chunks_routing])[: lens[b]]
        return self.model.lm_head(torch.stack(last))

    def _drop_finished(self) -> None:
        for row in range(len(self.running) - 1, -1, -1):
            if self.running[row].finish_reason is not None:
                self._free_row(row)

    def _free_row(self, row: int) -> None:
        """Remove the request in `row`; the last row moves into its place (rows stay 0..n-1)."""
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.cache.move(last, row, moved.pos)
            if self.mtp_cache is not None and self.speculative:
                self.mtp_cache.move(last, row, moved.pos)
            self.running[row] = moved
        self.running.pop()


def _per_row(routing: list, n: int) -> list[torch.Tensor]:
    """A forward's Routing list (indices [n*T, K] per MoE layer) -> n tensors [T, layers, K] on the CPU."""
    if not routing:
        return [None] * n
    indices = torch.stack([r.indices for r in routing], dim=1).cpu()  # [n*T, layers, K]
    return list(indices.view(n, -1, *indices.shape[1:]).unbind(0))


def _groups(reqs: list[Request], budget: int) -> list[list[Request]]:
    """Split prompts into prefill groups of similar length (padding <= PAD_SLACK × real tokens) and
    at most `budget` padded tokens (a longer prompt is alone in its group and chunked in time)."""
    groups: list[list[Request]] = []
    for r in sorted(reqs, key=lambda r: -len(r.prompt)):
        if groups:
            group = groups[-1]
            real = sum(len(x.prompt) for x in group) + len(r.prompt)
            padded = (len(group) + 1) * len(group[0].prompt)
            if padded <= PAD_SLACK * real and padded <= budget:
                group.append(r)
                continue
        groups.append([r])
    return groups
