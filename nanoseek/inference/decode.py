"""The decode hot path: the model work of one engine step for every running request, over the
preallocated latent cache, compiled or eager, plain or speculative.

`Decoder` owns the caches and the compiled steps; the engine (engine.py) decides which requests
run and turns what comes back into tokens and events. Row b of every cache is running request b
(rows 0..n-1), so a step passes plain slices of the cache to the model: no gather, no copy.

Design choices, with the measurements behind them (the `small` preset, 2-core CPU, fp32):
* Decode uses the absorbed path: per step it reads kv_lora_rank + rope values per cached token
  and never re-expands the cache.
* Compiled decoding (`compiled.py`) wraps the decode (and speculative verify/draft) forward in
  torch.compile, gpt-fast style: attention then reads all max_seq_len cache rows under the position
  mask, so the shape is static and one graph serves every step and every prompt length (the batch
  size stays a dynamic dimension). It cuts the per-token Python and kernel-launch overhead that
  dominates small models on CPU (tiny preset, batch 1, prompt 512: ~0.7 ms/step against ~2.2 ms
  eager), at the price of compiling (25-45 s cold, a few seconds from the disk cache). On CPU (and
  in bf16) every batch size runs compiled (one graph per path the MoE takes: gathered experts, on CPU
  every expert densely, the grouped GEMM): the routed experts' fp32 grouped GEMM is a custom op on CPU
  (`model/moe.py`), so it does not break the graph (a 64-row GRPO rollout step, tiny preset: ~5.7 ms
  eager -> ~3.7 ms compiled; ~3 ms since such a batch runs the experts densely). fp32 on a GPU
  compiles only the gathered-experts path: past it a per-expert loop breaks the graph.
* At batch 1 the compiled decode and greedy speculative steps are AOTInductor packages on disk
  (`aot.py`, `_packages`), which a later process loads in ~0.1 s instead of tracing for seconds.
  So is a lone prompt's prefill (`prefill`, one package per prompt-length range, with and without
  the MTP caches), from PREFILL_MIN tokens: below that, prefill is a small share of a generation.
* A greedy speculative step (MTP draft + verify, `speculative.greedy_step`) is one compiled graph.
  With speculative="auto", plain steps keep each request's newest main hidden states; when
  speculation turns on, the MTP cache rows the plain steps skipped are written first (`catch_up`).
"""

from __future__ import annotations

import time

import torch

from ..model.moe import dense_tokens
from ..quant.inference import is_fp8_resident
from . import speculative as spec
from .aot import Flat, Package
from .cache import LatentCache
from .compiled import CompiledSteps, CompileRecord, cache_dir
from .prefill import whole_prompt
from .request import Request, per_row

# speculative="auto": MTP cache rows a request may fall behind in plain steps before catching up.
CATCH_UP_ROWS = 256
# batch > 1: compiled steps (which read every cache row) only while the rows in use are >= 1/this of them,
# or the cache is at most SHORT_CACHE rows long: read whole at little cost (a GRPO rollout of 64 rows over
# an 81-row cache ran its first steps eagerly, ~8 ms each instead of ~4)
FULL_READ_MAX = 4
SHORT_CACHE = 128
# The shortest prompt the compiled prefill package serves (at least the tokens past which the MoE
# runs its grouped GEMM, `Decoder.prefill_min`: export fixes that branch).
PREFILL_MIN = 64


class Decoder:
    """The model side of decoding for an engine.

    cache: the main model's LatentCache [max_batch, max_len + depth, .] (a speculative verify writes
    up to `depth` positions past the last token kept); mtp_cache: the MTP modules' (made by
    `add_mtp_cache`); steps: the CompiledSteps holding the compiled and eager hot-path functions
    (compile_mode "on" | "off" | "auto"); record_routing: keep the last forward's MoE routing in
    `routing`.
    """

    def __init__(self, model, max_batch_size: int, max_len: int, absorbed: bool, compile_mode: str,
                 fp8_index_keys: bool, record_routing: bool):
        self.model, self.args = model, model.args
        weight = model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.depth = len(model.mtp)
        self.max_batch_size, self.max_len = max_batch_size, max_len
        self.absorbed, self.fp8_index_keys, self.record_routing = absorbed, fp8_index_keys, record_routing
        self.cache = LatentCache(self.args, self.args.num_hidden_layers, max_batch_size, max_len + self.depth,
                                 self.dtype, self.device, fp8_index_keys)
        self.mtp_cache: LatentCache | None = None
        self.routing: list | None = None  # the last decode/verify forward's Routing list (record_routing)
        self.catch_up_s = 0.0  # seconds spent in `catch_up` since the engine reset this
        self.warming = False  # Engine.warmup: compile every graph, whatever the rows in use
        # the compiled prefill's shortest prompt (past the MoE's branch point), or None: no prefill package
        # under DSA (its indexer branches on the prompt's length against index_topk), for FP8-resident
        # weights or fp32 on a GPU (their routed experts over many tokens loop over data-dependent counts)
        E, K = self.args.n_routed_experts or 0, self.args.num_experts_per_tok or 1
        exportable = (self.device.type == "cpu" or self.dtype == torch.bfloat16) and not is_fp8_resident(model)
        # the fewest tokens whose forward takes the MoE's grouped path (past gathered experts and, on
        # CPU, every expert densely): export fixes that branch, and the engine's warm-up compiles it
        self.grouped_from = max(E // K, self.dense_tokens()) + 1
        self.prefill_min = max(PREFILL_MIN, self.grouped_from) if exportable and not self.args.dsa else None
        self.steps = CompiledSteps({"decode step": self._forward_eager, "MTP draft step": model.mtp_step,
                                    "speculative step": self._greedy_speculative_step,
                                    "prefill": self._whole_prompt, "MTP prefill": self._whole_prompt},
                                   model, compile_mode, self.device,
                                   self._packages() if compile_mode != "off" else None,
                                   package_only=("prefill", "MTP prefill"))

    def _packages(self) -> dict:
        """The batch-1 decode and greedy speculative steps as AOTInductor packages (aot.py): name ->
        (Package, flat(*call args) -> the package's tensors, or None for a call it does not serve)."""
        model, absorbed, L = self.model, self.absorbed, self.args.num_hidden_layers

        def decode(ids, positions, *cache):
            out = model.run(ids, positions=positions, cache=list(cache), kv_len=cache[0].shape[1], absorbed=absorbed)
            return out.logits, out.hidden

        def decode_flat(ids, positions, cache, kv_len):  # a batch-1 decode step over every cache row
            return (ids, positions, *cache) if ids.shape == (1, 1) and kv_len == cache[0].shape[1] else None

        def speculative(prev, tokens, positions, newest, *caches):
            S = caches[0].shape[1]
            return spec.greedy_step(model, prev, tokens, positions, newest, list(caches[:L]), list(caches[L:]), S, S,
                                    absorbed)

        def speculative_flat(prev, tokens, positions, newest, cache, mtp_cache, kv_len, verify_kv_len):
            whole = kv_len == verify_kv_len == cache[0].shape[1]
            return (prev, tokens, positions, newest, *cache, *mtp_cache) if prev.shape[0] == 1 and whole else None

        D, shortest = self.depth, self.prefill_min

        def prefill(ids, *caches):
            return (whole_prompt(model, ids, list(caches[:L]), list(caches[L:]) or None),)

        def prefill_flat(ids, cache, mtp_cache):  # a lone prompt of >= PREFILL_MIN tokens
            fits = ids.shape[0] == 1 and ids.shape[1] - D - 1 >= shortest
            return (ids, *cache, *(mtp_cache or ())) if fits else None

        def package(name, fn, flat, n_fixed, n_cache, prompt=False):
            # the thread count too: inductor writes a CPU kernel's parallel loops only when the
            # process compiling it has more than one thread (a package built at 1 thread ran
            # single-threaded in a 2-thread process)
            threads = torch.get_num_threads() if self.device.type == "cpu" else 0
            key = CompileRecord(model, tag=f"aoti|{name}|absorbed={absorbed}|threads={threads}").key
            path = cache_dir() / "aoti" / f"{name.replace(' ', '-')}-{key}.pt2"
            dynamic = [{}] * n_fixed + [{1: "cache_len"}] * n_cache  # one package for every max_seq_len
            minimum, instead = None, "using torch.compile"
            if prompt:  # the prompt's length varies too (ids [1, T + D + 1]); the cache holds >= T rows
                dynamic = [{1: "prompt"}] + dynamic[1:]
                minimum, instead = {"prompt": shortest + D + 1, "cache_len": shortest}, "prefilling eagerly"
            return Package(Flat(model, fn), path, dynamic, name, minimum, instead), flat

        out = {"decode step": package("decode step", decode, decode_flat, 2, L)}
        if self.depth:
            out["speculative step"] = package("speculative step", speculative, speculative_flat, 4, L + self.depth)
        if shortest is not None:
            out["prefill"] = package("prefill", prefill, prefill_flat, 1, L, prompt=True)
            if self.depth:
                out["MTP prefill"] = package("MTP prefill", prefill, prefill_flat, 1, L + self.depth, prompt=True)
        return out

    def add_mtp_cache(self) -> None:
        if self.mtp_cache is None:
            self.mtp_cache = LatentCache(self.args, self.depth, self.max_batch_size, self.max_len + self.depth,
                                         self.dtype, self.device, self.fp8_index_keys)

    def move_row(self, src: int, dst: int, length: int, mtp: bool) -> None:
        """Copy the first `length` cached positions of row `src` into row `dst` (and the MTP cache's)."""
        self.cache.move(src, dst, length)
        if mtp and self.mtp_cache is not None:
            self.mtp_cache.move(src, dst, length)

    # --- the functions CompiledSteps compiles ------------------------------------------------
    def _forward_eager(self, ids: torch.Tensor, positions: torch.Tensor, cache: list, kv_len: int):
        """A decode or verify forward over cache rows 0..n-1.
        ids, positions [n, T] -> (logits [n, T, V], hidden [n, T, hidden])."""
        out = self.model.run(ids, positions=positions, cache=cache, kv_len=kv_len, absorbed=self.absorbed)
        if self.record_routing:
            self.routing = out.routing
        return out.logits, out.hidden

    def _whole_prompt(self, ids: torch.Tensor, cache: list, mtp_cache: list | None) -> tuple[torch.Tensor]:
        return (whole_prompt(self.model, ids, cache, mtp_cache),)  # a tuple, as the package returns

    def _greedy_speculative_step(self, prev, tokens, positions, newest, cache, mtp_cache, kv_len, verify_kv_len):
        """spec.greedy_step with this engine's model and attention path (compiled as one graph)."""
        return spec.greedy_step(self.model, prev, tokens, positions, newest, cache, mtp_cache, kv_len,
                                verify_kv_len, self.absorbed)

    # --- compiled or eager -------------------------------------------------------------------
    def dense_tokens(self) -> int:
        """Up to this many tokens a forward runs the routed experts densely (`moe.dense_tokens`; CPU)."""
        a = self.args
        if not a.n_routed_experts or self.device.type != "cpu":
            return 0
        return dense_tokens(a.n_routed_experts, a.num_experts_per_tok, a.hidden_size, a.moe_intermediate_size)

    def graph_fits(self, tokens: int) -> bool:
        """Would the compiled graph serve a forward over `tokens` tokens whole? On CPU and in bf16 always
        (the grouped GEMM traces); fp32 on a GPU only while the MoE layers take their gathered-experts
        path (tokens × experts per token <= routed experts): past it, the per-expert loop of
        `moe.grouped_mm` breaks the graph, and a broken graph measured slower than eager."""
        gathered = tokens * self.args.num_experts_per_tok <= self.args.n_routed_experts
        return gathered or self.dtype == torch.bfloat16 or self.device.type == "cpu"

    def _compiled(self, rows: int, tokens: int, needed: int) -> bool:
        """Run this step compiled? Where a graph serves it, and at batch > 1 only while the cache rows
        in use are at least 1/FULL_READ_MAX of the cache: the compiled step reads every row (static
        shape), eager only those in use, and reading is what a wide batch pays for (tiny preset, batch
        16, 4,096-row cache with ~100 in use: 23 ms a step compiled against 6 ms eager). Batch 1 always
        compiles (its ahead-of-time package; one row's reads are cheap)."""
        full_read_pays = rows == 1 or self.warming or needed * FULL_READ_MAX >= self.cache.max_len \
            or self.cache.max_len <= SHORT_CACHE
        return self.steps.covers(rows) and self.graph_fits(tokens) and full_read_pays

    def _kv_len(self, compiled: bool, needed: int) -> int:
        """Cache rows attention reads: just what is needed in eager mode; all of them when compiled,
        so the compiled step has one static shape (gpt-fast style) instead of a new one per length."""
        return self.cache.max_len if compiled else needed

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, needed: int):
        """The decode/verify forward over cache rows 0..n-1, compiled or eager; `needed`: rows in use.
        ids, positions [n, T] -> (logits [n, T, V], hidden [n, T, hidden])."""
        compiled = self._compiled(ids.shape[0], ids.numel(), needed)
        return self.steps.call("decode step", compiled, ids, positions, self.cache.rows(0, ids.shape[0]),
                               self._kv_len(compiled, needed))

    def prefill(self, ids: torch.Tensor, cache: list, mtp_cache: list | None) -> torch.Tensor:
        """`prefill.whole_prompt` for a lone prompt, as its package once compiling is on (eager below
        PREFILL_MIN tokens, or where no package can be had)."""
        name = "prefill" if mtp_cache is None else "MTP prefill"
        return self.steps.call(name, self.steps.active, ids, cache, mtp_cache)[0]

    def build_prefill(self) -> None:
        """Load (or build) the prefill packages now, on a throwaway cache of PREFILL_MIN rows: the
        warm-up's own prompts are shorter than any the packages serve. Not for an engine whose
        prompts cannot be that long."""
        if "prefill" not in self.steps.packages or self.max_len <= self.prefill_min:
            return
        D, T = self.depth, self.prefill_min
        ids = torch.zeros(1, T + D + 1, dtype=torch.long, device=self.device)
        cache = LatentCache(self.args, self.args.num_hidden_layers, 1, T, self.dtype, self.device, self.fp8_index_keys)
        mtp = LatentCache(self.args, D, 1, T, self.dtype, self.device, self.fp8_index_keys) if D else None
        self.prefill(ids, cache.rows(0, 1), None)
        if mtp is not None:
            self.prefill(ids, cache.rows(0, 1), mtp.rows(0, 1))

    def _mtp_step(self, compiled: bool):
        return lambda *args, **kwargs: self.steps.call("MTP draft step", compiled, *args, **kwargs)

    # --- one step --------------------------------------------------------------------------
    def plain(self, reqs: list[Request], keep_hidden: bool) -> torch.Tensor:
        """One plain decode forward for requests in rows 0..n-1 -> logits [n, V] of their next token.
        keep_hidden (speculative="auto"): append each request's newest main hidden state to the
        `hidden` it keeps for a later switch to speculation."""
        ids = torch.tensor([[r.tokens[-1]] for r in reqs], device=self.device)
        positions = torch.tensor([[r.pos] for r in reqs], device=self.device)
        logits, hidden = self.forward(ids, positions, max(r.pos for r in reqs) + 1)
        if self.record_routing:
            for r, routing in zip(reqs, per_row(self.routing, len(reqs))):
                r.routing = routing
        if keep_hidden:
            for row, r in enumerate(reqs):
                if r.hidden is not None:
                    r.hidden = torch.cat([r.hidden, hidden[row, -1:]])
                    if len(r.hidden) > CATCH_UP_ROWS:
                        self.catch_up(row, r)
        return logits[:, -1]

    def catch_up(self, row: int, req: Request) -> None:
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
        self.catch_up_s += time.perf_counter() - t0

    def speculative(self, reqs: list[Request], replicas=None) -> tuple[list[list[int]], torch.Tensor, list]:
        """Draft D tokens per request with the MTP modules, verify them in one main forward.
        replicas: under torchrun (distributed.py), the drafts and the kept tokens are rank 0's on every rank.

        Returns (kept: per request its new tokens, the accepted drafts then the main model's own;
        logits [n, D+1, V] of the main model at newest .. newest+D; routing: per request its
        verify forward's routing [D+1, layers, K] or None). Each request's `hidden` moves on to
        the window of its next step."""
        n, D = len(reqs), self.depth
        W = D + 1
        newest = torch.tensor([r.pos for r in reqs], device=self.device)
        positions = spec.window(newest, D)
        tokens = torch.tensor([[r.token_at(p) for p in range(r.pos - W, r.pos + 1)] + [0] * D for r in reqs],
                              device=self.device)  # positions newest-W .. newest+D
        hidden = torch.stack([r.hidden for r in reqs])
        most = max(r.pos for r in reqs)
        compiled = self._compiled(n, positions.numel(), most + D + 1)
        if compiled and all(r.params.greedy for r in reqs):  # draft and verify in one compiled call
            kv = self._kv_len(compiled, most)
            drafts, logits, verify_hidden = self.steps.call(
                "speculative step", True, hidden, tokens, positions, newest, self.cache.rows(0, n),
                self.mtp_cache.rows(0, n), kv, kv)
            qs = [None] * D
        else:
            drafts, qs = spec.draft(self._mtp_step(compiled), hidden, tokens, positions, newest,
                                    self.mtp_cache.rows(0, n), reqs, kv_len=self._kv_len(compiled, most))
            if replicas is not None:  # the verify forward reads rank 0's drafts on every rank
                tokens[:, W + 1:] = drafts = replicas.tokens(drafts)
            verify_ids = tokens[:, W:]  # newest token, then the drafts
            verify_pos = newest[:, None] + torch.arange(D + 1, device=self.device)
            logits, verify_hidden = self.forward(verify_ids, verify_pos, most + D + 1)
        kept = spec.accept(logits, drafts, qs, reqs)
        if replicas is not None:
            kept = replicas.token_lists(kept, D + 1)
        routing = per_row(self.routing, n) if self.record_routing else [None] * n
        both = torch.cat([hidden, verify_hidden], dim=1)  # main hidden at newest-W .. newest+D
        for i, (req, toks) in enumerate(zip(reqs, kept)):
            a = len(toks) - 1
            req.hidden = both[i, a + 1 : a + 1 + W].clone()
        return kept, logits, routing
