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

Where each part lives (read in this order):
    engine.py    this file: the scheduler (requests, cache rows, steps, events, stats, generate/stream)
    request.py   Request, StepEvent and the checks a prompt passes before it is queued
    prefill.py   prompts into the cache in padded groups and chunks (naive attention + SDPA)
    decode.py    Decoder: the per-step model work (absorbed attention, compiled or eager, speculative)
    compiled.py  when torch.compile is used, its disk cache and price, eager fallback
    speculative.py  MTP drafting, the verification rule, speculative="auto"

Design choices:
* Running requests occupy cache rows 0..n-1; a finished request's row is refilled by moving the
  last row into it (a copy of that request's cached tokens, once). Every decode step then passes
  plain slices of the cache to the model: no gather, no copy.
* compile=None (the default) decides by itself: eager first, compiled once the eager time spent
  reaches the recorded price of compiling this shape (`CompiledSteps`); `warmup()` compiles now.
* speculative="auto" (the default for a checkpoint with MTP modules) measures both decode modes
  per batch size and speculates only while it yields more tokens per second (`AutoSpeculation`).
  Requests with an explicit seed that sample stay on plain decoding, so a seed reproduces whatever
  the timings were.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator

import torch

from ..model.indexer import set_fp8_keys
from .compiled import compile_mode
from .decode import Decoder
from .prefill import default_chunk, groups, prefill_group
from .request import Request, RequestFailed, StepEvent, check_prompt
from .sampling import SamplingParams, logprobs, probabilities, sample
from .speculative import AutoSpeculation
from .text import TextStream


class Engine:
    """Batched generation for a `nanoseek.model.Transformer`.

    max_batch_size: requests decoded together (cache rows); max_seq_len: prompt + new tokens of
    one request (cache length); tokenizer: a `nanoseek.data.Tokenizer`, needed for stop strings
    and text deltas; speculative: "auto" (default: speculate with the MTP modules while it is
    faster; plain decoding for a checkpoint without them), "mtp" (always) or None (never) — the
    mode `step` uses, which `generate`/`stream` may override; absorbed: decode attention path
    (False re-expands the cache: for testing); prefill_chunk: tokens per prefill forward (None:
    as many as memory allows, `prefill.default_chunk`);
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
                 speculative: str | None = "auto", absorbed: bool = True, prefill_chunk: int | None = None,
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
        self.prefill_chunk = prefill_chunk or default_chunk(args, model.embed_tokens.weight.dtype)
        self.depth = len(model.mtp)
        if fp8_index_keys is None:  # the released model's format on GPUs; exact keys on CPU
            fp8_index_keys = model.embed_tokens.weight.device.type == "cuda"
        self.fp8_index_keys = fp8_index_keys and args.dsa
        set_fp8_keys(model, self.fp8_index_keys)
        self.record_routing = record_routing
        self.record_sampling_mask = record_sampling_mask
        if record_routing:  # routing is read off the eager forward
            compile = False
        mode = compile_mode(compile)
        # The caches and the per-step hot path (decode and verify forwards, MTP drafts).
        self.decoder = Decoder(model, max_batch_size, max_seq_len, absorbed, mode, self.fp8_index_keys, record_routing)
        self.device = self.decoder.device
        self.eos_ids = set(args.eos_token_ids) | ({tokenizer.eos_id} if tokenizer is not None else set())
        self.running: list[Request] = []  # index = cache row
        self.waiting: deque[Request] = deque()
        self._next_id = 0
        self.speculative: str | None = None
        self.auto = AutoSpeculation()
        self.set_speculative(speculative)
        self.reset_stats()
        # Under torchrun: the Runtime (distributed.py) that makes every rank take rank 0's tokens and choices.
        self.replicas = None

    # --- public state ------------------------------------------------------------------------
    @property
    def cache(self):
        """The main model's LatentCache (row b = running request b)."""
        return self.decoder.cache

    @property
    def mtp_cache(self):
        """The MTP modules' LatentCache (None until speculative decoding is first enabled)."""
        return self.decoder.mtp_cache

    @property
    def steps(self):
        """The CompiledSteps of the decode hot path (compiled or eager)."""
        return self.decoder.steps

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
            self.decoder.add_mtp_cache()
        self.speculative = mode

    def warmup(self) -> None:
        """Compile the decode step now rather than during the first requests (unless compile=False
        or compiling cannot work here): a few tokens at batch 1 and at batch 2, since torch.compile
        specialises batch 1 and serves larger batches with a dynamic-size graph, and at the batches where
        the MoE changes path (`moe.Experts.forward`: each a further dynamic graph); in plain and
        speculative mode when the checkpoint has MTP modules. Batch 1 builds the ahead-of-time
        packages (aot.py), the prefill's too. With a warm disk cache this loads the compiled artefacts rather than
        compiling them."""
        if not self.steps.enable():
            return
        length = min(4, self.max_seq_len // 2)  # prompt and new tokens both fit any max_seq_len >= 2
        # both modes whenever the checkpoint has MTP modules, so that every ahead-of-time package
        # exists afterwards (a warm start of any engine of this shape then compiles at once)
        modes = [None, "mtp"] if self.depth else [None]
        # and at the first batch whose tokens x experts-per-token exceed the experts: the MoE switches
        # from gathering the chosen experts to its next path there (on CPU every expert densely, then
        # past `dense_tokens` the grouped GEMM): each a dynamic graph that would otherwise compile in
        # the middle of serving (a stall of a minute on a small CPU)
        E, K = self.args.n_routed_experts or 0, self.args.num_experts_per_tok or 1
        sizes = {1, min(2, self.max_batch_size)} | ({min(E // K + 1, self.max_batch_size)} if E else set())
        if E and self.decoder.grouped_from <= self.max_batch_size:
            sizes.add(self.decoder.grouped_from)
        self.decoder.warming = True  # the compiled graphs, even where a short warm-up would run eagerly
        try:
            for mode in modes:
                for n in sorted(sizes):
                    self.generate([[0] * length] * n, max_new_tokens=length, ignore_eos=True, speculative=mode)
            self.decoder.build_prefill()  # a lone long prompt's prefill (the prompts above are too short)
        finally:
            self.decoder.warming = False

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
        return check_prompt(prompt_ids, params, self.args.vocab_size, self.max_seq_len, self.tokenizer is not None)

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
            self.steps.just_compiled, self.decoder.catch_up_s = False, 0.0
            t0 = time.perf_counter()
            try:
                speculate = self._speculate_now()
                new = self._decode_speculative() if speculate else self._decode()
            except Exception as e:
                speculate, new = False, self._fail(self.running, e)
            seconds = time.perf_counter() - t0
            if self.speculative == "auto" and not self.steps.just_compiled:
                # catching the MTP cache up is the price of switching, not of a speculative step
                self.auto.record(n, speculate, seconds - self.decoder.catch_up_s, len(new) / n)
            # rent for the automatic compile: eager steps that a compiled graph would have run
            if not self.steps.covers(n) and self.decoder.graph_fits(n) and self.steps.after_eager_step(seconds):
                self.auto = AutoSpeculation()  # compiled steps cost differently: measure again
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
    def _decode(self) -> list[StepEvent]:
        logits = self.decoder.plain(self.running, keep_hidden=self.speculative == "auto")
        return self._sample_and_append(self.running, logits)

    def _speculate_now(self) -> bool:
        """This step's mode: always / never for "mtp" / None; for "auto", the policy's choice for
        this batch size, when every running request has its MTP state and none samples with a seed."""
        if self.speculative != "auto":
            return self.speculative == "mtp"
        reqs = self.running
        if any(r.hidden is None or (r.params.seed is not None and not r.params.greedy) for r in reqs):
            return False
        if not self._agreed(self.auto.choose(len(reqs))):
            return False
        for row, r in enumerate(reqs):
            self.decoder.catch_up(row, r)
        return True

    def _decode_speculative(self) -> list[StepEvent]:
        """Draft D tokens per request with the MTP modules, verify them in one main forward; each
        request gets the drafts the main model agrees with, then one token of the main model's."""
        reqs = self.running
        kept, logits, routing = self.decoder.speculative(reqs, self.replicas)
        events = []
        for i, (req, toks) in enumerate(zip(reqs, kept)):
            self._stats["drafted"] += self.depth
            self._stats["accepted"] += len(toks) - 1
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

    def _agreed(self, flag: bool) -> bool:
        """A choice made from timings: rank 0's on every rank (`replicas`), else this engine's own."""
        return flag if self.replicas is None else self.replicas.decide(flag)

    def _sample_and_append(self, reqs: list[Request], logits: torch.Tensor) -> list[StepEvent]:
        params = [r.params for r in reqs]
        ids = sample(logits, params, [r.random for r in reqs])
        if self.replicas is not None:  # rank 0's tokens on every rank
            ids = self.replicas.tokens(ids)
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
        for group in groups(reqs, self.prefill_chunk):
            row = len(self.running)
            self.running.extend(group)
            try:
                logits = self._prefill_shared(group, row)
                events += self._sample_and_append(group, logits)
            except Exception as e:
                events += self._fail(group, e)
        return events

    def _prefill_shared(self, group: list[Request], row: int) -> torch.Tensor:
        """`_prefill_group` computing each distinct prompt once: requests with the same prompt (GRPO's
        G samples of a question, a server's n > 1) get copies of its cache rows (and MTP state and
        routing). Reorders `group` in place (and its rows): distinct prompts first, then the copies.
        Returns logits [g, V] in the new order."""
        first: dict[tuple, int] = {}
        source = [first.setdefault(tuple(r.prompt), b) for b, r in enumerate(group)]
        if len(first) == len(group):
            return self._prefill_group(group, row)
        unique = [r for b, r in enumerate(group) if source[b] == b]
        where = {b: k for k, b in enumerate(first.values())}  # group index -> row among the unique
        copies = [(r, where[source[b]]) for b, r in enumerate(group) if source[b] != b]
        group[:] = unique + [r for r, _ in copies]
        self.running[row : row + len(group)] = group
        logits = self._prefill_group(unique, row)
        for k, (r, s) in enumerate(copies):
            src = unique[s]
            # speculative state too: the MTP cache rows and the first draft window
            self.decoder.move_row(row + s, row + len(unique) + k, len(r.prompt), mtp=src.hidden is not None)
            r.hidden = None if src.hidden is None else src.hidden.clone()
            r.routing = src.routing
        return logits[list(range(len(unique))) + [s for _, s in copies]]

    def _fail(self, reqs: list[Request], error: Exception) -> list[StepEvent]:
        """End `reqs` with finish_reason "error" (their rows are freed like finished ones). Across ranks
        the error ends the process instead: the other ranks are inside the step's collectives."""
        if self.replicas is not None:
            raise error
        message = f"{type(error).__name__}: {error}"
        for r in reqs:
            r.finish_reason = "error"
        return [StepEvent(r.id, -1, "", None, None, True, "error", message) for r in reqs]

    def _prefill_group(self, group: list[Request], row: int) -> torch.Tensor:
        """Write the group's prompts into cache rows row.. and return logits [g, V] at each prompt's end."""
        g = len(group)
        # MTP state for speculation ("auto" skips it once speculation has lost at every batch size)
        mtp = self.speculative == "mtp" or (self.speculative == "auto" and self._agreed(self.auto.wants_mtp))
        mtp_cache = self.decoder.mtp_cache.rows(row, row + g) if mtp else None
        return prefill_group(self.model, group, self.cache.rows(row, row + g), mtp_cache, self.prefill_chunk,
                             self.record_routing, whole=self.decoder.prefill)

    def _drop_finished(self) -> None:
        for row in range(len(self.running) - 1, -1, -1):
            if self.running[row].finish_reason is not None:
                self._free_row(row)

    def _free_row(self, row: int) -> None:
        """Remove the request in `row`; the last row moves into its place (rows stay 0..n-1)."""
        last = len(self.running) - 1
        if row != last:
            moved = self.running[last]
            self.decoder.move_row(last, row, moved.pos, mtp=self.speculative is not None)
            self.running[row] = moved
        self.running.pop()

