"""DeepSeek Sparse Attention benchmark: decode step time against context, sparse against dense.

    nanoseek bench dsa                                   # contexts 4K, 16K, 64K; transformers at 4K
    nanoseek bench dsa --contexts 4096,16384 --steps 4 --repeats 2 --no-hf
    nanoseek bench dsa --model runs/v32/checkpoints/latest

**Decode step time** at context S: one batch-1 decode step at position S over a cache holding S
tokens (filled with random latents and indexer keys: the step's cost does not depend on their
values), eager, fp32. The same weights run sparse (the indexer's top-k rows, gathered) and dense
(`set_sparse(model, False)`: every row), taking turns; each mode's best pass of --repeats counts
(interference on a shared machine only slows a pass down) and the range is printed. Sparse
attention reads index_topk rows, but the indexer still scores all S keys, so a sparse step grows
with S at the indexer's per-key cost instead of MLA's.

The default model is the `tiny-v32` preset with index_topk 2048 (V3.2's) and 32 attention heads,
so that a cached key costs the indexer ~1/20 of what it costs MLA, as at V3.2 size (4 heads × 32
dims against 32 heads × (48 scored + 32 read); V3.2: 64 × 128 FP8 against 128 × (576 + 512)). With
the preset's 4 heads the indexer's scan and top-k cost about as much as dense attention over the
whole context, and sparse decoding gains nothing at this size.

**transformers**: `DeepseekV32ForCausalLM.generate` on the same checkpoint at --hf-context (its
eager indexer materialises [T, T] masks and scores, so its prefill does not reach 16K here); the
decode step time comes from a logits processor's timestamps, prefill excluded.

**Cache bytes per token** (all layers): nanoseek's row [c_KV ; k_R ; indexer key] in the cache
dtype, with FP8 keys (index_head_dim + 4 bytes), the same model without DSA, and transformers'
DynamicCache after its run (latent, rope key and indexer keys it holds / sequence length).

**FP8 keys**: at --fp8-context, the share of each query's top-k that FP8 keys (Hadamard-rotated,
power-of-two scale) keep from the exact keys' top-k, and the largest logit change.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.bench.decode import cpu_pressure
from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.model import ConfigError, Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.model.indexer import key_cache_width, set_fp8_keys, set_sparse
from nanoseek.model.mla import MLA, _causal

BENCH_MODEL = dict(index_topk=2048, num_attention_heads=32, num_nextn_predict_layers=0)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek bench dsa", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a deepseek_v32 checkpoint (default: tiny-v32, random weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--contexts", default="4096,16384,65536", help="comma-separated context lengths")
    p.add_argument("--steps", type=int, default=8, help="decode steps per timed pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per mode (best counts)")
    p.add_argument("--hf-context", type=int, default=4096, help="context for transformers' generate")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--fp8-context", type=int, default=4096, help="context for the FP8-key selection check")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the rows as JSONL")
    a = p.parse_args(argv)
    try:
        a.contexts = [int(c) for c in a.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts must be comma-separated integers, got {a.contexts!r}")
    if min(a.contexts) < 1 or a.steps < 1 or a.repeats < 1 or a.hf_context < 16 or a.fp8_context < 16:
        p.error("--contexts, --steps, --repeats must be >= 1; --hf-context, --fp8-context >= 16")
    if a.model is not None:  # a model dir, or a run (RUN, RUN/checkpoints, the latest pointer)
        try:
            a.model = resolve_model_dir(a.model)
        except CheckpointError as e:
            p.error(f"--model {e}")
    return a


def build_model(a) -> Transformer:
    if a.model:
        model = Transformer.from_pretrained(a.model)
    else:
        need = max(a.contexts + [a.hf_context, a.fp8_context]) + a.steps + 8
        args = preset("tiny-v32", **{**BENCH_MODEL, "max_position_embeddings": need, **parse_overrides(a.overrides)})
        torch.manual_seed(a.seed)
        model = Transformer(args)
    if not model.args.dsa:
        raise ConfigError(f"{a.model}: model_type {model.args.model_type}, not deepseek_v32 (no indexer)")
    return model.eval()


@torch.inference_mode()
def decode_pass(model, cache, context: int, steps: int) -> float:
    """Seconds per decode step over `steps` steps starting at position `context`."""
    ids = torch.zeros(1, 1, dtype=torch.long)
    t0 = time.perf_counter()
    for i in range(steps):
        pos = torch.tensor([[context + i]])
        model.run(ids, positions=pos, cache=cache, kv_len=context + i + 1)
    return (time.perf_counter() - t0) / steps


def step_times(model, context: int, steps: int, repeats: int) -> dict:
    """{mode: (best, worst) ms per step} for sparse and dense, taking turns."""
    args = model.args
    width = args.kv_lora_rank + args.qk_rope_head_dim + key_cache_width(args, torch.float32)
    g = torch.Generator().manual_seed(context)
    cache = [torch.randn(1, context + steps + 1, width, generator=g) for _ in range(args.num_hidden_layers)]
    times: dict[str, list[float]] = {"sparse": [], "dense": []}
    for _ in range(repeats):
        for mode in times:
            set_sparse(model, mode == "sparse")
            times[mode].append(decode_pass(model, cache, context, steps) * 1e3)
    set_sparse(model, True)
    return {m: (min(t), max(t)) for m, t in times.items()}


def transformers_step(path: Path, context: int, steps: int, repeats: int, vocab: int):
    """(best, worst) ms per decode step of transformers' generate, and its cache bytes per token."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    ids = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(1))
    per_step, held = [], 0
    for _ in range(repeats):
        clock = Clock()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1,
                              min_new_tokens=steps + 1, do_sample=False, return_dict_in_generate=True,
                              logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
        per_step.append((clock.times[-1] - clock.times[0]) / steps * 1e3)
        tensors = [t for layer in out.past_key_values.layers
                   for t in (layer.keys, layer.values, getattr(layer, "indexer_keys", None)) if t is not None]
        held = sum(t.numel() * t.element_size() for t in tensors) / out.sequences.shape[1]
    return (min(per_step), max(per_step)), held


@torch.inference_mode()
def fp8_selection(model, context: int, seed: int) -> dict:
    """Mean share of the exact keys' top-k that FP8 keys keep (queries with more than k candidates),
    per the layers' real inputs, and the largest logit change of the uncached forward."""
    ids = torch.randint(3, model.args.vocab_size, (1, context), generator=torch.Generator().manual_seed(seed))
    overlaps: list[float] = []

    def hook(mla, args, kwargs, out):
        x, cos, sin = args[:3]
        idx = mla.indexer
        _, _, _, _, q_resid = mla.project(x, cos, sin)
        mask = _causal(x.shape[1], x.device)
        picks = []
        for fp8 in (False, True):
            idx.fp8_keys = fp8
            picks.append(idx.select(x, q_resid, cos, sin, idx.stored(idx.key(x, cos, sin)), mask))
        idx.fp8_keys = False
        rows = slice(idx.topk, None)  # queries that have more than k tokens to choose from
        overlaps.append(((picks[0] & picks[1])[:, rows].sum() / picks[0][:, rows].sum()).item())

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, MLA)]
    exact = model(ids)
    for h in handles:
        h.remove()
    set_fp8_keys(model, True)
    fp8 = model(ids)
    set_fp8_keys(model, False)
    return {"topk_overlap": sum(overlaps) / len(overlaps), "max_logit_change": (fp8 - exact).abs().max().item()}


def cache_bytes(args, dtype=torch.float32) -> dict:
    L, base = args.num_hidden_layers, args.kv_lora_rank + args.qk_rope_head_dim
    return {"dense_v3": L * base * dtype.itemsize,
            "v32": L * (base + key_cache_width(args, dtype)) * dtype.itemsize,
            "v32_fp8_keys": L * (base + key_cache_width(args, dtype, fp8=True)) * dtype.itemsize}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads > 0:  # one thread is the steadier figure on a machine other jobs keep busy
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    try:
        model = build_model(a)
    except (CheckpointError, ConfigError) as e:
        print(f"nanoseek bench dsa: error: {e}", file=sys.stderr)
        return 2
    args = model.args
    print(f"# bench dsa: {args.num_hidden_layers} layers, {args.num_attention_heads} heads, kv_lora_rank "
          f"{args.kv_lora_rank}, indexer {args.index_n_heads}x{args.index_head_dim}, index_topk {args.index_topk}; "
          f"{torch.get_num_threads()} threads; {cpu_pressure()}")
    rows = []
    print(f"{'context':>8} {'sparse ms/step':>20} {'dense ms/step':>20} {'dense/sparse':>12}")
    for S in a.contexts:
        t = step_times(model, S, a.steps, a.repeats)
        rows.append({"context": S, "sparse_ms": t["sparse"], "dense_ms": t["dense"]})
        print(f"{S:>8} {t['sparse'][0]:>9.2f} ({t['sparse'][1]:>7.2f}) {t['dense'][0]:>9.2f} ({t['dense'][1]:>7.2f})"
              f" {t['dense'][0] / t['sparse'][0]:>11.2f}x")
    sizes = cache_bytes(args)
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_hf:
            path = a.model or Path(tmp) / "model"
            if not a.model:
                model.save_pretrained(path)
            (best, worst), held = transformers_step(path, a.hf_context, a.steps, a.repeats, args.vocab_size)
            ours = step_times(model, a.hf_context, a.steps, a.repeats)["sparse"]
            rows.append({"transformers_context": a.hf_context, "transformers_ms": [best, worst],
                         "nanoseek_sparse_ms": ours, "transformers_cache_bytes": held})
            print(f"transformers generate @ {a.hf_context}: {best:.2f} ms/step (worst {worst:.2f}); "
                  f"nanoseek sparse {ours[0]:.2f} ms/step; transformers cache {held:.0f} B/token")
    print(f"cache bytes/token (fp32): dense V3 {sizes['dense_v3']}, V3.2 {sizes['v32']}, "
          f"V3.2 with FP8 keys {sizes['v32_fp8_keys']}")
    f8 = fp8_selection(model, a.fp8_context, a.seed)
    rows.append({"cache_bytes": sizes, "fp8_context": a.fp8_context, **f8})
    print(f"FP8 indexer keys @ {a.fp8_context}: top-k overlap with exact keys {f8['topk_overlap']:.3f}, "
          f"max logit change {f8['max_logit_change']:.2e}")
    print(f"# {cpu_pressure()}")
    if a.out:
        a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
