"""Prefill: write prompts into the latent cache and return the logits their first token is sampled from.

Prompts are prefilled in padded groups of similar length and at most `prefill_chunk` tokens
(padding writes positions past a prompt's end, which decoding overwrites before any query can see
them); a prompt longer than that is prefilled alone in chunks, which bounds memory. A prompt that
several requests of a group share (GRPO's G samples of a question) is computed once and its cache
rows copied (`Engine._prefill_shared`): 8 prompts x 8 samples prefill 8 rows, not 64. Prefill uses
the naive attention path (expand the chunk's latents to per-head K/V and run SDPA): for a
4096-token prompt it is several times cheaper than the absorbed path, which materialises
[heads, T, S] scores in the 512-dim latent space.

The first chunk of a group attends within itself (plain causal attention: SDPA's fused kernel with
is_causal, and nothing read back from the cache); a later chunk attends over the cached rows before
it under an explicit position mask, which SDPA runs on its unfused path on CPU (4096 tokens, one
layer: 1.1 s masked against 0.26 s causal, loaded 2-core machine). So the default chunk is as long
as memory allows (`default_chunk`): most prompts are one causal chunk.

A prompt prefilled alone in one chunk (a one-shot `generate`, a chat turn, a server's lone request)
goes through `whole_prompt`, which the decoder runs as an ahead-of-time compiled package (aot.py,
`Decoder.prefill`) once compiling is on: at 4,096 tokens the fused elementwise work (norms, RoPE,
SiLU, residuals: a third of eager prefill) makes it ~15% faster than eager, and loading the package
costs no tracing.
"""

from __future__ import annotations

import torch

from . import speculative as spec
from .request import Request, per_row

# Prefill groups may be padded up to this factor of their real token count.
PAD_SLACK = 1.25
# Default prefill chunk: one layer's expanded keys and values may take this much memory.
PREFILL_BYTES = 512 << 20


def default_chunk(args, dtype: torch.dtype) -> int:
    """Tokens per prefill forward when the engine is not told: as many as keep one layer's expanded
    K and V (heads × 2 × qk_head_dim values a token: v is padded to the q/k size for SDPA) within
    PREFILL_BYTES, and at least 2048 (DeepSeek-V3 in bf16: ~5,400 tokens; the tiny preset: any prompt)."""
    per_token = args.num_attention_heads * 2 * args.qk_head_dim * dtype.itemsize
    return max(2048, PREFILL_BYTES // per_token)


def groups(reqs: list[Request], budget: int) -> list[list[Request]]:
    """Split prompts into prefill groups of similar length (padding <= PAD_SLACK × real tokens) and
    at most `budget` padded tokens (a longer prompt is alone in its group and chunked in time).
    Requests with the same prompt are adjacent and share a group: the engine prefills it once for all."""
    out: list[list[Request]] = []
    for r in sorted(reqs, key=lambda r: (-len(r.prompt), r.prompt)):
        if out:
            group = out[-1]
            if group[-1].prompt == r.prompt:
                group.append(r)
                continue
            real = sum(len(x.prompt) for x in group) + len(r.prompt)
            padded = (len(group) + 1) * len(group[0].prompt)
            if padded <= PAD_SLACK * real and padded <= budget:
                group.append(r)
                continue
        out.append([r])
    return out


def whole_prompt(model, ids: torch.Tensor, cache: list, mtp_cache: list | None) -> torch.Tensor:
    """One prompt prefilled in one chunk (the path `Decoder.prefill` compiles ahead of time).

    ids [1, T + D + 1]: the prompt's T tokens then D + 1 spare ids (D = the model's MTP depth; the
    MTP modules read up to D tokens past a position); cache (and mtp_cache, or None): views
    [1, >= T, .] per layer, written at positions 0..T-1. Returns the main model's hidden states at
    the prompt's last W positions, [1, W, hidden]: W = D + 1 with the MTP caches (the first draft
    window, T-D-1 .. T-1), else 1; the last row gives the first token's logits.
    """
    D = len(model.mtp)
    T = ids.shape[1] - D - 1
    out = model.run(ids[:, :T], cache=cache, kv_len=T, absorbed=False, logits=False)
    if mtp_cache is None:
        return out.hidden[:, T - 1 :].clone()  # a copy: a view would keep all T rows alive
    spec.prefill_mtp(model, out.hidden, ids, 0, mtp_cache)
    return out.hidden[:, T - D - 1 :].clone()


def prefill_group(model, group: list[Request], cache: list, mtp_cache: list | None, prefill_chunk: int,
                  record_routing: bool = False, whole=None) -> torch.Tensor:
    """Write the group's prompts into `cache` (one [g, S, .] view per layer, row b = group[b]) and
    return logits [g, V] at each prompt's end.

    mtp_cache (speculative decoding; one view per MTP depth, or None): also fill the MTP caches and
    leave in each request's `hidden` the main hidden states of its first draft window
    (positions L-D-1 .. L-1). record_routing: each request's `routing` gets its prompt's MoE routing.
    whole: `whole_prompt` without its model argument (the decoder's, compiled where it pays): runs a
    lone prompt of more than D + 1 tokens that fits one chunk; None: `whole_prompt` itself.
    """
    g, D = len(group), len(model.mtp)
    device = model.embed_tokens.weight.device
    lens = [len(r.prompt) for r in group]
    L = max(lens)
    ids = torch.zeros(g, L + D + 1, dtype=torch.long)  # padded; D+1 spare for the MTP's shifted inputs
    for b, r in enumerate(group):
        ids[b, : lens[b]] = torch.tensor(r.prompt)
    ids = ids.to(device)
    mtp = mtp_cache is not None
    if g == 1 and D + 1 < L <= prefill_chunk and not record_routing:
        tail = whole(ids, cache, mtp_cache) if whole else whole_prompt(model, ids, cache, mtp_cache)  # [1, W, hidden]
        if mtp:
            group[0].hidden = tail[0]
        return model.lm_head(tail[:, -1])
    if mtp:  # the draft window of the first step: positions L_b-D-1 .. L_b-1
        want = spec.window(torch.tensor(lens), D).tolist()
        kept = [[None] * (D + 1) for _ in group]
    last = [None] * g
    chunks_routing = []
    # Chunks in time only for a prompt longer than prefill_chunk: each chunk re-expands the
    # latents cached before it, so fewer, longer chunks are cheaper.
    chunk = max(1, prefill_chunk // g)
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        # The first chunk attends within itself (positions=None: plain causal SDPA, no mask)
        positions = None if s == 0 else torch.arange(s, e, device=device).expand(g, e - s)
        out = model.run(ids[:, s:e], positions=positions, cache=cache, kv_len=e, absorbed=False, logits=False)
        if record_routing:
            chunks_routing.append(per_row(out.routing, g))
        for b, n in enumerate(lens):
            if s <= n - 1 < e:
                last[b] = out.hidden[b, n - 1 - s]
        if mtp:
            spec.prefill_mtp(model, out.hidden, ids, s, mtp_cache)
            for b in range(g):
                for j, p in enumerate(want[b]):
                    if s <= p < e:
                        kept[b][j] = out.hidden[b, p - s]
    if mtp:
        for b, r in enumerate(group):
            r.hidden = torch.stack(kept[b])
    if record_routing:
        for b, r in enumerate(group):
            r.routing = torch.cat([chunk[b] for chunk in chunks_routing])[: lens[b]]
    return model.lm_head(torch.stack(last))
