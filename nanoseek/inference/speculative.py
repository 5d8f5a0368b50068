"""Speculative decoding with the model's own Multi-Token Prediction modules (DeepSeek-V3 §2.2, §5.4.3).

MTP module k at position i reads the depth-(k-1) state of token i and the embedding of token
i+k, and predicts token i+k+1. At decode time the D modules chained at the newest position draft
D tokens ahead; the main model then scores the newest token and the D drafts in one forward, and
we keep the longest prefix it agrees with plus one token of its own:

* greedy: a draft is kept iff it is the main model's argmax, so the output is exactly plain
  greedy decoding (the main model's argmax at each position decides every token);
* sampling: the standard speculative rule (Leviathan et al. 2023, Chen et al. 2023): keep draft
  d ~ q with probability min(1, p(d)/q(d)); on rejection draw from norm(max(p - q, 0)); if all D
  are kept draw a bonus token from p. The output distribution is exactly p's.

The MTP layers have their own latent caches. MTP row j of depth k holds what was computed from
the depth-(k-1) state at position j and token j+k, so it is valid only once token j+k is
committed; a row written with a draft that is later rejected must be rewritten. After a step
that commits a tokens beyond the newest position M, the rows to (re)write start at or after
M' - D - 1 (M' the new newest position), so each draft pass recomputes the fixed window of the
D + 1 positions [M' - D - 1, M' - 1] for every depth: a static shape, and it needs only the
main model's hidden states at those D + 1 positions, which each request carries along.
"""

from __future__ import annotations

from collections import deque

import torch

from .sampling import draw, probabilities, uniforms


@torch.inference_mode()
def prefill_mtp(model, hidden: torch.Tensor, ids: torch.Tensor, start: int, mtp_cache: list) -> None:
    """Fill the MTP caches for one prefill chunk.

    hidden [g, T, hidden]: the main model's final hidden states at positions start..start+T-1;
    ids [g, >= start+T+D]: the (padded) prompt tokens; mtp_cache: one layer cache per depth.
    Rows whose next tokens are not known yet (the prompt's last D+1 positions, padding) get
    provisional values that the first draft window rewrites. Uses the naive attention path, which
    is the cheap one for long chunks.
    """
    g, T, _ = hidden.shape
    positions = torch.arange(start, start + T, device=hidden.device).expand(g, T)
    cos, sin = model.rope(positions)
    prev = hidden
    for k, module in enumerate(model.mtp, start=1):
        emb = model.embed_tokens(ids[:, start + k : start + k + T])
        # the first chunk attends within itself: plain causal attention (see MLA.forward)
        prev, _ = module(prev, emb, cos, sin, mtp_cache[k - 1], positions if start else None, start + T,
                         absorbed=False)


def window(newest: torch.Tensor, depth: int) -> torch.Tensor:
    """Positions the draft pass recomputes: newest [n] -> [n, D+1] = newest-D-1 .. newest-1, clamped
    at 0 (clamped duplicates rewrite identical values)."""
    W = depth + 1
    return (newest[:, None] - W + torch.arange(W, device=newest.device)).clamp(min=0)


def draft(mtp_step, prev: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, newest: torch.Tensor,
          mtp_cache: list, reqs, kv_len: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Chain the D MTP modules over the window and draft D tokens per row.

    mtp_step: the model's `mtp_step` (or a compiled one); one layer cache per depth in `mtp_cache`;
    prev [n, W, hidden]: main hidden at the window positions; positions [n, W] (from `window`);
    tokens [n, W+1+D]: tokens at positions newest-W .. newest+D, the last D slots are filled here;
    newest [n]; kv_len: MTP cache rows to attend over (at least max(newest)). Returns (drafts [n, D], q: per depth the draft distributions [n, V] of sampled
    rows, None where every row is greedy).
    """
    D = len(mtp_cache)
    W = D + 1
    offset = (newest - W)[:, None]
    sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
    qs: list[torch.Tensor | None] = []
    for k in range(1, D + 1):
        next_ids = tokens.gather(1, positions + k - offset)
        logits, prev = mtp_step(k, prev, next_ids, positions, mtp_cache[k - 1], kv_len=kv_len, last=1)
        logits = logits[:, -1]
        d = logits.argmax(dim=-1)
        q = None
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            q = torch.zeros_like(logits, dtype=torch.float32)
            q[index] = probabilities(logits[index], [reqs[i].params for i in sampled])
            d[index] = draw(q[index], uniforms([reqs[i].random for i in sampled], logits.device))
        tokens[:, W + k] = d
        qs.append(q)
    return tokens[:, W + 1 :], qs


def greedy_step(model, prev: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, newest: torch.Tensor,
                cache: list, mtp_cache: list, kv_len: int, verify_kv_len: int, absorbed: bool = True):
    """A whole greedy speculative step's model work in one call, so that it compiles to one graph:
    draft D tokens by argmax (as `draft` does for greedy rows), then run the main model over the
    newest token and the drafts. Arguments as for `draft`, plus the main model's per-layer cache
    rows and the rows its attention reads (verify_kv_len). Returns (drafts [n, D],
    logits [n, D+1, V], hidden [n, D+1, hidden]) of the main model at newest .. newest+D."""
    D = len(mtp_cache)
    W = D + 1
    offset = (newest - W)[:, None]
    drafts = []
    for k in range(1, D + 1):
        next_ids = tokens.gather(1, positions + k - offset)
        logits, prev = model.mtp_step(k, prev, next_ids, positions, mtp_cache[k - 1], kv_len=kv_len, last=1)
        d = logits[:, -1].argmax(dim=-1)
        tokens = torch.cat([tokens[:, : W + k], d[:, None], tokens[:, W + k + 1 :]], dim=1)
        drafts.append(d)
    verify_pos = newest[:, None] + torch.arange(D + 1, device=newest.device)
    out = model.run(tokens[:, W:], positions=verify_pos, cache=cache, kv_len=verify_kv_len, absorbed=absorbed)
    return torch.stack(drafts, dim=1), out.logits, out.hidden


def accept(logits: torch.Tensor, drafts: torch.Tensor, qs: list[torch.Tensor | None], reqs) -> list[list[int]]:
    """The verification rule. logits [n, D+1, V]: the main model at [newest, d_1..d_D];
    drafts [n, D]; qs from `draft`. Returns per row the new tokens: the kept drafts, then one token
    from the main model (the correction, or the bonus when every draft was kept)."""
    n, D1, V = logits.shape
    D = D1 - 1
    argmax = logits.argmax(dim=-1).tolist()
    drafts_l = drafts.tolist()
    sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
    p = {}
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        params = [reqs[i].params for i in sampled for _ in range(D1)]
        probs = probabilities(logits[index].reshape(-1, V), params).view(len(sampled), D1, V)
        p = {i: probs[j] for j, i in enumerate(sampled)}
    out = []
    for i, r in enumerate(reqs):
        new: list[int] = []
        if r.params.greedy:
            for j in range(D):
                new.append(argmax[i][j])
                if drafts_l[i][j] != argmax[i][j]:
                    break
            else:
                new.append(argmax[i][D])
        else:
            stream = r.random
            for j in range(D):
                d, pj, qj = drafts_l[i][j], p[i][j], qs[j][i]
                u = stream.next()
                if u * qj[d].item() < pj[d].item():  # accept with probability min(1, p(d)/q(d))
                    new.append(d)
                    continue
                residual = (pj - qj).clamp(min=0)
                if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is p itself
                    residual = pj
                new.append(int(draw(residual[None], stream.tensor(logits.device))[0]))
                break
            else:
                new.append(int(draw(p[i][D][None], stream.tensor(logits.device))[0]))
        out.append(new)
    return out


def catch_up(mtp_step, hidden: torch.Tensor, positions: torch.Tensor, token_at, mtp_cache: list, kv_len: int) -> None:
    """Write the MTP cache rows of one request that plain decoding skipped.

    hidden [1, T, hidden]: the main model's hidden states at `positions` [1, T]; token_at(p): the
    request's token at position p; mtp_cache: that request's row of each depth's cache ([1, S, .]).
    Depth k at position p reads depth k-1's state there and the token at p + k.
    """
    prev = hidden
    for k in range(1, len(mtp_cache) + 1):
        next_ids = torch.tensor([[token_at(p + k) for p in positions[0].tolist()]], device=hidden.device)
        _, prev = mtp_step(k, prev, next_ids, positions, mtp_cache[k - 1], kv_len=kv_len, last=0)


class AutoSpeculation:
    """speculative="auto": speculate only while it is faster, judged per batch size.

    Per bucket of batch sizes (1, 2, 3-4, 5-8, ...) it keeps the last few step times of plain and
    speculative decoding and the tokens per request a speculative step yields, and picks the mode
    with more tokens per second: speculative iff tokens_per_step / t_spec > (1 + MARGIN) / t_plain.
    A new bucket is measured in alternating plain and speculative steps (PROBE of each), so both
    are timed under the same load. After that the modes alternate again for PROBE steps (half
    each, joining the older samples) each time `interval` steps have passed, the interval doubling (from REPROBE up to 16x) while the
    verdict holds, since acceptance drifts with the text and the step costs with the context length. A mode's cost is the fastest of its last 16 steps:
    interference (other processes, a page fault) only ever slows a step down, and on a busy machine
    more than half the steps were preempted, which moved medians by 10x.
    """

    PROBE, REPROBE, MARGIN = 8, 128, 0.02

    def __init__(self):
        self.buckets: dict[int, dict] = {}

    @staticmethod
    def bucket(n: int) -> int:
        return 1 << (n - 1).bit_length()

    def _get(self, n: int) -> dict:
        return self.buckets.setdefault(self.bucket(n), dict(plain=deque(maxlen=16), spec=deque(maxlen=16),
                                                            tokens=deque(maxlen=32), since=0, turn=True,
                                                            interval=self.REPROBE, probing=0, on=None))

    @staticmethod
    def _cost(times) -> float:
        return min(times)

    def speedup(self, n: int) -> float | None:
        """Measured speculative / plain tokens per second at batch size n (None: not measured yet)."""
        b = self._get(n)
        if not b["plain"] or not b["spec"] or not b["tokens"]:
            return None
        return sum(b["tokens"]) / len(b["tokens"]) * self._cost(b["plain"]) / self._cost(b["spec"])

    def choose(self, n: int) -> bool:
        """Speculate in this step at batch size n?"""
        b = self._get(n)
        if b["probing"] or len(b["plain"]) < self.PROBE or len(b["spec"]) < self.PROBE:
            b["probing"] = max(b["probing"] - 1, 0)
            b["turn"] = not b["turn"]  # plain first, then alternating
            return b["turn"]
        on = self.speedup(n) > 1 + self.MARGIN
        if b["on"] is not None and on != b["on"]:
            b["interval"] = self.REPROBE  # the verdict changed: look again soon
        b["on"] = on
        b["since"] += 1
        if b["since"] >= b["interval"]:
            b["since"], b["probing"] = 0, self.PROBE
            b["interval"] = min(2 * b["interval"], 16 * self.REPROBE)
        return on

    def record(self, n: int, speculative: bool, seconds: float, tokens_per_row: float) -> None:
        b = self._get(n)
        b["spec" if speculative else "plain"].append(seconds)
        if speculative:
            b["tokens"].append(tokens_per_row)

    @property
    def wants_mtp(self) -> bool:
        """False once every batch size measured has found speculation slower: new requests then skip
        the MTP prefill, and decoding stays plain."""
        return not self.buckets or any(b["on"] is not False for b in self.buckets.values())

    def summary(self) -> dict:
        """{bucket: {"speculating", "speedup", "plain_ms", "speculative_ms", "tokens_per_step"}}."""
        out = {}
        for size, b in sorted(self.buckets.items()):
            med = lambda q: round(1e3 * self._cost(q), 3) if q else None  # noqa: E731
            out[size] = dict(speculating=b["on"], speedup=self.speedup(size), plain_ms=med(b["plain"]),
                             speculative_ms=med(b["spec"]),
                             tokens_per_step=sum(b["tokens"]) / len(b["tokens"]) if b["tokens"] else None)
        return out
