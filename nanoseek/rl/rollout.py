"""Rollouts for GRPO on the inference engine, and the policy's log-probs of them in a training forward.

    engine = Engine(model, max_batch_size=64, max_seq_len=L, record_routing=keep_routing)   # no tokenizer
    groups = rollout(engine, prompts, G=8, max_new_tokens=64, temperature=1.0, seed=step, eos_ids=[tok.eos_id])
    batch = Batch.of([c for g in groups for c in g], routing=keep_routing)   # padded tensors
    logp = completion_logps(model, batch)                                    # [N, T] with grad

Design choices:
* **The engine runs over the policy itself**: `Engine(model)` holds the training model, not a copy,
  so the optimizer's in-place updates are what the next rollout samples from. All P·G requests go
  through one engine with continuous batching: a finished completion frees its row for the next
  request at once. Request j of prompt i is seeded seed + i·G + j, so a step's rollouts do not
  depend on the batch size or on timing (and --resume redraws them exactly).
* **No tokenizer in the rollout engine**: rewards read the decoded completions once, at the end;
  an engine with a tokenizer would detokenise every token as it is sampled (text deltas and stop
  strings, which rollouts do not use): ~10-20% of a tiny model's rollout. The tokenizer's EOS id
  goes in as a stop token id instead (`eos_ids`).
* **Log-probs recorded at sampling** (`Completion.logprobs`, the engine's raw-model log-probs of
  the sampled tokens) are kept for diagnostics: the training forward recomputes the policy's
  log-probs (as TRL does), and their gap to the recorded ones measures how far the inference
  path (absorbed attention over the latent cache, MoE routing) drifts from the training path.
* **Routing replay** (DeepSeek-V3.2 §"Keep Routing"): with `record_routing=True` the engine
  records the experts every MoE layer chose for each token while sampling, and `replay_routing`
  makes the training forward use exactly those experts (the gate still computes their weights,
  so the gate keeps learning). A tiny numeric difference between the two paths can flip a near
  tie in top-k routing, and then the ratio π_θ/π_old compares two different sub-networks.
* **Keep sampling mask** (DeepSeek-V3.2 §3.1): with top-p / top-k the engine samples from a
  truncated distribution; with `Engine(record_sampling_mask=True)` it records each token's kept
  set (`Completion.kept`), and `completion_logps` then computes the current (and reference)
  policy's log-probs over that same set, renormalised (`truncated_logps`), so the ratio
  π_θ/π_old compares the same action space. (A [N, T, V] boolean mask is built per batch.)
* **Each prompt computed once in the training forwards** (`shared_token_logps`): the G completions
  of a prompt share it, so its tokens (all but the last) run through the model once, as a batch of
  the P distinct prompts that writes each layer's latent cache rows; those rows are copied to the
  prompt's G rows (an index_select: gradients flow back into the one prompt forward), and the
  completions (each starting at its own prompt's last token and position) attend to them through
  the model's cached path (`absorbed=False`: per-head keys and values, the training path). The
  output head runs on the completion positions only (the head is the largest matmul; the prompt's
  logits are never needed). Same log-probs and gradients as running every row in full (`token_logps`,
  the path for routing replay, the sampling mask and DSA models), with ~1/G of the prompt tokens.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from nanoseek.inference import Engine, SamplingParams
from nanoseek.inference.compiled import (CompileRecord, cache_dir, compiled_graphs, fall_back, is_compile_error,
                                         unavailable)
from nanoseek.model.moe import MoE

log = logging.getLogger("nanoseek")


@dataclass
class Completion:
    """One sampled completion: prompt ids, new ids (the stop token included when it stopped), the
    engine's log-prob of each new token, finish_reason ("stop" | "length"), and with routing
    recorded, routing LongTensor[len(prompt) + len(tokens) - 1, moe_layers, K]."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]
    finish_reason: str
    routing: torch.Tensor | None = None
    kept: list[torch.Tensor | None] | None = None  # record_sampling_mask: kept ids per new token


def rollout(engine: Engine, prompts: list[list[int]], G: int, max_new_tokens: int, temperature: float = 1.0,
            top_p: float = 1.0, seed: int = 0, ignore_eos: bool = False, top_k: int = 0,
            eos_ids: list[int] = ()) -> list[list[Completion]]:
    """G completions of every prompt -> groups[i][j] (continuous batching; see the module docstring).
    eos_ids: ids that end a completion besides the engine's own EOS ids (e.g. the tokenizer's, for an
    engine made without one); ignored with ignore_eos."""
    stop = [] if ignore_eos else list(eos_ids)
    queue = [(i, j) for i in range(len(prompts)) for j in range(G)]
    queue.reverse()
    groups: list[list[Completion | None]] = [[None] * G for _ in prompts]
    live: dict[int, tuple[int, int, list, list, list, list]] = {}
    with torch.inference_mode():
        while queue or engine.num_active:
            while queue and engine.free_slots > 0:
                i, j = queue.pop()
                params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                        top_k=top_k, seed=seed + i * G + j, ignore_eos=ignore_eos, logprobs=0,
                                        stop_token_ids=stop)
                live[engine.add_request(prompts[i], params)] = (i, j, [], [], [], [])
            for ev in engine.step():
                i, j, tokens, logps, routing, kept = live[ev.request_id]
                if ev.finish_reason == "error":
                    raise RuntimeError(f"rollout request failed: {ev.error}")
                tokens.append(ev.token_id)
                logps.append(ev.logprob)
                if ev.routing is not None:
                    routing.append(ev.routing)
                kept.append(ev.sampling_mask)
                if ev.finished:
                    del live[ev.request_id]
                    groups[i][j] = Completion(prompts[i], tokens, logps, ev.finish_reason,
                                              torch.cat(routing) if routing else None,
                                              kept if any(k is not None for k in kept) else None)
    return groups  # type: ignore[return-value]


@dataclass
class Batch:
    """Completions as padded tensors for the training forward.

    ids [N, S]: prompt + completion without its last token, right-padded (S = longest);
    starts [N]: the position whose logits predict the first completion token (len(prompt) - 1);
    targets [N, T]: completion tokens (T = longest completion), mask [N, T] 1 on real tokens;
    routing [N, S, moe_layers, K] or None (padding rows route to experts 0..K-1: never read);
    kept: per completion the engine's kept ids per token (keep sampling mask) or None.
    The same rows split at each prompt's last token, for `shared_token_logps`: prefix [P, Lp] the
    distinct prompts without their last token (right-padded; a prompt's length there is starts[n]),
    prefix_of [N] row n's prompt, suffix [N, T] its prompt's last token then its completion without
    the last token (right-padded): suffix[n, t] predicts targets[n, t]."""

    ids: torch.Tensor
    starts: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    routing: torch.Tensor | None
    kept: list | None = None
    prefix: torch.Tensor | None = None
    prefix_of: torch.Tensor | None = None
    suffix: torch.Tensor | None = None

    @classmethod
    def of(cls, completions: list[Completion], routing: bool = False, device="cpu",
           sampling_mask: bool = False) -> "Batch":
        N = len(completions)
        S = max(len(c.prompt) + len(c.tokens) - 1 for c in completions)
        T = max(len(c.tokens) for c in completions)
        ids = torch.zeros(N, S, dtype=torch.long)
        targets = torch.zeros(N, T, dtype=torch.long)
        mask = torch.zeros(N, T)
        starts = torch.tensor([len(c.prompt) - 1 for c in completions])
        prompts: dict[tuple, int] = {}
        prefix_of = torch.tensor([prompts.setdefault(tuple(c.prompt[:-1]), len(prompts)) for c in completions])
        prefix = torch.zeros(len(prompts), max(map(len, prompts)), dtype=torch.long)
        for p, i in prompts.items():
            prefix[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        suffix = torch.zeros(N, T, dtype=torch.long)
        for n, c in enumerate(completions):
            seq = c.prompt + c.tokens[:-1]
            ids[n, : len(seq)] = torch.tensor(seq)
            suffix[n, : len(c.tokens)] = torch.tensor(seq[len(c.prompt) - 1 :])
            targets[n, : len(c.tokens)] = torch.tensor(c.tokens)
            mask[n, : len(c.tokens)] = 1
        replay = None
        if routing:
            first = completions[0].routing
            if first is None:
                raise ValueError("routing replay needs rollouts from an engine with record_routing=True")
            layers, K = first.shape[1:]
            replay = torch.arange(K).expand(N, S, layers, K).clone()
            for n, c in enumerate(completions):
                replay[n, : len(c.routing)] = c.routing
            replay = replay.to(device)
        kept = [c.kept for c in completions] if sampling_mask and any(c.kept for c in completions) else None
        return cls(ids.to(device), starts.to(device), targets.to(device), mask.to(device), replay, kept,
                   prefix.to(device), prefix_of.to(device), suffix.to(device))

    def select(self, rows: torch.Tensor | list[int]) -> "Batch":
        """A minibatch of these rows (padding trimmed to the rows' own longest)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.ids.device)
        mask = self.mask[rows]
        T = int(mask.sum(-1).max().item())
        S = int((self.starts[rows] + mask.sum(-1).long()).max().item())
        prefix = prefix_of = suffix = None
        if self.prefix is not None:  # the rows' own prompts only, renumbered in order
            used = self.prefix_of[rows].unique()
            prefix = self.prefix[used, : int(self.starts[rows].max().item())]
            prefix_of, suffix = torch.searchsorted(used, self.prefix_of[rows]), self.suffix[rows, :T]
        return Batch(self.ids[rows, :S], self.starts[rows], self.targets[rows, :T], mask[:, :T],
                     None if self.routing is None else self.routing[rows, :S],
                     None if self.kept is None else [self.kept[r] for r in rows.tolist()],
                     prefix, prefix_of, suffix)


def moe_gates(model) -> list:
    """The gates of the main model's MoE layers, in order (the order of Output.routing)."""
    return [layer.mlp.gate for layer in model.layers if isinstance(layer.mlp, MoE)]


@contextlib.contextmanager
def replay_routing(model, routing: torch.Tensor | None):
    """Within the block, model forwards over [B, S] tokens use routing [B, S, moe_layers, K] instead of
    choosing experts (None: a no-op)."""
    if routing is None:
        yield
        return
    gates = moe_gates(model)
    try:
        for l, gate in enumerate(gates):
            gate.replay = routing[:, :, l].reshape(-1, routing.shape[-1])
        yield
    finally:
        for gate in gates:
            gate.replay = None


def completion_logps(model, batch: Batch, temperature: float = 1.0, replay: bool = True,
                     compiled: "CompiledLogps | None" = None, shared: bool = True) -> torch.Tensor:
    """The model's log-probs of the completion tokens -> FloatTensor[N, T] (0 at padding), fp32,
    computed from logits / temperature (the distribution the tokens were sampled from, as TRL does).
    Replays the batch's routing when it has one (and replay=True). shared: each distinct prompt
    computed once (`shared_token_logps`) where that serves the batch (no routing replay, no sampling
    mask, no DSA), else every row in full (`token_logps`). compiled: run the forward through this
    `CompiledLogps` where it serves the batch (no routing replay, no sampling mask)."""
    routing = batch.routing if replay else None
    if batch.kept is None and routing is None:
        if shared and batch.prefix is not None and not model.args.dsa:
            fn, args = shared_token_logps, (batch.prefix, batch.prefix_of, batch.suffix, batch.starts)
        else:
            fn, args = token_logps, (batch.ids, batch.starts)
        if compiled is not None:
            return compiled(fn, model, *args, batch.targets, temperature) * batch.mask
        return fn(model, *args, batch.targets, temperature) * batch.mask
    with replay_routing(model, routing):
        if batch.kept is None:
            return token_logps(model, batch.ids, batch.starts, batch.targets, temperature) * batch.mask
        logits = completion_logits(model, batch.ids, batch.starts, batch.targets.shape[1]) / temperature
    return truncated_logps(logits, batch.targets, kept_mask(batch.kept, logits.shape)) * batch.mask


def completion_logits(model, ids: torch.Tensor, starts: torch.Tensor, T: int) -> torch.Tensor:
    """ids [N, S], starts [N] -> fp32 logits [N, T, V] at positions starts .. starts + T - 1 (clamped
    to S - 1): the whole sequence through the model, the output head at completion positions only."""
    hidden = model.run(ids, logits=False).hidden  # [N, S, D]
    N = ids.shape[0]
    where = (starts[:, None] + torch.arange(T, device=hidden.device)).clamp(max=hidden.shape[1] - 1)  # [N, T]
    h = hidden.gather(1, where[..., None].expand(N, T, hidden.shape[-1]))
    return model.lm_head(h).float()


def token_logps(model, ids: torch.Tensor, starts: torch.Tensor, targets: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) of targets [N, T] -> [N, T] (padding not masked)."""
    return _logps(completion_logits(model, ids, starts, targets.shape[1]), targets, temperature)


def shared_token_logps(model, prefix: torch.Tensor, prefix_of: torch.Tensor, suffix: torch.Tensor,
                       starts: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`token_logps` with each distinct prompt computed once (see the module docstring): prefix [P, Lp],
    prefix_of [N], suffix [N, T], starts [N] (each row's prompt length in prefix), targets [N, T] as in
    `Batch` -> [N, T] (padding not masked).

    The P prompts run first with a latent cache [P, Lp + T, kv_lora_rank + rope] per layer (rows
    0..Lp-1 written, plain causal attention; a padded prompt's extra rows are garbage that its
    completions overwrite or never see). Row n's completion then runs at positions starts[n] ..
    starts[n] + T - 1 over a copy of its prompt's rows: the cached path writes its own rows at those
    positions and each query attends to the rows at or before its position."""
    N, T = suffix.shape
    P, Lp = prefix.shape
    args = model.args
    rows = (N, Lp + T, args.kv_lora_rank + args.qk_rope_head_dim)
    dtype = model.embed_tokens.weight.dtype
    if Lp:
        caches = [torch.zeros(P, *rows[1:], dtype=dtype, device=suffix.device) for _ in model.layers]
        model.run(prefix, cache=caches, logits=False)  # writes rows 0..Lp-1 of each (positions=None)
        caches = [c.index_select(0, prefix_of) for c in caches]
    else:  # every prompt is one token long: nothing to share
        caches = [torch.zeros(rows, dtype=dtype, device=suffix.device) for _ in model.layers]
    positions = starts[:, None] + torch.arange(T, device=suffix.device)
    hidden = model.run(suffix, positions=positions, cache=caches, absorbed=False, logits=False).hidden  # [N, T, D]
    return _logps(model.lm_head(hidden).float(), targets, temperature)


def _logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


# What compiling the log-prob forward and backward costs when no run of this shape compiled them
# here before (no record): on the 2-core dev machine, cold, a static graph and its dynamic
# recompiles took ~290 s in all (r1.sh's GRPO, another job on the other core); a warm inductor
# cache takes seconds (and then records that).
COLD_LOGPS_COMPILE_S = 300.0


class CompiledLogps:
    """`token_logps` and `shared_token_logps` through torch.compile, for the reference forward and
    the policy's forward and backward (`nanoseek grpo`): inductor fuses the elementwise work
    (RMSNorm, rope, SwiGLU, the softmax) that an eager step spends a third of its time on. Shapes
    are static at first; a second batch shape recompiles once with dynamic dimensions. Where
    compiling cannot work (no C++ compiler) or fails, one logged line and the eager forward from
    then on.

    mode "on" compiles from the first call; "auto" (the stage's default) is the engine's ski-rental
    rule (`nanoseek.inference.compiled.CompiledSteps`): run eagerly, and compile once the update
    seconds spent eagerly (`after_update`) reach the price of compiling — what it cost the last run
    of this model shape here (`CompileRecord`, warm cache: seconds), else COLD_LOGPS_COMPILE_S — so a
    short run never pays minutes of compiling and a long one compiles early.
    `compile_s`: seconds of the forward calls that compiled a graph (the backward compiles at its
    first call, inside loss.backward(), and is counted in the step's update time)."""

    def __init__(self, device: torch.device, model=None, mode: str = "on"):
        assert mode in ("on", "auto"), mode
        self.mode, self.fn, self.compile_s = mode, None, 0.0
        self.reason = unavailable(device)
        if self.reason:
            log.warning("nanoseek: running the GRPO log-prob forward eagerly: %s", self.reason)
        self.record = CompileRecord(model, tag="grpo-logps") if model is not None and not self.reason else None
        self.eager_s, self.eager_step, self.spent = 0.0, 0.0, 0.0
        self._graphs = compiled_graphs()
        if mode == "on":
            self.enable()

    @property
    def price(self) -> float:
        known = self.record.compile_s if self.record is not None else None
        return COLD_LOGPS_COMPILE_S if known is None else known

    def enable(self) -> None:
        if self.fn is None and not self.reason:
            cache_dir()  # inductor's artefacts on disk (~/.cache/nanoseek/inductor), shared by runs
            self.fn = {f: torch.compile(f) for f in (token_logps, shared_token_logps)}

    def after_update(self, seconds: float) -> None:
        """The seconds of one whole update (log-prob forwards, backward, optimizer step). Eager: the
        auto mode's rent. Compiled: a step that compiled graphs records its extra time as the price."""
        now = compiled_graphs()
        compiled_now, self._graphs = now != self._graphs, now
        if self.fn is None:
            self.eager_s, self.eager_step = self.eager_s + seconds, seconds
            if self.mode == "auto" and self.eager_s >= self.price:
                self.enable()
        elif compiled_now and self.record is not None:
            self.spent += max(seconds - self.eager_step, 0.0)
            self.record.save(self.spent)

    def __call__(self, fn, model, *args) -> torch.Tensor:
        """fn(model, *args) (`token_logps` or `shared_token_logps`), compiled once enabled."""
        if self.fn is None:
            return fn(model, *args)
        graphs, t0 = compiled_graphs(), time.perf_counter()
        try:
            out = self.fn[fn](model, *args)
        except Exception as e:
            if not is_compile_error(e):
                raise
            fall_back(e, "GRPO log-prob forward")
            self.fn, self.reason = None, "compiling failed"
            return fn(model, *args)
        if compiled_graphs() != graphs:
            self.compile_s += time.perf_counter() - t0
        return out


def kept_mask(kept: list, shape) -> torch.Tensor:
    """Per-completion lists of kept ids per token (None: all kept) -> BoolTensor[N, T, V]."""
    N, T, V = shape
    mask = torch.ones(N, T, V, dtype=torch.bool)
    for n, per_token in enumerate(kept):
        for t, ids in enumerate((per_token or [])[:T]):
            if ids is not None:
                mask[n, t] = False
                mask[n, t, ids] = True
    return mask


def truncated_logps(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-probs of targets under the distribution renormalised over the kept tokens:
    logits [N, T, V], targets [N, T], keep BoolTensor[N, T, V] -> [N, T] (-inf for a dropped target)."""
    keep = keep.to(logits.device)
    return logits.masked_fill(~keep, float("-inf")).log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
