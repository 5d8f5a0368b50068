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

import torch

from .sampling import draw, probabilities


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
        prev, _ = module(prev, emb, cos, sin, mtp_cache[k - 1], positions, start + T, absorbed=False)


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
        logits, prev = mtp_step(k, prev, next_ids, positions, mtp_cache[k - 1], kv_len=kv_len)
        logits = logits[:, -1]
        d = logits.argmax(dim=-1)
        q = None
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            q = torch.zeros_like(logits, dtype=torch.float32)
            q[index] = probabilities(logits[index], [reqs[i].params for i in sampled])
            u = torch.cat([torch.rand(1, generator=reqs[i].generator, dtype=torch.float64) for i in sampled])
            d[index] = draw(q[index], u.to(logits.device))
        tokens[:, W + k] = d
        qs.append(q)
    return tokens[:, W + 1 :], qs


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
            g = r.generator
            for j in range(D):
                d, pj, qj = drafts_l[i][j], p[i][j], qs[j][i]
                u = torch.rand((), generator=g, dtype=torch.float64).item()
                if u * qj[d].item() < pj[d].item():  # accept with probability min(1, p(d)/q(d))
                    new.append(d)
                    continue
                residual = (pj - qj).clamp(min=0)
                if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is p itself
                    residual = pj
                new.append(int(draw(residual[None], _u(g, logits.device))[0]))
                break
            else:
                new.append(int(draw(p[i][D][None], _u(g, logits.device))[0]))
        out.append(new)
    return out


def _u(generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(1, generator=generator, dtype=torch.float64).to(device)
