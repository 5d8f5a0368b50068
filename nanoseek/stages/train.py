"""Pre-train a DeepSeek-V3-style model: next-token + MTP loss, balanced MoE, exact resume.

    nanoseek train --data runs/tiny/data --out runs/tiny --preset tiny --max-minutes 10
    nanoseek train --data DATA --out OUT --preset tiny --steps 300 --set num_hidden_layers=2
    nanoseek train --data DATA --out OUT --resume            # continue OUT/checkpoints/latest exactly
    nanoseek train --data DATA --out OUT2 --resume-from OUT --extend-context 1024 --steps 50   # YaRN stage
    nanoseek train --data DATA --out OUT3 --resume-from OUT --dsa-warmup --steps 50 --lr 1e-3  # V3.2 stage 1
    torchrun --nproc-per-node 4 -m nanoseek train --data DATA --out OUT --steps 300 --ep 2   # EP=2 x FSDP=2
    torchrun --nproc-per-node 2 -m nanoseek train --data DATA --out OUT --steps 300 --pp 2   # 2 pipeline stages
    python -m nanoseek.stages.train --help

The recipe is DeepSeek-V3's (report §4.2), scaled by flags to small runs: AdamW (β 0.9/0.95,
weight decay 0.1), gradient-norm clip 1.0, the V3 learning-rate shape (warm-up, constant, cosine,
two flat tails) and batch-size ramp as fractions of the token budget (nanoseek/train/schedule.py),
MTP weight λ 0.3 then 0.1, aux-loss-free balancing (bias speed γ, frozen for the last 3% of
tokens) plus a tiny sequence-wise balance loss (nanoseek/train/balance.py). The defaults are the
tiny run's numbers; V3's own are in each flag's help.

The budget is --tokens, --steps (steps × batch × seq_len tokens) or --max-minutes alone: then a
few timed forward/backward passes on random tokens, before training, turn the minutes into a
token budget, re-planned at 20/35/50/65% of the time from the throughput actually reached (only
while the learning rate is on its plateau, so the curve keeps its shape; a busy machine would
otherwise hit the time limit before the decay). Token and step budgets are fixed from step 0 and
saved, so --resume is exact.

Writes OUT/metrics.jsonl (one line per optimizer step and per validation), OUT/checkpoints/
(HF layout + trainer_state/, see nanoseek/train/state.py), and at the end OUT/summary.json,
OUT/report.md and PNG plots.

Design choices:
- fp32 on CPU (bf16 matmuls are two orders of magnitude slower there); bf16 autocast on GPU with
  fp32 master weights, fp32 losses and an fp32 balancing bias.
- --precision fp8: V3's FP8 mixed precision (report §3.3; nanoseek/quant/training.py), applied to
  the built model from outside: every Linear of attention and the FFNs and the routed experts run
  their three GEMMs on E4M3 operands (1x128 activation tiles, 128x128 weight blocks); embedding,
  head, gate, norms and the attention core keep --dtype. Checkpoints stay the ordinary fp32 HF
  layout. --adam-moments bf16 keeps AdamW's moments in BF16 (§3.3.3).
- A step whose loss or gradient norm is not finite is skipped (no update, no bias move) and
  counted; --max-nonfinite in a row stop the run without saving, so the last good checkpoint stays.
- --resume restores the saved run's settings (schedule, batch, balancing, seed, cadences, retention)
  from trainer_state; a flag typed with --resume is honoured only when it cannot change the numbers
  (device, cadences, retention, time limits), and is an error otherwise. On CPU the resumed loss
  sequence is bitwise identical.
- Later stages start a new run from a checkpoint's weights (--resume-from; not its optimizer or
  schedule). --extend-context N is V3's YaRN stage (§4.3): rope_scaling for N positions
  (nanoseek/model/rope.py: extend_context), trained on N-token windows of the corpus. DeepSeek-V3.2's
  two DSA stages (nanoseek/train/dsa.py): --dsa-warmup freezes the main model, attends densely and
  trains only the lightning indexers, by KL to the main attention summed over heads (a deepseek_v3
  checkpoint gets fresh indexers: a deepseek_v32 model, as V3.2 grew from V3.1); any other
  deepseek_v32 run is the sparse stage: the indexer's selection in the forward, its KL on the
  selected tokens on its own graph. Both log the indexer KL and the kept attention mass (the share
  of the dense attention the top-k keeps).
- One process per run directory (a lock on OUT/.lock); Ctrl-C / SIGTERM finish the step, save it
  and exit 130 / 143 (nanoseek/train/run.py).
- Under torchrun (nanoseek/parallel/): --batch-size stays the global batch and --micro-batch is per
  rank, so the same command is the same run at any world size; the layout (--pp x --dp-shard x --ep,
  checked against the world size) is applied from outside the model by `parallelize` (FSDP2,
  expert parallelism) and `build_pipeline` (stages, torch's 1F1B or DualPipeV schedule; evaluation
  forward-only through the stages; samples from the exported checkpoint on rank 0); rank 0 alone
  prints and writes logs and reports; checkpoints are sharded
  (torch.distributed.checkpoint, each rank writes its shards) and --resume reads them at any world
  size or layout, one process included; the final checkpoint is also exported in the HF layout.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.cli import float_in, int_in
from nanoseek.data import BatchLoader, DataError, Tokenizer, TokenShards, eval_batches
from nanoseek.device import DeviceError, resolve_device
from nanoseek.model import PRESETS, ConfigError, Transformer, preset
from nanoseek.model.args import ModelArgs, parse_overrides
from nanoseek.model.indexer import set_sparse
from nanoseek.model.rope import extend_context
from nanoseek.parallel import (agree, any_rank, build_mesh, check_layout, clip_grad_norm_, global_counts,
                               init_distributed, parallelize, quiet_other_ranks, shutdown, torchrun_world)
from nanoseek.parallel.checkpoint import (export_hf, full_optimizer_state, is_sharded, load_run_state,
                                         save_run_checkpoint)
from nanoseek.parallel.pipeline import SCHEDULES, build_pipeline
from nanoseek.parallel.step import mean_over_ranks
from nanoseek.quant.training import adamw, to_fp8_training
from nanoseek.train import schedule as V3
from nanoseek.train.balance import max_vio
from nanoseek.train.dsa import IndexerLoss, freeze_all_but_indexers
from nanoseek.train.loss import evaluate, training_loss
from nanoseek.train.metrics import JsonlLog, flops_per_token, measure_peak_flops, read_jsonl
from nanoseek.train.report import plot_run, write_report
from nanoseek.train.run import (Interrupts, RunError, StepLoop, apply_update, claim_run_dir, explicit_flags,
                               resume_args)
from nanoseek.train.sample import sample
from nanoseek.train.schedule import Schedule
from nanoseek.train.state import latest_checkpoint, read_trainer_state, save_checkpoint

# Flags a resumed run may take from its command line when typed (they cannot change the training
# numbers); every other setting comes from the saved run, and typing a different value is an error.
FREE_ON_RESUME = {"data", "tokenizer", "out", "resume", "device", "compile", "max_minutes", "stop_at", "eval_every",
                  "eval_batches", "save_every", "keep_last", "samples", "max_nonfinite", "quiet",
                  "dp_shard", "ep", "pp", "pp_schedule", "activation_checkpoint", "micro_batch"}  # layout and accumulation: rounding only
FINAL_SECONDS = 20  # what a --max-minutes run keeps for its final evaluation, samples and report
PROMPTS = ["import os\n", "def __init__(self", "class ", "    for i in range("]
FIM_EXAMPLE = ("def add(a, b):\n    ", "\n\n\nprint(add(1, 2))\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="a `nanoseek prepare` output directory (on --resume: the saved run's)")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs, report)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest with the saved "
                   "run's settings")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any ModelArgs field (JSON value), repeatable; vocab_size follows the tokenizer "
                        "unless set here")
    g.add_argument("--tokenizer", type=Path, help="tokenizer dir (default DATA/tokenizer); must be the shards' own")
    g = p.add_argument_group("budget (one of them)")
    g.add_argument("--tokens", type=int_in(1), help="training tokens (V3: 14.8e12)")
    g.add_argument("--steps", type=int_in(1), help="optimizer steps at the full batch size (a batch ramp adds a few)")
    g.add_argument("--max-minutes", type=float_in(0, lo_open=True), help="wall-clock budget; alone, it sets the token budget from a "
                                                     "measured throughput; with --tokens/--steps, a hard stop")
    g.add_argument("--stop-at", type=int_in(1), help="stop after this step with a checkpoint, as if interrupted")
    g = p.add_argument_group("batch")
    g.add_argument("--seq-len", type=int_in(1), help="tokens per sequence (default: the data's meta.json, V3: 4096)")
    g.add_argument("--batch-size", type=int_in(1), default=16, help="sequences per optimizer step (V3: 15360)")
    g.add_argument("--micro-batch", type=int_in(1), help="sequences per forward pass on each rank; gradient accumulation "
                                                  "makes up the rest (default: --batch-size / world size)")
    g.add_argument("--batch-start", type=int_in(1), help="batch size at step 0, ramped up linearly (default: 1/5 of "
                                                  "--batch-size as V3's 3072 -> 15360; = --batch-size: no ramp)")
    g.add_argument("--batch-ramp", type=float_in(0, 1), default=V3.V3_BATCH_RAMP,
                   help="fraction of tokens the ramp lasts (V3: 469B/14.8T = %(default).4f)")
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=3e-3, help="peak learning rate (V3: 2.2e-4)")
    g.add_argument("--warmup-steps", type=int_in(0), default=30, help="linear warm-up steps (V3: 2000)")
    g.add_argument("--decay-start", type=float_in(0, 1), default=V3.V3_DECAY_START,
                   help="fraction of tokens where the cosine starts (V3: 10T/14.8T = %(default).3f)")
    g.add_argument("--decay-end", type=float_in(0, 1), default=V3.V3_DECAY_END,
                   help="fraction where the cosine reaches lr/10 (V3: 14.3T/14.8T = %(default).3f)")
    g.add_argument("--tail-switch", type=float_in(0, 1), default=V3.V3_TAIL_SWITCH,
                   help="fraction where the last tail (lr*%.3f) starts (V3: %%(default).4f)" % V3.V3_TAIL_RATIO)
    g.add_argument("--weight-decay", type=float_in(0), default=0.1)
    g.add_argument("--beta1", type=float_in(0, 1, hi_open=True), default=0.9)
    g.add_argument("--beta2", type=float_in(0, 1, hi_open=True), default=0.95)
    g.add_argument("--grad-clip", type=float_in(0), default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="initialisation and data-order seed")
    g = p.add_argument_group("multi-token prediction")
    g.add_argument("--mtp-lambda", type=float_in(0), default=0.3, help="MTP loss weight early (V3: 0.3; 0 skips MTP)")
    g.add_argument("--mtp-lambda-late", type=float_in(0), default=0.1, help="MTP loss weight late (V3: 0.1)")
    g.add_argument("--mtp-switch", type=float_in(0, 1), default=V3.V3_MTP_SWITCH,
                   help="fraction of tokens where λ switches (V3: 10T/14.8T = %(default).3f)")
    g = p.add_argument_group("load balancing")
    g.add_argument("--bias-gamma", type=float_in(0), default=3e-3,
                   help="aux-loss-free bias speed γ (V3: 0.001 over 14.8T tokens; a run of a few hundred steps "
                        "needs a faster one, see `nanoseek bench balance`; 0: off)")
    g.add_argument("--bias-freeze", type=float_in(0, 1), default=V3.V3_DECAY_END,
                   help="fraction of tokens after which γ = 0 (V3: 14.3T/14.8T = %(default).3f)")
    g.add_argument("--seq-alpha", type=float_in(0), default=1e-4, help="sequence-wise balance loss weight α (V3: 1e-4)")
    g.add_argument("--aux-alpha", type=float_in(0), default=0.0, help="classic batch-wide auxiliary loss weight (V2-style "
                                                             "baseline, e.g. 0.01; default off)")
    g = p.add_argument_group("later stages: context extension, sparse attention (DeepSeek-V3.2)")
    g.add_argument("--resume-from", type=Path, help="start this run from a checkpoint's weights (a new stage)")
    g.add_argument("--extend-context", type=int_in(2), help="YaRN extension to N positions (V3: 32768, then 131072); "
                   "--seq-len defaults to N")
    g.add_argument("--yarn-factor", type=float_in(1), help="YaRN factor (default N / the original context; V3: 40)")
    g.add_argument("--dsa-warmup", action="store_true", help="train only the lightning indexers, main model frozen, "
                   "dense attention (V3.2: 1000 steps, lr 1e-3)")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: fp32 on CPU, bf16 autocast on GPU")
    g.add_argument("--precision", default="default", choices=["default", "fp8"],
                   help="fp8: FP8 GEMMs in the Linear layers and experts (V3 §3.3); default: --dtype throughout")
    g.add_argument("--adam-moments", default="fp32", choices=["fp32", "bf16"],
                   help="dtype of AdamW's two moments (V3 §3.3.3: bf16, half the optimizer memory)")
    g.add_argument("--compile", action="store_true", help="torch.compile attention and dense FFNs")
    g.add_argument("--eval-every", type=int_in(0), default=100, help="validation every N steps (0: start and end only)")
    g.add_argument("--eval-batches", type=int_in(1), default=20, help="validation batches per evaluation")
    g.add_argument("--save-every", type=int_in(0), default=0, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-last", type=int_in(0), default=2, help="checkpoints to keep (0: all)")
    g.add_argument("--max-nonfinite", type=int_in(1), default=10, help="stop after this many non-finite steps in a row")
    g.add_argument("--samples", type=int_in(0), default=len(PROMPTS), help="completions printed at the end (+1 FIM)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("parallel layout (under torchrun; --pp x --dp-shard x --ep = world size)")
    g.add_argument("--dp-shard", type=int_in(1), help="FSDP2 degree of the routed experts (default: world size / --ep); "
                   "dense weights are sharded over all dp-shard x ep data-parallel ranks")
    g.add_argument("--ep", type=int_in(1), default=1, help="expert parallelism: routed experts split over this many "
                   "ranks, tokens moved by all-to-all (V3: 64)")
    g.add_argument("--pp", type=int_in(1), default=1, help="pipeline parallelism: the layers cut into stages over this "
                   "many ranks, --micro-batch rows per micro-batch (V3: 16)")
    g.add_argument("--pp-schedule", choices=SCHEDULES, default="1f1b", help="1f1b: one stage per rank; dualpipev: "
                   "DeepSeek-V3's bidirectional schedule folded into a V (2 stages per rank: needs 2 x --pp layers "
                   "and micro-batches)")
    g.add_argument("--activation-checkpoint", action="store_true", help="recompute each block in the backward")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    a = p.parse_args(argv)
    budget = [x for x in (a.tokens, a.steps) if x is not None]
    if len(budget) > 1 or (not budget and a.max_minutes is None and not a.resume):
        p.error("give exactly one of --tokens / --steps, or --max-minutes alone")
    if a.data is None and not a.resume:
        p.error("--data is required (a `nanoseek prepare` output directory)")
    if (a.extend_context or a.yarn_factor) and a.resume_from is None and not a.resume:
        p.error("--extend-context needs --resume-from CKPT (the model to extend)")
    return a


def complete_args(a: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other flags, and the checks between flags (after a resume merged them)."""
    # A pipeline needs at least one micro-batch per stage in every step (its data-parallel ranks: world / pp).
    stages = 1 if a.pp == 1 else a.pp * (2 if a.pp_schedule == "dualpipev" else 1)
    dp = max(1, torchrun_world()[1] // a.pp)
    a.micro_batch = a.micro_batch or max(1, a.batch_size // (dp * stages))  # per rank: the global batch split
    if a.batch_start is None:
        a.batch_start = max(a.micro_batch * (dp * stages if stages > 1 else 1),
                            round(a.batch_size * V3.V3_BATCH_START_RATIO))
    if a.batch_size % a.micro_batch:
        raise RunError(f"--batch-size {a.batch_size} must be a multiple of --micro-batch {a.micro_batch}")
    if a.batch_start > a.batch_size:
        raise RunError(f"--batch-start {a.batch_start} must not exceed --batch-size {a.batch_size}")
    if stages > 1 and a.batch_start < a.micro_batch * dp * stages:
        raise RunError(f"--pp {a.pp} with {a.pp_schedule} runs {stages} stages: every step needs at least {stages} "
                       f"micro-batches per data-parallel rank, so --batch-start (and --batch-size) must be at least "
                       f"{a.micro_batch * dp * stages} (--micro-batch {a.micro_batch} x {dp} ranks x {stages}); got "
                       f"--batch-start {a.batch_start}")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    a = parse_args(parser, argv)
    t_start = time.perf_counter()
    rank = torchrun_world()[0]
    try:  # under torchrun, rank 0 holds the run directory for all ranks
        with claim_run_dir(a.out, "train") if rank == 0 else contextlib.nullcontext(), Interrupts() as stop:
            return train(a, explicit_flags(parser, argv), stop, t_start)
    except (DataError, ConfigError, CheckpointError, RunError, ValueError) as e:
        print(f"{f'[rank {rank}] ' if torchrun_world()[1] > 1 else ''}nanoseek train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C outside the loop (set-up, final evaluation, report)
        print(f"nanoseek train: interrupted; the newest checkpoint is "
              f"{latest_checkpoint(a.out / 'checkpoints') or 'none (nothing was saved)'}", file=sys.stderr)
        return 130
    finally:
        shutdown()


def train(a: argparse.Namespace, explicit: set[str], stop: Interrupts, t_start: float) -> int:
    ckpt_root = a.out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if a.resume else None
    if resume_from is not None:
        saved = read_trainer_state(resume_from)["args"]
        # Limits of one invocation (a minutes budget is fixed in tokens by now) and the layout (a run
        # resumes at any world size) belong to this launch, not to the run.
        a = resume_args(a, saved, explicit, FREE_ON_RESUME,
                        per_launch={"stop_at": None, "max_minutes": None, "dp_shard": None, "ep": 1, "pp": 1,
                                    "pp_schedule": "1f1b", "activation_checkpoint": False},
                        paths=("data", "out", "tokenizer"))
    elif a.resume:
        if a.data is None:
            raise RunError(f"nothing to resume in {ckpt_root} (no checkpoint yet); pass --data and a budget to "
                           f"start a run there")
        print(f"nanoseek train: no checkpoint in {ckpt_root} yet, starting from scratch", file=sys.stderr)
    elif (ckpt_root / "latest").exists():
        raise RunError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with --resume, or "
                       f"use another --out")
    a = complete_args(a)
    if resume_from is None and a.tokens is None and a.steps is None and a.max_minutes is None:
        raise RunError("nothing to resume and no budget given (--tokens, --steps or --max-minutes)")

    # --- device and precision ------------------------------------------------------------------
    try:
        device = resolve_device(a.device)
    except DeviceError as e:
        raise RunError(f"--device {e}") from None
    d = init_distributed(str(device))  # one process: no process group; torchrun: one device per rank
    device = d.device
    quiet_other_ranks(d)
    bf16 = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None
    amp = autocast or contextlib.nullcontext

    # --- data and tokenizer: the shards, the tokenizer and the model must agree -------------------
    train_shards = TokenShards(a.data, "train")
    meta = train_shards.meta or {}
    tok_dir = a.tokenizer or a.data / meta.get("tokenizer", {}).get("dir", "tokenizer")
    tokenizer = Tokenizer.from_dir(tok_dir)
    want = meta.get("tokenizer", {}).get("sha256")
    if want and tokenizer.fingerprint() != want:
        raise DataError(f"tokenizer mismatch: {tok_dir} is not the tokenizer {a.data} was prepared with "
                        f"(sha256 {tokenizer.fingerprint()[:12]}… vs {want[:12]}… in meta.json); use "
                        f"{a.data / 'tokenizer'} or re-run nanoseek prepare")
    if resume_from is not None and (resume_from / "tokenizer.json").exists():
        if Tokenizer.from_dir(resume_from).fingerprint() != tokenizer.fingerprint():
            raise DataError(f"tokenizer mismatch: checkpoint {resume_from} was trained with another tokenizer "
                            f"than {tok_dir}")
    seq_len = a.seq_len or a.extend_context or meta.get("seq_len", 256)

    # --- model ---------------------------------------------------------------------------------
    if resume_from is not None and is_sharded(resume_from):  # weights come after parallelize, from the shards
        model = Transformer(ModelArgs.from_json(resume_from / "config.json")).to(device)
    elif resume_from is not None:
        model = Transformer.from_pretrained(resume_from, dtype=torch.float32, device=device)
    elif a.resume_from is not None:
        model = stage_model(a, device, tokenizer)
    else:
        overrides = parse_overrides(a.overrides)
        overrides.setdefault("vocab_size", tokenizer.vocab_size)
        overrides.setdefault("bos_token_id", tokenizer.bos_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_id)
        overrides.setdefault("torch_dtype", "bfloat16" if bf16 else "float32")
        torch.manual_seed(a.seed)
        model = Transformer(preset(a.preset, **overrides)).to(device)
    if a.precision == "fp8":  # from outside the model: the same parameters, FP8 GEMMs
        to_fp8_training(model)
    precision = "fp8" if a.precision == "fp8" else "bf16" if bf16 else "fp32"
    model.train()
    if seq_len > model.args.max_position_embeddings:
        raise RunError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                       f"{model.args.max_position_embeddings}")
    train_shards = TokenShards(a.data, "train", tokenizer_vocab_size=tokenizer.vocab_size,
                               model_vocab_size=model.args.vocab_size)
    val_shards = TokenShards(a.data, "val", tokenizer_vocab_size=tokenizer.vocab_size,
                             model_vocab_size=model.args.vocab_size)
    layout = check_layout(d.world_size, a.dp_shard, a.ep, a.pp, model.args, a.micro_batch, a.batch_size)
    if layout.pp > 1:  # what the pipeline stages do not carry yet: one line, every rank, before any collective
        for flag, bad in (("--precision fp8", a.precision == "fp8"), ("--aux-alpha", a.aux_alpha > 0),
                          ("a deepseek_v32 model (DSA stages)", model.args.dsa),
                          ("--pp-schedule dualpipev on fewer than 2 x --pp layers",
                           a.pp_schedule == "dualpipev" and model.args.num_hidden_layers < 2 * layout.pp)):
            if bad:
                raise RunError(f"--pp {layout.pp} does not combine with {flag}")
    if a.precision == "fp8" and a.compile:
        raise RunError("--compile does not combine with --precision fp8 yet: inductor (torch 2.13, CPU) fails on "
                       "the FP8 tile quantisation; drop one of them")
    if a.precision == "fp8" and layout.ep > 1:
        raise RunError("--precision fp8 does not combine with --ep yet: the expert-parallel experts run their own "
                       "grouped GEMMs (use --ep 1, or bf16)")
    mesh = build_mesh(layout, d)
    dp, dp_rank = (mesh["dp"].size(), mesh["dp"].get_local_rank()) if mesh is not None else (1, 0)
    loader = BatchLoader(train_shards, a.micro_batch, seq_len, seed=a.seed, rank=dp_rank, world_size=dp)
    has_mtp = a.mtp_lambda > 0 and len(model.mtp) > 0
    dsa = IndexerLoss(model) if model.args.dsa else None  # indexer KL and kept mass, per forward
    if a.dsa_warmup:
        if dsa is None:
            raise RunError("--dsa-warmup needs a deepseek_v32 model (or --resume-from a deepseek_v3 checkpoint)")
        freeze_all_but_indexers(model)
        set_sparse(model, False)
        a.bias_gamma = 0.0  # the main model (its balancing bias too) stays as it is
    # A one-process checkpoint resumed under torchrun: its AdamW moments, read now (full tensors by
    # name), are sharded into the parallel optimizer below.
    plain_state = None
    if resume_from is not None and d.enabled and not is_sharded(resume_from):
        plain_state = full_optimizer_state(resume_from, model, adamw(model.named_parameters(), a.lr, (a.beta1, a.beta2),
                                                                     a.weight_decay, a.adam_moments, fused=False))
    # Compiled from outside the model: attention and the dense / shared-expert FFNs. The routed
    # experts stay eager: torch 2.13 traces grouped_mm in bf16 only. (On 2 CPU cores this buys
    # ~10% per step after ~1.5 minutes of compiling: worth it for long runs only.) Under torchrun,
    # also expert parallelism and FSDP2 (nanoseek/parallel/parallelize.py).
    # With --pp this rank keeps only its stages (`trained`: their parameters under the model's names);
    # the whole `model` stays for its config and the FLOP count.
    flags = dict(bf16=bf16, activation_checkpoint=a.activation_checkpoint, compile=a.compile)
    pipe = build_pipeline(model, mesh, a.micro_batch, seq_len, schedule=a.pp_schedule, mtp_lambda=a.mtp_lambda,
                          seq_alpha=a.seq_alpha, **flags) if layout.pp > 1 else None
    trained = pipe.module if pipe is not None else parallelize(model, mesh, **flags)

    # --- optimizer: weight decay on matrices only (norm gains stay undecayed, as in nanoGPT) ----------
    named = list(trained.named_parameters())
    optimizer = adamw(named, a.lr, (a.beta1, a.beta2), a.weight_decay, a.adam_moments, fused=not d.enabled)
    if plain_state is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(trained, optimizer, plain_state, options=StateDictOptions(full_state_dict=True))

    # --- throughput ceiling and model FLOPs --------------------------------------------------------
    # The ceiling is re-measured at every validation and the best kept: a neighbour's job during
    # one measurement would otherwise inflate the MFU of the whole run.
    peak = d.world_size * measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    flops_tok = flops_per_token(model, seq_len, mtp=has_mtp)

    # --- state: fresh or restored --------------------------------------------------------------------
    log = JsonlLog(a.out / "metrics.jsonl", enabled=d.is_main)
    if resume_from is not None:
        state = load_run_state(resume_from, trained, optimizer, moments_loaded=plain_state is not None)
        loader.load_state_dict(state["loader"])
        step, tokens, total_tokens = state["step"], state["tokens"], state["total_tokens"]
        nonfinite, elapsed_before = state["nonfinite"], state["train_seconds"]
        log.truncate_after(step)  # lines a crashed run wrote after its last checkpoint are redone
        print(f"resumed {resume_from} at step {step}, {tokens:,} tokens")
    else:
        log.truncate_after(-1)
        step, tokens, nonfinite, elapsed_before = 0, 0, 0, 0.0
        if a.tokens is not None:
            total_tokens = a.tokens
        elif a.steps is not None:
            total_tokens = a.steps * a.batch_size * seq_len
        else:
            with dsa.paused() if dsa else contextlib.nullcontext():
                total_tokens = budget_from_minutes(a, model, seq_len, device, amp, t_start, pipe)
            total_tokens = int(agree([total_tokens], d, "min")[0])  # every rank the same budget
    sched = Schedule(total_tokens=total_tokens, lr=a.lr, warmup_steps=a.warmup_steps, decay_start=a.decay_start,
                     decay_end=a.decay_end, tail_switch=a.tail_switch, batch_size=a.batch_size,
                     batch_start=a.batch_start, batch_ramp=a.batch_ramp, micro_batch=a.micro_batch * dp,
                     mtp_lambda=a.mtp_lambda, mtp_lambda_late=a.mtp_lambda_late, mtp_switch=a.mtp_switch,
                     bias_gamma=a.bias_gamma, bias_freeze=a.bias_freeze)
    print(f"model: {a.preset} {model.num_params() / 1e6:.2f}M params ({model.num_params(active=True) / 1e6:.2f}M "
          f"active), {len(model.mtp)} MTP module(s) | data: {train_shards.num_tokens:,} train tokens, seq_len "
          f"{seq_len} | budget: {total_tokens:,} tokens | {device}, {'bf16 autocast' if bf16 else 'fp32'}"
          f"{', FP8 GEMMs' if precision == 'fp8' else ''}, "
          f"peak {peak / 1e9:.0f} GFLOP/s measured")

    def run_eval() -> dict:
        batches = eval_batches(val_shards, a.micro_batch, seq_len, max_batches=a.eval_batches)
        with dsa.paused() if dsa else contextlib.nullcontext():
            loss, counts = pipe.evaluate(list(batches)) if pipe else evaluate(model, batches, autocast)
        rec = {"kind": "val", "step": step, "tokens": tokens, "val_loss": loss,
               "val_bpb": val_shards.bits_per_byte(loss) if val_shards.bytes_per_token else None,
               "val_maxvio": max_vio(counts).tolist()}
        log.write(rec)
        return rec

    def checkpoint() -> Path:
        run_state = {"step": step, "tokens": tokens, "total_tokens": total_tokens, "nonfinite": nonfinite,
                     "train_seconds": elapsed_before + train_seconds, "loader": loader.state_dict(),
                     "schedule": dataclasses.asdict(sched),
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
        with stop.critical():
            if d.enabled:  # sharded: each rank writes its own part
                return save_run_checkpoint(ckpt_root, step, trained, optimizer, model.args, run_state, tok_dir,
                                           a.keep_last)
            return save_checkpoint(ckpt_root, step, model, optimizer, run_state, tokenizer_dir=tok_dir,
                                   keep_last=a.keep_last)

    def together(flag: bool) -> bool:
        return any_rank(flag, d)

    # --- the loop --------------------------------------------------------------------------------------
    # A signal sets stop.requested: the step in flight finishes, a checkpoint of it is written and the
    # run exits 130/143. A second one abandons the step (KeyboardInterrupt below): its gradients are
    # dropped and the data position rewound to the last completed step, which is then saved. Only
    # the update and its bookkeeping (stop.critical) cannot be cut.
    if step == 0 and not stop.requested:
        first = run_eval()
        print(f"step 0: val loss {first['val_loss']:.4f}, {fmt_bpb(first['val_bpb'])}")
    params = [p for _, p in named]
    bar = tqdm(total=total_tokens, initial=tokens, unit="tok", unit_scale=True, disable=a.quiet or not d.is_main,
               dynamic_ncols=True, mininterval=1.0)
    train_seconds = 0.0
    loop = StepLoop("train", a, stop, checkpoint, ckpt_root, bar, step, resume_from is not None, together, t_start)
    # A minutes budget is re-planned from the throughput actually reached (evaluation included), but
    # only while the learning rate is still on its constant plateau, so the curve keeps its shape.
    time_budget = a.tokens is None and a.steps is None and resume_from is None
    replan_at = [a.max_minutes * 60 * f for f in (0.2, 0.35, 0.5, 0.65)] if time_budget else []
    t_loop, tokens_loop = time.perf_counter(), tokens
    committed = loader.state_dict()  # the data position after the last completed step

    def rewind() -> None:  # a second signal: drop the step in flight, keep the last completed one
        optimizer.zero_grad(set_to_none=True)
        loader.load_state_dict(committed)

    def periodic_eval() -> None:  # every --eval-every steps; the throughput ceiling re-measured with it
        nonlocal peak
        r = run_eval()
        peak = max(peak, d.world_size * measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32))
        bar.write(f"step {step}: val loss {r['val_loss']:.4f}, {fmt_bpb(r['val_bpb'])}, "
                  f"val MaxVio {sum(r['val_maxvio']) / max(1, len(r['val_maxvio'])):.3f}")

    with loop.running(rewind):
        while tokens < total_tokens and not (stop.requested and not d.enabled):
            t0 = time.perf_counter()
            batch = sched.batch_at(tokens)
            lr, lam, gamma = sched.lr_at(step, tokens), sched.mtp_lambda_at(tokens), sched.gamma_at(tokens)
            accum = batch // (a.micro_batch * dp)  # micro-batches per rank
            losses, counts = torch.zeros(5, device=device), None  # ce, mtp, balance, indexer KL, kept mass
            if pipe is not None:  # the schedule runs this rank's micro-batches through its stages
                rows = [next(loader) for _ in range(accum)]
                pipe.mtp_lambda = lam if has_mtp else 0.0
                local, counts = pipe.forward_backward(torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows]),
                                                      accum)
                losses[:3] += local.to(device) * accum  # its means over the micro-batches -> sums, as below
                counts = counts.to(device)
            else:
                for _ in range(accum):
                    inputs, targets = (t.to(device, non_blocking=True) for t in next(loader))
                    with amp(), torch.no_grad() if a.dsa_warmup else contextlib.nullcontext():
                        parts = training_loss(model, inputs, targets, lam if has_mtp else 0.0, a.seq_alpha, a.aux_alpha)
                    st = dsa.pop() if dsa is not None else None
                    kl, kept = (st.kl, st.kept_mass) if st is not None else (0.0, 0.0)
                    # the warm-up learns from the indexer KL alone; the sparse stage adds it (its own graph)
                    ((kl if a.dsa_warmup else parts.total + kl) / accum).backward()
                    losses += torch.stack([parts.ce, parts.mtp, parts.balance, torch.as_tensor(kl).detach().float(),
                                           torch.tensor(kept)])
                    counts = parts.counts if counts is None else counts + parts.counts
            if d.enabled:  # global norm over shards on different meshes; global means and loads
                grad_norm = clip_grad_norm_(params, a.grad_clip)
                # (with --pp each rank holds part of the sums: ce/mtp on the last stage, each stage its balance)
                losses = mean_over_ranks(losses) * layout.pp
                counts = global_counts(counts) if counts is not None else None
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else float("inf")).item()
            ce, mtp, bal, kl, kept = (losses / accum).tolist()  # one host sync per step
            skipped = not (math.isfinite(ce) and math.isfinite(mtp) and math.isfinite(kl) and math.isfinite(grad_norm))
            with stop.critical():  # the step is applied and recorded whole, or not at all
                # no update, no bias move for a non-finite step; the batch is consumed all the same
                apply_update(optimizer, lr, not skipped, model, counts, gamma)
                nonfinite += skipped
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                train_seconds += dt
                step, tokens = step + 1, tokens + batch * seq_len
                committed = loader.state_dict()
                tok_s = batch * seq_len / dt
                rec = {"kind": "train", "step": step, "tokens": tokens, "loss": ce,
                       "mtp_loss": mtp if has_mtp else None, "balance_loss": bal, "lr": lr,
                       "mtp_lambda": lam if has_mtp else 0.0, "bias_gamma": gamma, "batch": batch,
                       "grad_norm": grad_norm, "tok_per_s": tok_s, "mfu": tok_s * flops_tok / peak, "skipped": skipped,
                       "precision": precision}
                if dsa is not None:
                    rec.update(indexer_kl=kl, kept_mass=kept)
                if counts is not None and len(counts):
                    rec["maxvio"] = max_vio(counts).tolist()
                    rec["load"] = (counts / counts.sum(-1, keepdim=True)).tolist()
                log.write(rec)
            bar.update(batch * seq_len)
            bar.set_postfix_str(f"step {step} loss {ce:.3f} mfu {rec['mfu']:.1%}", refresh=False)

            if loop.after_step(step, skipped, tokens >= total_tokens, periodic_eval, lr):
                break
            if replan_at and together(time.perf_counter() - t_start >= replan_at[0]):
                replan_at.pop(0)
                now = time.perf_counter()
                rate = (tokens - tokens_loop) / (now - t_loop)
                planned = tokens + int(rate * (a.max_minutes * 60 - (now - t_start) - FINAL_SECONDS))
                planned = int(agree([planned], d, "min")[0])
                if sched.batch_ramp * planned < tokens < sched.decay_start * min(planned, total_tokens):
                    total_tokens = sched.total_tokens = planned
                    bar.total = planned
                    bar.write(f"budget re-planned at {rate:,.0f} tokens/s: {planned:,} tokens")
    code = loop.finish(step)
    if code is not None:
        return code
    stop_reason = loop.stop_reason
    exported = None
    if d.enabled and d.is_main:  # the sharded checkpoint also in the HF layout, for generate / serve / transformers
        exported = export_hf(latest_checkpoint(ckpt_root), latest_checkpoint(ckpt_root)).to(device)

    # --- final evaluation, samples, report --------------------------------------------------------------
    final = run_eval()
    peak = max(peak, d.world_size * measure_peak_flops(device, torch.bfloat16 if bf16 else torch.float32))
    if pipe is not None:  # generation needs the whole model: rank 0 samples from the exported one
        samples = show_samples(exported, tokenizer, a.samples) if a.samples and d.is_main else []
    else:
        samples = show_samples(model, tokenizer, a.samples) if a.samples else []  # every rank: FSDP/EP forwards
    if not d.is_main:
        return 0
    records = read_jsonl(log.path)
    first = next(r for r in records if r["kind"] == "val")
    train_recs = [r for r in records if r["kind"] == "train"]
    tail = [r for r in train_recs[-max(1, len(train_recs) // 10):] if "maxvio" in r]
    maxvio_batch = [sum(r["maxvio"][i] for r in tail) / len(tail) for i in range(len(tail[0]["maxvio"]))] if tail else []
    seconds = elapsed_before + train_seconds
    summary = {
        "preset": a.preset, "params": model.num_params(), "active_params": model.num_params(active=True),
        "steps": step, "tokens": tokens, "train_seconds": seconds, "tok_per_s": tokens / max(seconds, 1e-9),
        "mfu": tokens / max(seconds, 1e-9) * flops_tok / peak, "peak_flops": peak, "flops_per_token": flops_tok,
        "nonfinite_steps": nonfinite, "stop_reason": stop_reason, "precision": precision,
        "adam_moments": a.adam_moments,
        "initial_val_loss": first["val_loss"], "initial_val_bpb": first["val_bpb"],
        "final_val_loss": final["val_loss"], "final_val_bpb": final["val_bpb"],
        "final_train_loss": train_recs[-1]["loss"] if train_recs else None,
        "maxvio_batch": maxvio_batch, "maxvio_batch_mean": sum(maxvio_batch) / max(1, len(maxvio_batch)),
        "val_maxvio": final["val_maxvio"], "checkpoint": str(latest_checkpoint(ckpt_root)),
    }
    if dsa is not None and train_recs:
        last = train_recs[-max(1, len(train_recs) // 10):]
        summary.update(stage="dsa-warmup" if a.dsa_warmup else "dsa-sparse",
                       initial_indexer_kl=train_recs[0]["indexer_kl"],
                       final_indexer_kl=sum(r["indexer_kl"] for r in last) / len(last),
                       initial_kept_mass=train_recs[0]["kept_mass"],
                       final_kept_mass=sum(r["kept_mass"] for r in last) / len(last))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["table"] = {
        "model": f"{model.num_params() / 1e6:.2f}M params, {model.num_params(active=True) / 1e6:.2f}M active",
        "trained": f"{step} steps, {tokens / 1e6:.2f}M tokens in {seconds / 60:.1f} min ({stop_reason})",
        "throughput": f"{summary['tok_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%} of a measured "
                      f"{peak / 1e9:.0f} GFLOP/s",
        "validation loss": f"{first['val_loss']:.3f} -> {final['val_loss']:.3f} nats/token",
        "validation bits/byte": f"{fmt_bpb(first['val_bpb'], '')} -> {fmt_bpb(final['val_bpb'], '')}",
        "MaxVio_batch (last 10% of steps)": ", ".join(f"{v:.3f}" for v in maxvio_batch) or "n/a",
        "MaxVio on validation": ", ".join(f"{v:.3f}" for v in final["val_maxvio"]) or "n/a",
        "non-finite steps skipped": str(nonfinite),
        **({"indexer KL (last 10% of steps)": f"{summary['initial_indexer_kl']:.4f} -> {summary['final_indexer_kl']:.4f}",
            "kept attention mass (top-k of the dense attention)":
                f"{summary['initial_kept_mass']:.3f} -> {summary['final_kept_mass']:.3f}"} if "stage" in summary else {}),
        "checkpoint": summary["checkpoint"],
    }
    report = write_report(a.out, summary, plot_run(records, a.out), samples)
    print(f"done: {stop_reason}; val loss {first['val_loss']:.4f} -> {final['val_loss']:.4f}, "
          f"bits/byte {fmt_bpb(first['val_bpb'], '')} -> {fmt_bpb(final['val_bpb'], '')}; "
          f"{summary['tok_per_s']:,.0f} tok/s, MFU {summary['mfu']:.1%}; report: {report}")
    return 0


def budget_from_minutes(a, model, seq_len, device, amp, t_start, pipe=None) -> int:
    """Turn --max-minutes into a token budget: time forward+backward on random tokens (the weights
    are untouched: gradients are dropped), leave ~8% for evaluation and the optimizer. With a
    pipeline, one schedule step over its minimum number of micro-batches."""
    gen = torch.Generator().manual_seed(a.seed)
    rows = a.micro_batch * (pipe.n_stages if pipe is not None else 1)
    ids = torch.randint(0, model.args.vocab_size, (rows, seq_len + 1), generator=gen).to(device)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        if pipe is not None:
            pipe.forward_backward(ids[:, :-1], ids[:, 1:], pipe.n_stages)
        else:
            with amp():
                parts = training_loss(model, ids[:, :-1], ids[:, 1:], a.mtp_lambda, a.seq_alpha, a.aux_alpha)
            if parts.total.requires_grad:  # not in a --dsa-warmup (the main model is frozen)
                parts.total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    rate = rows * seq_len / min(times[1:])
    left = a.max_minutes * 60 - (time.perf_counter() - t_start)
    total = int(rate * left * 0.92)
    print(f"budget: {rate:,.0f} tokens/s measured -> {total:,} tokens in {left / 60:.1f} min")
    return max(total, a.batch_size * seq_len)


def stage_model(a, device, tokenizer) -> Transformer:
    """--resume-from CKPT: a new stage from a checkpoint's weights, with --set, --dsa-warmup (a deepseek_v3
    checkpoint gets fresh lightning indexers) and --extend-context (YaRN) applied to its config."""
    path = resolve_model_dir(a.resume_from)
    if (path / "tokenizer.json").exists() and Tokenizer.from_dir(path).fingerprint() != tokenizer.fingerprint():
        raise DataError(f"tokenizer mismatch: {path} was trained with another tokenizer than the data's")
    src = Transformer.from_pretrained(path, dtype=torch.float32, device=device)
    overrides = parse_overrides(a.overrides)
    if a.dsa_warmup and not src.args.dsa:
        overrides.setdefault("model_type", "deepseek_v32")
    args = src.args.replace(**overrides)
    if a.extend_context:
        args = extend_context(args, a.extend_context, a.yarn_factor)
    torch.manual_seed(a.seed)
    model = Transformer(args).to(device)
    try:
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    except RuntimeError as e:
        raise RunError(f"--set changes tensor shapes of {path}: {str(e).splitlines()[1].strip()}") from None
    if unexpected or any(".indexer." not in k for k in missing):
        raise RunError(f"{path} does not fit the new config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    print(f"stage from {path}: {src.args.model_type} -> {args.model_type}"
          + (f", rope_scaling {args.rope_scaling}" if a.extend_context else "")
          + (f", {len(missing)} fresh indexer tensors" if missing else ""))
    return model


def show_samples(model, tokenizer, n) -> list[tuple[str, str]]:
    """A few completions of code prompts and one fill-in-the-middle, printed and returned."""
    stop = tuple(model.args.eos_token_ids)
    out = []
    for i, prompt in enumerate(PROMPTS[:n]):
        new = sample(model, tokenizer.encode(prompt, add_bos=True), 48, stop_ids=stop, seed=i)
        out.append((repr(prompt), prompt + tokenizer.decode(new, skip_special_tokens=True)))
    if tokenizer.fim_begin_id is not None:
        pre, suf = FIM_EXAMPLE
        ids = ([tokenizer.bos_id, tokenizer.fim_begin_id] + tokenizer.encode(pre) + [tokenizer.fim_hole_id]
               + tokenizer.encode(suf) + [tokenizer.fim_end_id])
        middle = tokenizer.decode(sample(model, ids, 24, temperature=0, stop_ids=stop), skip_special_tokens=True)
        out.append(("FIM (the middle generated between prefix and suffix)", pre + f"[[{middle}]]" + suf))
    for title, text in out:
        print(f"--- {title}\n{text}")
    return out


def fmt_bpb(bpb, unit=" bits/byte") -> str:
    return "n/a" if bpb is None else f"{bpb:.3f}{unit}"


if __name__ == "__main__":
    sys.exit(main())
