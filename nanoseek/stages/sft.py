"""Supervised fine-tuning on chat data: loss on the assistant turns only, padding-free packing.

    nanoseek sft --model runs/tiny --data chat.jsonl --out runs/sft                 # 2 epochs
    nanoseek sft --model DIR --data traces.jsonl --val val.jsonl --out OUT --tokens 2e6 --lr 1e-4
    nanoseek sft --init-preset tiny --tokenizer TOK --data chat.jsonl --out OUT      # random weights
    nanoseek sft --out OUT --resume                                                   # continue exactly
    torchrun --nproc-per-node 2 -m nanoseek sft --model DIR --data chat.jsonl --out OUT --ep 2   # 2 ranks

Data: JSONL rows `{"messages": [...]}` encoded by `nanoseek.data.chat.encode_chat` with the model's
own chat template (the loss mask is True on assistant turns: reasoning_content, content and the
closing end-of-sentence). Invalid rows are errors naming FILE:LINE (--skip-bad-rows: counted and
reported instead); conversations longer than --seq-len + 1 tokens are dropped or cut (--too-long),
counted and named, never silently. Without --val, --val-fraction of the conversations (chosen by
the seed) is held out.

Batches: conversations are shuffled each epoch (seeded) and packed whole into rows of --seq-len
tokens; positions restart per conversation and attention never crosses one (`doc_ids`), so a packed
row computes exactly what the conversations would alone, with no padding between them (TRL's
"padding-free"). An optimizer step takes --batch-size rows (in micro-batches of --micro-batch);
the loss is the mean over the step's assistant tokens.

Recipe: AdamW (β 0.9/0.95, weight decay 0.1 on matrices), lr 2e-5 by default (a fine-tuning rate;
tiny models want ~1e-3), linear warm-up over --warmup of the steps then cosine to --min-lr-ratio,
gradient clip 1.0. The MTP modules keep training at a small weight (--mtp-lambda 0.1) so the
fine-tuned model still drafts for speculative decoding. The MoE balancing bias keeps moving at
--bias-gamma (aux-loss-free balancing on the new data), or stays as it is with --freeze-bias.
Budget: --epochs (default 2, R1's SFT) or --tokens (packed tokens, repeating the data as needed).

The run machinery is `nanoseek train`'s (nanoseek/train/run.py, state.py): one writer per --out,
SIGINT/SIGTERM finish the step and save, --resume continues bitwise exactly (on CPU) from
OUT/checkpoints/latest with the saved settings (the data files must be unchanged: their sha256 is
checked), non-finite steps are skipped and --max-nonfinite in a row stop the run. Writes
OUT/metrics.jsonl, OUT/checkpoints/ (HF layout: servable, evaluable, resumable), and at the end
OUT/summary.json, OUT/report.md and loss plots.

Under torchrun (nanoseek/parallel/, as `nanoseek train`): --batch-size stays the global batch (rows
per optimizer step over all ranks) and --micro-batch is per rank. Each step's rows are dealt to the
data-parallel ranks round-robin, and every rank divides its loss by the step's global count of
assistant tokens (times the rank count, which FSDP's gradient average takes back), so the update is
the one-process update; the row plan is a pure function of the data and the seed, so --resume is
exact at any world size. A rank left with fewer rows (a short last step) runs stand-in micro-batches
weighted 0, which keeps it in step with the others' collectives. Rank 0 prints and writes logs and
reports; checkpoints are sharded (DCP) and resume at any layout, one process included; the final one
is also exported in the HF layout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.cli import float_in, int_in
from nanoseek.data import DataError, Tokenizer
from nanoseek.data.chat import PackedBatch, pack, pack_rows, read_chat_jsonl
from nanoseek.device import DeviceError, resolve_device
from nanoseek.model import PRESETS, ConfigError, Transformer, preset
from nanoseek.model.args import ModelArgs, parse_overrides
from nanoseek.parallel import (agree, any_rank, build_mesh, check_layout, clip_grad_norm_, global_counts,
                               init_distributed, parallelize, quiet_other_ranks, shutdown, torchrun_world)
from nanoseek.parallel.checkpoint import (export_hf, full_optimizer_state, is_sharded, load_run_state,
                                         save_run_checkpoint)
from nanoseek.quant.training import adamw, to_fp8_training
from nanoseek.train.balance import max_vio
from nanoseek.train.loss import sft_evaluate, sft_loss
from nanoseek.train.metrics import JsonlLog, read_jsonl
from nanoseek.train.report import plot_run, write_report
from nanoseek.train.run import (Interrupts, RunError, StepLoop, apply_update, claim_run_dir, explicit_flags,
                               resume_args)
from nanoseek.train.sample import sample
from nanoseek.train.schedule import Schedule
from nanoseek.train.state import latest_checkpoint, read_trainer_state, save_checkpoint

# Flags a resumed run may take from its command line; the others come from the saved run.
FREE_ON_RESUME = {"out", "resume", "device", "eval_every", "save_every", "keep_last", "stop_at", "max_nonfinite",
                  "samples", "quiet", "dp_shard", "ep", "micro_batch"}  # layout and accumulation: rounding only


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs, report)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoints/latest with the saved settings")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", type=Path, help="nanoseek or HF DeepSeek checkpoint dir, or a training run dir")
    g.add_argument("--init-preset", choices=sorted(PRESETS), help="start from random weights of this preset")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --init-preset: override a ModelArgs field (JSON value), repeatable")
    g.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the model's; needed with --init-preset)")
    g.add_argument("--data", type=Path, help="chat JSONL for training")
    g.add_argument("--val", type=Path, help="chat JSONL for validation (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=float_in(0, 1, lo_open=True, hi_open=True), default=0.1, help="held-out share of --data without --val")
    g.add_argument("--too-long", choices=["drop", "truncate"], default="drop",
                   help="conversations longer than --seq-len + 1 tokens (counted and named either way)")
    g.add_argument("--skip-bad-rows", action="store_true", help="count invalid rows instead of stopping on one")
    g = p.add_argument_group("budget and batch")
    g.add_argument("--epochs", type=float_in(0, lo_open=True), help="passes over the data (default 2; fractions allowed)")
    g.add_argument("--tokens", type=float_in(1), help="packed training tokens instead of epochs")
    g.add_argument("--seq-len", type=int_in(2), default=1024, help="tokens per packed row (at most the model's context)")
    g.add_argument("--batch-size", type=int_in(1), default=8, help="packed rows per optimizer step")
    g.add_argument("--micro-batch", type=int_in(1), help="rows per forward pass on each rank (default: --batch-size / "
                   "world size)")
    g.add_argument("--stop-at", type=int_in(1), help="stop after this step with a checkpoint, as if interrupted")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=2e-5, help="peak learning rate")
    g.add_argument("--warmup", type=float_in(0, 1, hi_open=True), default=0.03, help="warm-up, as a fraction of the steps")
    g.add_argument("--min-lr-ratio", type=float_in(0, 1), default=0.1, help="the cosine ends at lr × this")
    g.add_argument("--weight-decay", type=float_in(0), default=0.1)
    g.add_argument("--beta1", type=float_in(0, 1, hi_open=True), default=0.9)
    g.add_argument("--beta2", type=float_in(0, 1, hi_open=True), default=0.95)
    g.add_argument("--grad-clip", type=float_in(0), default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--mtp-lambda", type=float_in(0), default=0.1, help="MTP loss weight (0: MTP modules not trained)")
    g.add_argument("--bias-gamma", type=float_in(0), default=1e-3, help="balancing-bias speed γ while fine-tuning")
    g.add_argument("--freeze-bias", action="store_true", help="keep the MoE balancing bias as it is (γ = 0)")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="data order, held-out split and --init-preset weights")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: fp32 on CPU, bf16 on GPU")
    g.add_argument("--precision", default="default", choices=["default", "fp8"],
                   help="fp8: FP8 GEMMs in the Linear layers and experts (V3 §3.3, nanoseek/quant/training.py)")
    g.add_argument("--adam-moments", default="fp32", choices=["fp32", "bf16"], help="dtype of AdamW's moments")
    g.add_argument("--eval-every", type=int_in(0), default=50, help="validation every N steps (0: start and end only)")
    g.add_argument("--save-every", type=int_in(0), default=0, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-last", type=int_in(0), default=2, help="checkpoints to keep (0: all)")
    g.add_argument("--max-nonfinite", type=int_in(1), default=10, help="stop after this many non-finite steps in a row")
    g.add_argument("--samples", type=int_in(0), default=2, help="validation prompts answered in the report")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("parallel layout (under torchrun; --dp-shard x --ep = world size)")
    g.add_argument("--dp-shard", type=int_in(1), help="FSDP2 degree of the routed experts (default: world size / --ep)")
    g.add_argument("--ep", type=int_in(1), default=1, help="expert parallelism: routed experts split over this many "
                   "ranks")
    return p


def check_args(a: argparse.Namespace) -> argparse.Namespace:
    """Checks between flags (after a resume merged them); RunError names the flag."""
    if not a.resume or a.data is not None:
        if a.data is None:
            raise RunError("--data is required (a chat JSONL file)")
        if (a.model is None) == (a.init_preset is None):
            raise RunError("give exactly one of --model DIR and --init-preset NAME")
        if a.init_preset and a.tokenizer is None:
            raise RunError("--init-preset needs --tokenizer DIR (the vocabulary the model is built for)")
    if a.epochs is not None and a.tokens is not None:
        raise RunError("give --epochs or --tokens, not both")
    if a.epochs is None and a.tokens is None:
        a.epochs = 2.0
    a.micro_batch = a.micro_batch or max(1, a.batch_size // torchrun_world()[1])  # per rank
    if a.batch_size % a.micro_batch:
        raise RunError(f"--batch-size {a.batch_size} must be a multiple of --micro-batch {a.micro_batch}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    rank, world, _ = torchrun_world()
    try:  # under torchrun, rank 0 holds the run directory for all ranks
        with claim_run_dir(a.out, "sft") if rank == 0 else contextlib.nullcontext(), Interrupts() as stop:
            return sft(a, explicit_flags(parser, argv), stop)
    except (DataError, ConfigError, CheckpointError, DeviceError, RunError, ValueError) as e:
        print(f"{f'[rank {rank}] ' if world > 1 else ''}nanoseek sft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek sft: interrupted; the newest checkpoint is "
              f"{latest_checkpoint(a.out / 'checkpoints') or 'none (nothing was saved)'}", file=sys.stderr)
        return 130
    finally:
        shutdown()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return h.hexdigest()


def load_start(a: argparse.Namespace, resume_from: Path | None, device: torch.device):
    """(model, tokenizer, tokenizer dir): the resumed checkpoint, the given one, or a fresh preset."""
    if resume_from is not None:  # a sharded checkpoint's weights are read after parallelize
        model = (Transformer(ModelArgs.from_json(resume_from / "config.json")).to(device) if is_sharded(resume_from)
                 else Transformer.from_pretrained(resume_from, dtype=torch.float32, device=device))
        return model, Tokenizer.from_dir(resume_from), resume_from
    if a.model is not None:
        model_dir = resolve_model_dir(a.model)
        candidates = [a.tokenizer] if a.tokenizer else [model_dir, model_dir / "tokenizer"]
        tok_dir = next((d for d in candidates if (Path(d) / "tokenizer.json").is_file()), None)
        if tok_dir is None:
            raise DataError(f"no tokenizer.json in {' or '.join(map(str, candidates))}; pass --tokenizer DIR")
        model = Transformer.from_pretrained(model_dir, dtype=torch.float32, device=device)
        tokenizer = Tokenizer.from_dir(tok_dir)
    else:
        tok_dir = a.tokenizer
        tokenizer = Tokenizer.from_dir(tok_dir)
        overrides = parse_overrides(a.overrides)
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("bos_token_id", tokenizer.bos_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_id)
        torch.manual_seed(a.seed)
        model = Transformer(preset(a.init_preset, **overrides)).to(device)
    if tokenizer.vocab_size > model.args.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                        f"{model.args.vocab_size}")
    return model, tokenizer, Path(tok_dir)


def plan_rows(convs: list, seq_len: int, batch_size: int, seed: int, epochs: float | None,
              tokens: float | None) -> list[list[int]]:
    """The whole run's packed rows in order: each epoch shuffles the conversations (seeded by
    seed and epoch) and packs them; a fractional last epoch or a token budget cuts the stream.
    A pure function of its inputs, so a resumed run rebuilds exactly the same stream."""
    lengths = [len(ids) for ids, _ in convs]
    if epochs is not None:
        want_rows = None
    else:
        want_rows = math.ceil(tokens / (batch_size * seq_len)) * batch_size
    stream: list[list[int]] = []
    epoch = 0
    while True:
        order = list(range(len(convs)))
        random.Random(f"sft:{seed}:{epoch}").shuffle(order)
        rows = [[order[i] for i in row] for row in pack_rows([lengths[i] for i in order], seq_len)]
        if epochs is not None and epoch + 1 > epochs:  # the fractional part of the last epoch
            stream += rows[: round(len(rows) * (epochs - epoch))]
            break
        stream += rows
        epoch += 1
        if (epochs is not None and epoch >= epochs) or (want_rows is not None and len(stream) >= want_rows):
            break
    return stream[:want_rows] if want_rows is not None else stream


def sft(a: argparse.Namespace, explicit: set[str], stop: Interrupts) -> int:
    t_start = time.perf_counter()
    ckpt_root = a.out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if a.resume else None
    state: dict = {}
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        # --stop-at and the layout belong to this launch: a run resumes at any world size
        a = resume_args(a, state["args"], explicit, FREE_ON_RESUME,
                        per_launch={"stop_at": None, "dp_shard": None, "ep": 1},
                        paths=("out", "model", "tokenizer", "data", "val"))
    elif a.resume and a.data is None:
        raise RunError(f"nothing to resume in {ckpt_root} (no checkpoint yet); pass --model/--data to start a run")
    elif (ckpt_root / "latest").exists():
        raise RunError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with --resume, or use "
                       f"another --out")
    a = check_args(a)

    d = init_distributed(str(resolve_device(a.device)))  # one process: no process group; torchrun: a GPU per rank
    device = d.device
    quiet_other_ranks(d)
    bf16 = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model, tokenizer, _ = load_start(a, resume_from, device)
    if a.precision == "fp8":  # from outside the model: the same parameters, FP8 GEMMs
        to_fp8_training(model)
    precision = "fp8" if a.precision == "fp8" else "bf16" if bf16 else "fp32"
    model.train()
    layout = check_layout(d.world_size, a.dp_shard, a.ep, 1, model.args, a.micro_batch, a.batch_size)
    if a.precision == "fp8" and layout.ep > 1:
        raise RunError("--precision fp8 does not combine with --ep yet: the expert-parallel experts run their own "
                       "grouped GEMMs (use --ep 1, or bf16)")
    # Checkpoints copy the tokenizer from a directory that holds nothing else (a model dir would
    # overwrite the new weights with the old ones).
    tok_dir = a.out / "tokenizer"
    if resume_from is None and d.is_main:
        tokenizer.save(tok_dir)
    if a.seq_len > model.args.max_position_embeddings:
        raise RunError(f"--seq-len {a.seq_len} exceeds the model's max_position_embeddings "
                       f"{model.args.max_position_embeddings}")

    # --- data: encode, hold out, plan every step's rows --------------------------------------------
    hashes = {"data": file_sha256(a.data)} | ({"val": file_sha256(a.val)} if a.val else {})
    if resume_from is not None and state.get("data_sha256") != hashes:
        raise RunError(f"the data changed since {resume_from} was saved (sha256 of --data/--val differ): an "
                       f"exact resume needs the same files")
    convs, skipped = read_chat_jsonl(a.data, tokenizer, a.seq_len + 1, a.too_long, a.skip_bad_rows)
    if skipped.summary() and d.is_main:  # (every rank reads the data: one report)
        print(skipped.summary(), file=sys.stderr)
    if a.val is not None:
        val, vskipped = read_chat_jsonl(a.val, tokenizer, a.seq_len + 1, a.too_long, a.skip_bad_rows)
        if vskipped.summary() and d.is_main:
            print(vskipped.summary(), file=sys.stderr)
    else:
        order = list(range(len(convs)))
        random.Random(f"sft-val:{a.seed}").shuffle(order)
        n_val = max(1, round(len(convs) * a.val_fraction)) if len(convs) > 1 else 0
        held = set(order[:n_val])
        val = [c for i, c in enumerate(convs) if i in held]
        convs = [c for i, c in enumerate(convs) if i not in held]
    if not convs or not val:
        raise DataError(f"{a.data}: {len(convs)} training and {len(val)} validation conversations left; need at "
                        f"least one of each")
    rows = plan_rows(convs, a.seq_len, a.batch_size, a.seed, a.epochs, a.tokens)
    if not rows:
        raise RunError(f"--epochs {a.epochs} is less than one packed row of the data")
    total_steps = math.ceil(len(rows) / a.batch_size)
    val_batches = [pack(val, a.seq_len, r) for r in _chunks(pack_rows([len(c[0]) for c in val], a.seq_len),
                                                           a.micro_batch)]
    # Warm-up then cosine, from the V3 schedule's pieces: progress counted in steps.
    sched = Schedule(total_tokens=total_steps, lr=a.lr, warmup_steps=max(1, round(a.warmup * total_steps)),
                     decay_start=0.0, decay_end=1.0, tail_switch=1.0, decay_ratio=a.min_lr_ratio,
                     tail_ratio=a.min_lr_ratio, batch_size=1, batch_start=1, micro_batch=1)
    gamma = 0.0 if a.freeze_bias else a.bias_gamma
    use_mtp = a.mtp_lambda > 0 and len(model.mtp) > 0
    if not use_mtp:
        for p in model.mtp.parameters():  # not in the loss: no gradient, no update, no weight decay
            p.requires_grad_(False)

    def trainable():
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    # A one-process checkpoint resumed under torchrun: its moments, read now into the plain model, are
    # sharded into the parallel optimizer below. Then FSDP2 / expert parallelism from outside the model.
    plain_state = None
    if resume_from is not None and d.enabled and not is_sharded(resume_from):
        plain_state = full_optimizer_state(resume_from, model, adamw(trainable(), a.lr, (a.beta1, a.beta2),
                                                                     a.weight_decay, a.adam_moments, fused=False))
    mesh = build_mesh(layout, d)
    dp, dp_rank = (mesh["dp"].size(), mesh["dp"].get_local_rank()) if mesh is not None else (1, 0)
    parallelize(model, mesh, bf16=bf16)
    named = trainable()
    optimizer = adamw(named, a.lr, (a.beta1, a.beta2), a.weight_decay, a.adam_moments, fused=not d.enabled)
    if plain_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, plain_state, options=StateDictOptions(full_state_dict=True))
    step, tokens, nonfinite, seconds_before = 0, 0, 0, 0.0
    log = JsonlLog(a.out / "metrics.jsonl", enabled=d.is_main)
    if resume_from is not None:
        state = load_run_state(resume_from, model, optimizer, moments_loaded=plain_state is not None)
        step, tokens, nonfinite, seconds_before = state["step"], state["tokens"], state["nonfinite"], state["seconds"]
        log.truncate_after(step)
        print(f"resumed from {resume_from} at step {step} of {total_steps}")
    else:
        log.truncate_after(-1)
    print(f"sft: {len(convs)} conversations ({sum(len(c[0]) for c in convs):,} tokens) -> {len(rows)} packed rows of "
          f"{a.seq_len} -> {total_steps} steps of {a.batch_size} rows; {len(val)} held out; "
          f"{model.num_params() / 1e6:.2f}M params on {device}")

    def run_eval() -> float:
        loss, n = sft_evaluate(model, val_batches, amp if bf16 else None)
        log.write({"kind": "val", "step": step, "tokens": tokens, "val_loss": loss, "val_tokens": n})
        return loss

    def checkpoint() -> Path:
        run_state = {"step": step, "tokens": tokens, "nonfinite": nonfinite, "total_steps": total_steps,
                     "seconds": seconds_before + train_seconds, "data_sha256": hashes,
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
        with stop.critical():
            if d.enabled:  # sharded: each rank writes its own part
                return save_run_checkpoint(ckpt_root, step, model, optimizer, model.args, run_state, tok_dir,
                                           a.keep_last)
            return save_checkpoint(ckpt_root, step, model, optimizer, run_state, tokenizer_dir=tok_dir,
                                   keep_last=a.keep_last)

    # --- the loop (as nanoseek train's: a signal finishes the step, then saves) ---------------------------
    first_val = run_eval() if step == 0 else None
    if first_val is not None:
        print(f"step 0: val loss {first_val:.4f} on assistant tokens")
    params = [p for _, p in named]
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=a.quiet or not d.is_main, dynamic_ncols=True,
               mininterval=1.0)
    train_seconds = 0.0
    loop = StepLoop("sft", a, stop, checkpoint, ckpt_root, bar, step, resume_from is not None,
                    together=lambda flag: any_rank(flag, d))
    with loop.running(rewind=lambda: optimizer.zero_grad(set_to_none=True)):
        while step < total_steps and not (stop.requested and not d.enabled):
            t0 = time.perf_counter()
            batch_rows = rows[step * a.batch_size:(step + 1) * a.batch_size]
            # this rank's rows (round-robin), in as many micro-batches as every other rank runs
            mine = _chunks(batch_rows[dp_rank::dp], a.micro_batch)
            n_micro = math.ceil(math.ceil(len(batch_rows) / dp) / a.micro_batch)
            micro = [pack(convs, a.seq_len, r) for r in mine + [batch_rows[:1]] * (n_micro - len(mine))]
            n_loss, n_data = agree([sum(b.loss_tokens for b in micro[:len(mine)]),  # conversation tokens,
                                    sum(int((b.doc_ids >= 0).sum()) for b in micro[:len(mine)])], d, "sum")
            n_loss, n_data = int(n_loss), int(n_data)                                # padding excluded
            lr = sched.lr_at(step, step)
            sums, counts = torch.zeros(2, device=device), None  # ce, mtp (summed over loss tokens)
            for i, b in enumerate(micro):
                b = b.to(device)
                with amp():  # each rank: its tokens over the global count, x dp (FSDP averages over ranks)
                    parts = sft_loss(model, b, a.mtp_lambda if use_mtp else 0.0, normalizer=max(n_loss, 1) / dp)
                if i >= len(mine):  # a stand-in: the collectives run, nothing counts
                    (parts.total * 0.0).backward()
                    counts = torch.zeros_like(parts.counts) if counts is None else counts
                    continue
                parts.total.backward()
                sums += torch.stack([parts.ce_sum, parts.mtp_sum]).float()
                counts = parts.counts if counts is None else counts + parts.counts
            if d.enabled:  # global norm over shards on different meshes; global sums and loads
                grad_norm = clip_grad_norm_(params, a.grad_clip)
                sums = torch.tensor(agree(sums.tolist(), d, "sum"), device=device)
                counts = global_counts(counts)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip or float("inf")).item()
            ce, mtp = (sums / max(n_loss, 1)).tolist()
            bad = not (math.isfinite(ce) and math.isfinite(mtp) and math.isfinite(grad_norm))
            with stop.critical():
                apply_update(optimizer, lr, not bad, model, counts, gamma)
                nonfinite += bad
                dt = time.perf_counter() - t0
                train_seconds += dt
                step, tokens = step + 1, tokens + len(batch_rows) * a.seq_len
                rec = {"kind": "train", "step": step, "tokens": tokens, "loss": ce,
                       "mtp_loss": mtp if use_mtp else None, "lr": lr, "loss_tokens": n_loss,
                       "data_tokens": n_data, "step_s": dt,
                       "grad_norm": grad_norm, "tok_per_s": len(batch_rows) * a.seq_len / dt, "skipped": bad,
                       "precision": precision}
                if counts is not None and len(counts):
                    rec["maxvio"] = max_vio(counts).tolist()
                    rec["load"] = (counts / counts.sum(-1, keepdim=True).clamp(min=1)).tolist()
                log.write(rec)
            bar.update(1)
            bar.set_postfix_str(f"loss {ce:.3f} lr {lr:.2e}", refresh=False)
            if loop.after_step(step, bad, step >= total_steps,
                               lambda: bar.write(f"step {step}: val loss {run_eval():.4f}"), lr):
                break
    code = loop.finish(step)
    if code is not None:
        return code
    if d.enabled and d.is_main:  # the sharded checkpoint also in the HF layout, for generate / serve / transformers
        export_hf(latest_checkpoint(ckpt_root), latest_checkpoint(ckpt_root))

    # --- final evaluation, samples, report ---------------------------------------------------------------
    final = run_eval()
    samples = show_samples(model, tokenizer, val, a.samples)  # every rank: FSDP/EP forwards
    if not d.is_main:
        return 0
    records = read_jsonl(log.path)
    first = next(r for r in records if r["kind"] == "val")
    seconds = seconds_before + train_seconds
    summary = {"start": str(a.model or f"random {a.init_preset}"), "steps": step, "tokens": tokens,
               "conversations": len(convs), "val_conversations": len(val), "skipped_rows": skipped.count,
               "truncated_rows": len(skipped.truncated), "initial_val_loss": first["val_loss"],
               "final_val_loss": final, "nonfinite_steps": nonfinite, "train_seconds": seconds,
               "tok_per_s": tokens / max(seconds, 1e-9), "checkpoint": str(latest_checkpoint(ckpt_root)),
               "precision": precision, "adam_moments": a.adam_moments}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["preset"] = f"SFT from {summary['start']}"
    summary["table"] = {
        "start": summary["start"], "data": f"{len(convs)} conversations, {len(val)} held out "
                                           f"({skipped.count} rows skipped, {len(skipped.truncated)} truncated)",
        "trained": f"{step} steps, {tokens / 1e6:.2f}M packed tokens in {seconds / 60:.1f} min",
        "throughput": f"{summary['tok_per_s']:,.0f} packed tokens/s",
        "validation loss (assistant tokens)": f"{first['val_loss']:.3f} -> {final:.3f} nats/token",
        "non-finite steps skipped": str(nonfinite), "checkpoint": summary["checkpoint"]}
    report = write_report(a.out, summary, plot_run(records, a.out), samples, title="nanoseek SFT run")
    print(f"done: {step} steps; val loss {first['val_loss']:.4f} -> {final:.4f} on assistant tokens; "
          f"{summary['tok_per_s']:,.0f} tok/s; report: {report}; elapsed {time.perf_counter() - t_start:.0f}s")
    return 0


def show_samples(model, tokenizer, val, n) -> list[tuple[str, str]]:
    """Greedy replies to the first user turns of a few held-out conversations."""
    out = []
    stop_ids = tuple(model.args.eos_token_ids)
    for ids, mask in val[:n]:
        prompt = ids[: mask.index(True)] if True in mask else ids
        reply = sample(model, prompt, 64, temperature=0, stop_ids=stop_ids)
        out.append((tokenizer.decode(prompt, skip_special_tokens=True)[-200:],
                    tokenizer.decode(reply, skip_special_tokens=True)))
    for prompt, reply in out:
        print(f"--- {prompt!r}\n{reply}")
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


if __name__ == "__main__":
    sys.exit(main())
