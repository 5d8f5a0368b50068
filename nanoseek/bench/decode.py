"""Decode benchmark: nanoseek's engine against transformers' `generate`, same checkpoint, same prompts.

    nanoseek bench decode                          # batch 1,16 × prompt 512,4096, 128 new tokens
    nanoseek bench decode --quick                  # batch 1, prompt 512, 32 new tokens
    nanoseek bench decode --preset small --batch-sizes 1 --repeats 1
    nanoseek bench decode --mtp-model runs/tiny/checkpoints/latest   # MTP acceptance on a trained head

Per (batch, prompt length) cell: **decode tokens/s** = batch × (new tokens - 1) / the time from
the first generated token to the last, so prefill is excluded the same way for both peers:
transformers' steps are timestamped by a logits processor (called once per forward), nanoseek's
by its own decode-step timer. The peers take turns, at least --repeats passes each (default 3)
and more while the cell has taken under --cell-seconds (default 30, at most 10 rounds), and each
peer's best pass counts: interference on a shared machine only ever slows a pass down, and taking
turns spreads a stretch of it over both (on the 2-core dev machine a tiny-model decode step
varied 2-3x from second to second). **Cache bytes per token**:
nanoseek's preallocated latent cache; the bytes transformers' DynamicCache holds after the run /
(batch × sequence length); and the formula num_layers × (kv_lora_rank + qk_rope_head_dim [+ index_head_dim]) × dtype
size. Both peers decode greedily in fp32 with EOS ignored, so every sequence makes every token;
`agree` is the share of generated tokens on which they picked the same id (random weights have
near-ties, so an early flip can make the rest of a sequence differ).

The peers' settings:
* nanoseek: one engine per cell sized to it; its decode step compiled (--no-compile: eager) when
  batch × experts per token <= routed experts, the MoE's compilable gathered path (the `ns` column
  says C or E); a short warm-up run at the same batch size compiles it before the timed runs.
* transformers: its fastest CPU settings measured here: SDPA attention, `grouped_mm` experts (its
  default), DynamicCache. In transformers 5 DeepSeek-V3's cache also holds the MLA latent, but
  each step re-expands every cached latent into per-head K and V. Its static cache with
  generate's CPU compilation ran at ~400 ms/step on the tiny preset (recompiling as it goes), so
  it is not used.

The default checkpoint is the `tiny` preset with random weights (the size this project trains
on 2 CPU cores), max_position_embeddings raised to fit the longest prompt; --preset small is the
8-layer, 117M-parameter size, where batch-1 decoding is bound by reading the weights from memory.

**Default settings end to end** (the `e2e` table): what a user gets calling
`Engine(model).generate(prompts, max_new_tokens=N)` with every default, timed from the call to
its return (prefill included), against `transformers`' `generate` timed the same way, on two
shapes (--e2e-shapes: `tiny`, and `wide` = tiny with hidden 256 and 16 experts), N in
--e2e-new-tokens (64, 128). The default engine is a fresh one per cell, as a new user's, made
after the `compiled` column's engine (compile=True, warmed up: a server, or a long session once
the automatic mode has switched; plain decoding) has filled the disk cache, so it sees what a
second start sees (with warm batch-1 packages it compiles from its first step); its first call
is shown apart (`first`). Per shape it also prints what compiling cost in this process and the
break-even: the new tokens at batch 1 after which compiling has paid for itself.

Under torchrun (`torchrun --nproc-per-node N -m nanoseek bench decode ...`) the one table is
decoding on N ranks, with each rank's memory (bench/ranks.py); `--tables ranks` is the same table
on one rank.

MTP speculative decoding is measured at batch 1 against plain decoding of the same prompt:
acceptance rate, tokens per step, decode tokens/s, the cost of one speculative step as a multiple
of a plain step, and speculative="auto" (the default for an MTP checkpoint) against plain. On the random checkpoint the MTP head is
untrained (acceptance ~0); --mtp-model names a trained checkpoint (given a tokenizer, its prompt is
the start of Python's argparse.py, the kind of text the tiny run trains on).

Figures are from one process on a possibly shared machine: the header and footer print the CPU
pressure (/proc/pressure/cpu), and two threads on two busy cores can be many times slower. The
header also shows OMP_WAIT_POLICY when set: PASSIVE makes tiny-model decoding ~4x slower (each
small op wakes a sleeping thread).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.bench import ranks
from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.inference import Engine
from nanoseek.inference.distributed import rank0_output
from nanoseek.model import Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.model.indexer import key_cache_width
from nanoseek.parallel.env import torchrun_world


def parse_args(argv):
    p = argparse.ArgumentParser(prog="nanoseek bench decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a saved checkpoint (default: a random --preset one)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-lens", default="512,4096")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed passes per peer and cell (taking turns); the best counts")
    p.add_argument("--cell-seconds", type=float, default=30.0,
                   help="keep taking turns (up to 10 rounds) while a cell's rounds took less than this")
    p.add_argument("--peers", default="nanoseek,transformers")
    p.add_argument("--tables", default="decode,e2e,speculative",
                   help="which tables: decode (decode-only tok/s), e2e (default settings end to end), speculative; "
                        "or ranks alone (1 rank here, N under torchrun, where it is the only table: bench/ranks.py)")
    p.add_argument("--e2e-shapes", default="tiny,wide", help=f"shapes of the e2e table ({', '.join(SHAPES)})")
    p.add_argument("--e2e-new-tokens", default="64,128")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile nanoseek's decode step (default on; --no-compile: eager)")
    p.add_argument("--mtp-model", type=Path, help="checkpoint with a trained MTP head for the speculative rows")
    p.add_argument("--mtp-prompt-len", type=int, default=512)
    p.add_argument("--no-speculative", action="store_true", help="skip the MTP rows")
    p.add_argument("--quick", action="store_true", help="batch 1, prompt 512, 32 new tokens, 1 repeat")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the rows as JSONL here")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.new_tokens < 2:
        p.error("--repeats must be at least 1 and --new-tokens at least 2")
    if a.quick:
        a.batch_sizes, a.prompt_lens, a.new_tokens, a.repeats, a.cell_seconds = "1", "512", 32, 1, 0.0
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",")]
    a.prompt_lens = [int(x) for x in a.prompt_lens.split(",")]
    a.peers = a.peers.split(",")
    for flag in ("model", "mtp_model"):  # a model dir, or a run (RUN, RUN/checkpoints, the latest pointer)
        if getattr(a, flag) is not None:
            try:
                setattr(a, flag, resolve_model_dir(getattr(a, flag)))
            except CheckpointError as e:
                p.error(f"--{flag.replace('_', '-')} {e}")
    a.tables = a.tables.split(",")
    a.e2e_shapes = a.e2e_shapes.split(",")
    a.e2e_new_tokens = [int(x) for x in a.e2e_new_tokens.split(",")]
    if torchrun_world()[1] > 1:
        a.tables = ["ranks"]
    if "ranks" in a.tables and len(a.tables) > 1:
        p.error("--tables ranks is a table of its own (launch it with and without torchrun)")
    unknown = [t for t in a.tables if t not in ("decode", "e2e", "speculative", "ranks")] + [
        s for s in a.e2e_shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown table or shape: {', '.join(unknown)}")
    return a


# The e2e table's model shapes: the tiny preset, and a wider one (hidden 256, 16 experts).
SHAPES = {"tiny": {}, "wide": {"hidden_size": 256, "n_routed_experts": 16}}


def checkpoint(a, workdir: Path) -> Path:
    """The benchmark checkpoint's directory (written from --preset unless --model)."""
    if a.model:
        return a.model
    need = max(a.prompt_lens + [a.mtp_prompt_len]) + a.new_tokens + 8
    args = preset(a.preset, **{"torch_dtype": "float32", **parse_overrides(a.overrides)})
    if args.max_position_embeddings < need:
        args = args.replace(max_position_embeddings=need)
    torch.manual_seed(a.seed)
    path = workdir / "model"
    Transformer(args).save_pretrained(path)
    return path


def prompts_for(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + 1000 * batch + length)
    return torch.randint(3, vocab, (batch, length), generator=g).tolist()


# --- peers ---------------------------------------------------------------------------------------
# Each peer is set up once per cell (loaded, warmed up, compiled) and returns a `run()` that makes
# one timed pass; `best_of` alternates the peers' passes, so a stretch of interference on a shared
# machine hits both rather than one.
def nanoseek_peer(model, prompts, new_tokens: int, compile=True, speculative=(None,)):
    """One engine sized for this cell; a short warm-up per speculative mode at the same batch size
    compiles the step (the cache length is static, so the graph is reused by the timed runs).
    Returns run(mode) -> dict for each mode in `speculative` (None: plain decoding)."""
    # Each engine compiles its own graph (its own static cache length); dropping the previous
    # cells' graphs keeps Dynamo's guard checks per step as short as in a fresh process.
    torch._dynamo.reset()
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=len(prompts[0]) + new_tokens, compile=compile,
                    speculative=None)
    for mode in speculative:
        engine.generate([p[:16] for p in prompts], max_new_tokens=4, ignore_eos=True,
                        speculative="mtp" if mode == "auto" else mode)

    def run(mode=None) -> dict:
        outs = engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True, speculative=mode)
        s = engine.stats
        verdict = engine.auto.summary().get(1, {}).get("speculating") if mode == "auto" else None
        return dict(decode_tok_s=s["decode_tokens_per_s"], prefill_s=s["prefill_s"], tokens=outs,
                    cache_bytes=engine.cache_bytes_per_token, acceptance=s.get("acceptance_rate"),
                    tokens_per_step=s["tokens_per_row_step"], step_s=s["decode_s"] / max(s["decode_steps"], 1),
                    auto=verdict)
    return run


def best_of(runs: dict, repeats: int, seconds: float = 0.0, max_rounds: int = 10, key: str = "decode_tok_s") -> dict:
    """runs {name: run()}: rounds that run every peer once, at least `repeats` of them and more
    (up to `max_rounds`) while the rounds so far took under `seconds`; the best pass (highest
    `key`, decode tokens/s by default) of each peer counts, since interference only ever slows a
    pass down. Each peer's first pass is kept as r["first"]."""
    best: dict = {}
    t0, rounds = time.perf_counter(), 0
    while rounds < repeats or (rounds < max_rounds and time.perf_counter() - t0 < seconds):
        for name, run in runs.items():
            r = run()
            r["first"] = best[name]["first"] if name in best else r[key]
            if name not in best or r[key] > best[name][key]:
                best[name] = r
        rounds += 1
    for r in best.values():
        r["rounds"] = rounds
    return best


def load_transformers(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def transformers_peer(hf, prompts, new_tokens: int):
    """transformers' `generate`, warmed up; returns run() -> dict (one timed pass)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(ids, n, clock):
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, logits_processor=LogitsProcessorList([clock]),
                           return_dict_in_generate=True, pad_token_id=0)

    ids = torch.tensor(prompts)
    B, P = ids.shape
    with torch.inference_mode():
        generate(ids[:, :16], 4, StepClock())  # warm-up

    def run() -> dict:
        clock = StepClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = generate(ids, new_tokens, clock)
        cache = out.past_key_values
        held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        return dict(decode_tok_s=B * (new_tokens - 1) / (clock.times[-1] - clock.times[0]),
                    prefill_s=clock.times[0] - t0, seconds=time.perf_counter() - t0, tokens=out.sequences[:, P:].tolist(),
                    cache_bytes=held / (B * cache.layers[0].keys.shape[-2]))
    return run


# --- the run -------------------------------------------------------------------------------------
def cpu_pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().split("\n")[0].split()[1]  # "avg10=.."
    except (OSError, IndexError):
        return "n/a"


def _f(x, suffix="", d=1) -> str:
    return "-" if x is None else f"{x:.{d}f}{suffix}"


def decode_table(a, model, hf, formula: int) -> list[dict]:
    header = (f"{'batch':>5} {'prompt':>6} {'ns':>2} | {'nanoseek tok/s':>14} {'transformers tok/s':>18} {'speed-up':>8} | "
              f"{'cache B/tok ns':>14} {'hf':>6} {'formula':>7} | {'agree':>5} | {'prefill s ns/hf':>15} | {'passes':>6}")
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    for P in a.prompt_lens:
        for B in a.batch_sizes:
            prompts = prompts_for(model.args.vocab_size, B, P, a.seed)
            runs = {}
            if "nanoseek" in a.peers:
                runs["nanoseek"] = nanoseek_peer(model, prompts, a.new_tokens, compile=a.compile)
            if hf is not None:
                runs["transformers"] = transformers_peer(hf, prompts, a.new_tokens)
            best = best_of(runs, a.repeats, a.cell_seconds)
            ns, tf = best.get("nanoseek"), best.get("transformers")
            agree = None
            if ns and tf:
                pairs = [(x, y) for s, t in zip(ns["tokens"], tf["tokens"]) for x, y in zip(s, t)]
                agree = sum(x == y for x, y in pairs) / len(pairs)
            get = lambda peer, key: peer[key] if peer else None  # noqa: E731
            row = dict(batch=B, prompt=P, new_tokens=a.new_tokens, nanoseek_tok_s=get(ns, "decode_tok_s"),
                       transformers_tok_s=get(tf, "decode_tok_s"),
                       speedup=ns["decode_tok_s"] / tf["decode_tok_s"] if ns and tf else None,
                       nanoseek_cache_bytes=get(ns, "cache_bytes"), transformers_cache_bytes=get(tf, "cache_bytes"),
                       formula_cache_bytes=formula, agree=agree, nanoseek_prefill_s=get(ns, "prefill_s"),
                       transformers_prefill_s=get(tf, "prefill_s"), passes=get(ns or tf, "rounds"))
            row["nanoseek_compiled"] = a.compile and B * model.args.num_experts_per_tok <= model.args.n_routed_experts
            rows.append(row)
            print(f"{B:>5} {P:>6} {'C' if row['nanoseek_compiled'] else 'E':>2} | "
                  f"{_f(row['nanoseek_tok_s']):>14} {_f(row['transformers_tok_s']):>18} "
                  f"{_f(row['speedup'], 'x'):>8} | {_f(row['nanoseek_cache_bytes'], d=0):>14} "
                  f"{_f(row['transformers_cache_bytes'], d=0):>6} {formula:>7} | {_f(agree, d=2):>5} | "
                  f"{_f(row['nanoseek_prefill_s']) + '/' + _f(row['transformers_prefill_s']):>15} | {row['passes']:>6}", flush=True)
    return rows


def e2e_table(a, workdir: Path) -> list[dict]:
    """Default settings end to end (see the module docstring), per shape, batch, prompt and N."""
    from torch._dynamo.utils import counters

    rows = []
    for shape in a.e2e_shapes:
        need = max(a.prompt_lens) + max(a.e2e_new_tokens) + 8
        args = preset("tiny", **{"torch_dtype": "float32", "max_position_embeddings": need, **SHAPES[shape],
                                 **parse_overrides(a.overrides)})
        torch.manual_seed(a.seed)
        path = workdir / f"e2e-{shape}"
        Transformer(args).save_pretrained(path)
        model = Transformer.from_pretrained(path)
        hf = load_transformers(path) if "transformers" in a.peers else None
        print(f"\ndefault settings end to end, shape {shape} (hidden {args.hidden_size}, {args.n_routed_experts} "
              f"experts, {model.num_params() / 1e6:.1f}M params): seconds per generate call, best of >= {a.repeats} "
              f"passes; speed-up = transformers s / nanoseek default s", flush=True)
        header = (f"{'batch':>5} {'prompt':>6} {'new':>4} | {'default s':>9} {'first s':>8} {'mode':>5} | "
                  f"{'compiled s':>10} | {'transformers s':>14} | {'speed-up':>8} {'compiled':>8}")
        print(header + "\n" + "-" * len(header), flush=True)
        compile_note = None
        for B in a.batch_sizes:
            for P in a.prompt_lens:
                for N in a.e2e_new_tokens:
                    torch._dynamo.reset()
                    prompts = prompts_for(args.vocab_size, B, P, a.seed)
                    misses = counters["inductor"]["fxgraph_cache_miss"]
                    compiled = None
                    if a.compile:  # --no-compile: no compiled column
                        compiled = Engine(model, max_batch_size=B, max_seq_len=P + N, compile=True, speculative=None)
                        packaged = compiled.steps.warm  # batch-1 packages on disk before the warm-up
                        compiled.warmup()
                    if compile_note is None and compiled is not None and compiled.stats["compiled"]:
                        cold = counters["inductor"]["fxgraph_cache_miss"] > misses or (B == 1 and not packaged)
                        compile_note = (compiled.steps.compile_s, cold)
                    # made after the compiled engine's warm-up: the disk cache is warm, as on a second start
                    default = Engine(model, max_batch_size=B, max_seq_len=P + N)

                    def timed(engine, B=B, prompts=prompts, N=N):
                        t0 = time.perf_counter()
                        engine.generate(prompts, max_new_tokens=N, ignore_eos=True)
                        s = time.perf_counter() - t0
                        st = engine.stats
                        return dict(tok_s=B * N / s, seconds=s, compiled=st["compiled"],
                                    step_s=st["decode_s"] / max(st["decode_steps"], 1))

                    runs = {"default": lambda: timed(default)}
                    if compiled is not None:
                        runs["compiled"] = lambda: timed(compiled)
                    if hf is not None:
                        tf = transformers_peer(hf, prompts, N)
                        runs["transformers"] = lambda tf=tf: (lambda r: dict(r, tok_s=B * N / r["seconds"]))(tf())
                    best = best_of(runs, a.repeats, a.cell_seconds, key="tok_s")
                    d, c, t = best["default"], best.get("compiled"), best.get("transformers")
                    row = dict(table="e2e", shape=shape, batch=B, prompt=P, new_tokens=N, default_s=d["seconds"],
                               default_first_s=B * N / d["first"], default_compiled=d["compiled"],
                               compiled_s=c["seconds"] if c else None, transformers_s=t["seconds"] if t else None,
                               speedup=t["seconds"] / d["seconds"] if t else None,
                               speedup_compiled=t["seconds"] / c["seconds"] if t and c else None,
                               default_step_s=d["step_s"], compiled_step_s=c["step_s"] if c else None,
                               passes=d["rounds"])
                    rows.append(row)
                    print(f"{B:>5} {P:>6} {N:>4} | {row['default_s']:>9.3f} {row['default_first_s']:>8.3f} "
                          f"{'C' if d['compiled'] else 'E':>5} | {_f(row['compiled_s'], d=3):>10} | "
                          f"{_f(row['transformers_s'], d=3):>14} | {_f(row['speedup'], 'x', 2):>8} "
                          f"{_f(row['speedup_compiled'], 'x', 2):>8}", flush=True)
        one = [r for r in rows if r["shape"] == shape and r["batch"] == 1]
        if compile_note and one:
            r = min(one, key=lambda r: r["prompt"])
            eager_step = r["default_step_s"]
            if r["default_compiled"]:  # the default compiled from its first step: time an eager engine too
                eager = Engine(model, max_batch_size=1, max_seq_len=r["prompt"] + r["new_tokens"], compile=False,
                               speculative=None)
                prompt = prompts_for(args.vocab_size, 1, r["prompt"], a.seed)
                steps = []
                for _ in range(max(2, a.repeats)):
                    eager.generate(prompt, max_new_tokens=r["new_tokens"], ignore_eos=True)
                    steps.append(eager.stats["decode_s"] / max(eager.stats["decode_steps"], 1))
                eager_step = min(steps)
            saving = eager_step - r["compiled_step_s"]
            even = f"{compile_note[0] / saving:,.0f} new tokens" if saving > 0 else "n/a"
            print(f"compiling ({'cold' if compile_note[1] else 'warm disk cache'}): {compile_note[0]:.1f} s; "
                  f"eager {1e3 * eager_step:.2f} ms vs compiled {1e3 * r['compiled_step_s']:.2f} ms per "
                  f"step at batch 1, prompt {r['prompt']}: break-even {even}", flush=True)
            rows.append(dict(table="break-even", shape=shape, compile_s=compile_note[0], cold=compile_note[1],
                             eager_step_s=eager_step, compiled_step_s=r["compiled_step_s"]))
    return rows


def speculative_table(a, model) -> list[dict]:
    print(f"\nMTP speculative decoding vs plain, batch 1, {a.new_tokens} new tokens", flush=True)
    targets = [("random checkpoint (untrained MTP head)", model, None)]
    if a.mtp_model:
        targets.append((f"{a.mtp_model} (trained)", Transformer.from_pretrained(a.mtp_model), a.mtp_model))
    rows = []
    for name, m, path in targets:
        if not len(m.mtp):
            print(f"  {name}: no MTP modules")
            continue
        prompts = _mtp_prompt(a, m, path)
        run = nanoseek_peer(m, prompts, a.new_tokens, compile=a.compile, speculative=(None, "mtp", "auto"))
        best = best_of({"plain": run, "mtp": lambda: run("mtp"), "auto": lambda: run("auto")},
                       a.repeats, a.cell_seconds)
        plain, fast, auto = best["plain"], best["mtp"], best["auto"]
        row = dict(checkpoint=name, prompt=len(prompts[0]), plain_tok_s=plain["decode_tok_s"],
                   mtp_tok_s=fast["decode_tok_s"], acceptance=fast["acceptance"],
                   tokens_per_step=fast["tokens_per_step"], speedup=fast["decode_tok_s"] / plain["decode_tok_s"],
                   step_cost=fast["step_s"] / plain["step_s"], auto_tok_s=auto["decode_tok_s"],
                   auto_speedup=auto["decode_tok_s"] / plain["decode_tok_s"], auto_verdict=auto["auto"],
                   identical=plain["tokens"] == fast["tokens"] == auto["tokens"])
        rows.append(row)
        print(f"  {name}, prompt {row['prompt']}: acceptance {row['acceptance']:.1%}, "
              f"{row['tokens_per_step']:.2f} tokens/step, a speculative step costs {row['step_cost']:.2f}x a plain one; "
              f"{row['plain_tok_s']:.1f} -> {row['mtp_tok_s']:.1f} tok/s ({row['speedup']:.2f}x); "
              f"auto {row['auto_tok_s']:.1f} tok/s ({row['auto_speedup']:.2f}x plain, verdict {row['auto_verdict']}); "
              f"best of {plain['rounds']} passes each; greedy output identical: {row['identical']}", flush=True)
    return rows


def _mtp_prompt(a, model, path: Path | None) -> list[list[int]]:
    """The start of Python's argparse.py when the checkpoint has a tokenizer, else random ids."""
    length = min(a.mtp_prompt_len, model.args.max_position_embeddings - a.new_tokens)
    if path is not None and (path / "tokenizer.json").is_file():
        from nanoseek.data import Tokenizer

        ids = Tokenizer.from_dir(path).encode(Path(argparse.__file__).read_text(), add_bos=True)
        return [ids[:length]]
    return prompts_for(model.args.vocab_size, 1, length, a.seed)


def main(argv: list[str] | None = None) -> int:
    with rank0_output():
        a = parse_args(argv)
    if a.tables == ["ranks"]:
        return ranks.main(a, cpu_pressure)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(a, Path(tmp))
        model = Transformer.from_pretrained(path)
        args = model.args
        dtype = model.embed_tokens.weight.dtype  # + the V3.2 indexer's key in each row (deepseek_v32)
        formula = args.num_hidden_layers * (args.kv_lora_rank + args.qk_rope_head_dim + key_cache_width(args, dtype)) \
            * dtype.itemsize
        hf = load_transformers(path) if "transformers" in a.peers else None
        print(f"checkpoint: {a.model or ('random ' + a.preset)} | {model.num_params() / 1e6:.1f}M params "
              f"({model.num_params(active=True) / 1e6:.1f}M active), {args.num_hidden_layers} layers, "
              f"vocab {args.vocab_size} | fp32, {torch.get_num_threads()} threads | {a.new_tokens} new tokens, "
              f"best of >= {a.repeats} passes | nanoseek {'compiled' if a.compile else 'eager'} | cpu pressure {cpu_pressure()}"
              f"{' | OMP_WAIT_POLICY=' + os.environ['OMP_WAIT_POLICY'] if 'OMP_WAIT_POLICY' in os.environ else ''}",
              flush=True)
        if "decode" in a.tables:
            rows += decode_table(a, model, hf, formula)
        if "e2e" in a.tables and "nanoseek" in a.peers:
            rows += e2e_table(a, Path(tmp))
        if "speculative" in a.tables and not a.no_speculative and "nanoseek" in a.peers:
            rows += speculative_table(a, model)
    print(f"cpu pressure at the end: {cpu_pressure()}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
