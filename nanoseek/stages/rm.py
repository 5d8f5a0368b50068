"""Reward-model training: a scalar head on a DeepSeek checkpoint, Bradley–Terry loss on preference pairs.

    nanoseek rm --model runs/sft --data pairs.jsonl --out runs/rm
    nanoseek rm --model DIR --data pairs.jsonl --val val.jsonl --out OUT --epochs 2 --lr 1e-5
    nanoseek rm --out OUT --resume                                                   # continue exactly

Data: JSONL rows `{"prompt": "..." | "messages": [...], "chosen": ..., "rejected": ..., "margin": 0.5}`;
chosen/rejected are the assistant reply as a string (or TRL's conversational form, a list of
assistant messages), rendered after the prompt with the model's own chat template
(`nanoseek.data.chat.encode_chat`); "margin" (optional, a number) is subtracted inside the loss
-log σ(r_chosen - r_rejected - margin). A bad row is an error naming FILE:LINE (--skip-bad-rows:
counted and reported instead); pairs with a side longer than --max-len tokens are dropped and
counted. Without --val, --val-fraction of the pairs (chosen by the seed) is held out; the held-out
pairwise accuracy (share of pairs with r_chosen > r_rejected) is measured at every --eval-every.

The model: `nanoseek.rl.reward_model.RewardModel`, the trunk of --model plus a `score` Linear, the
reward read at the last non-pad token (the pad id is the tokenizer's dedicated pad token, so the
closing end-of-sentence is scored). Checkpoints are transformers' DeepseekV3ForSequenceClassification
layout (`--reward rm:DIR` of `nanoseek grpo`, or transformers' from_pretrained). One optimizer step
takes --batch-size pairs (micro-batches of --micro-batch, both sides packed padding-free into one
forward: no padding, attention within each sequence only, only the scored positions run the last
FFN); AdamW (fused), linear
warm-up then cosine; the MoE balancing bias stays frozen. The run machinery is `nanoseek train`'s:
one writer per --out, SIGINT/SIGTERM finish the step and save, --resume continues exactly with the
saved settings (data sha256 checked). Writes OUT/metrics.jsonl, OUT/checkpoints/, OUT/summary.json,
OUT/report.md.
"""

from __future__ import annotations

import argparse
import contextlib
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
from nanoseek.data.chat import Skipped, encode_chat, jsonl_lines, parse_json_line
from nanoseek.device import DeviceError, resolve_device
from nanoseek.model import ConfigError
from nanoseek.rl.reward_model import RewardModel, bt_loss
from nanoseek.stages.sft import file_sha256
from nanoseek.train.metrics import JsonlLog, read_jsonl
from nanoseek.train.report import plot_run, write_report
from nanoseek.train.run import (Interrupts, RunError, StepLoop, apply_update, claim_run_dir, explicit_flags,
                               resume_args)
from nanoseek.train.schedule import Schedule
from nanoseek.train.state import latest_checkpoint, load_trainer_state, read_trainer_state, save_checkpoint

FREE_ON_RESUME = {"out", "resume", "device", "eval_every", "save_every", "keep_last", "stop_at", "max_nonfinite",
                  "quiet"}
PAD_TOKEN = "<｜▁pad▁｜>"

Pair = tuple[list[int], list[int], float]  # chosen ids, rejected ids, margin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek rm", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, logs, report)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoints/latest with the saved settings")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", type=Path, help="nanoseek/HF DeepSeek checkpoint (or a reward model) or a run dir")
    g.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the model's)")
    g.add_argument("--data", type=Path, help="preference pairs JSONL")
    g.add_argument("--val", type=Path, help="held-out pairs JSONL (default: hold out --val-fraction)")
    g.add_argument("--val-fraction", type=float_in(0, 1, lo_open=True, hi_open=True), default=0.1)
    g.add_argument("--max-len", type=int_in(2), default=1024, help="longest prompt + reply in tokens (longer: dropped)")
    g.add_argument("--skip-bad-rows", action="store_true", help="count invalid rows instead of stopping on one")
    g = p.add_argument_group("budget and optimizer")
    g.add_argument("--epochs", type=float_in(0, lo_open=True), default=1.0, help="passes over the pairs")
    g.add_argument("--batch-size", type=int_in(1), default=8, help="pairs per optimizer step")
    g.add_argument("--micro-batch", type=int_in(1), help="pairs per forward pass (default: --batch-size)")
    g.add_argument("--stop-at", type=int_in(1), help="stop after this step with a checkpoint, as if interrupted")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=1e-5, help="peak learning rate")
    g.add_argument("--warmup", type=float_in(0, 1, hi_open=True), default=0.03, help="warm-up fraction of the steps")
    g.add_argument("--min-lr-ratio", type=float_in(0, 1), default=0.1, help="the cosine ends at lr × this")
    g.add_argument("--weight-decay", type=float_in(0), default=0.0)
    g.add_argument("--grad-clip", type=float_in(0), default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="pair order, held-out split, head init")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: fp32 on CPU, bf16 on GPU")
    g.add_argument("--eval-every", type=int_in(0), default=50, help="held-out accuracy every N steps (0: start/end)")
    g.add_argument("--save-every", type=int_in(0), default=0, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-last", type=int_in(0), default=2, help="checkpoints to keep (0: all)")
    g.add_argument("--max-nonfinite", type=int_in(1), default=10, help="stop after this many non-finite steps in a row")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        with claim_run_dir(a.out, "rm"), Interrupts() as stop:
            return train_rm(a, explicit_flags(parser, argv), stop)
    except (DataError, ConfigError, CheckpointError, DeviceError, RunError, ValueError) as e:
        print(f"nanoseek rm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek rm: interrupted; the newest checkpoint is "
              f"{latest_checkpoint(a.out / 'checkpoints') or 'none (nothing was saved)'}", file=sys.stderr)
        return 130


# --- data ------------------------------------------------------------------------------------------
def _reply(value, side: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") == "assistant" for m in value):
        return value
    raise DataError(f'"{side}" must be a string or a list of assistant messages')


def encode_pair(tokenizer, row) -> Pair:
    """One JSONL row -> (chosen ids, rejected ids, margin); DataError saying what is wrong."""
    if not isinstance(row, dict):
        raise DataError("expected a JSON object")
    if ("prompt" in row) == ("messages" in row):
        raise DataError('give exactly one of "prompt" (a string) and "messages" (a list)')
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            raise DataError('"prompt" must be a string')
        prompt = [{"role": "user", "content": row["prompt"]}]
    else:
        prompt = row["messages"]
        if not isinstance(prompt, list) or not prompt:
            raise DataError('"messages" must be a non-empty list')
    for side in ("chosen", "rejected"):
        if side not in row:
            raise DataError(f'missing "{side}"')
    margin = row.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f'"margin" must be a finite number, got {margin!r}')
    chosen, _ = encode_chat(tokenizer, prompt + _reply(row["chosen"], "chosen"))
    rejected, _ = encode_chat(tokenizer, prompt + _reply(row["rejected"], "rejected"))
    return chosen, rejected, float(margin)


def read_pairs(path: Path, tokenizer, max_len: int, skip_bad: bool = False) -> tuple[list[Pair], Skipped]:
    """Encode a pairs JSONL file. Errors are DataError("FILE:LINE: ..."); blank lines are ignored."""
    skipped, out = Skipped(str(path)), []
    for n, line in jsonl_lines(path):
        try:
            pair = encode_pair(tokenizer, parse_json_line(line))
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path}:{n}: {e}") from None
            skipped.add("invalid", n)
            continue
        if max(len(pair[0]), len(pair[1])) > max_len:
            skipped.add(f"longer than {max_len} tokens", n)
            continue
        out.append(pair)
    return out, skipped


def plan_pairs(n: int, epochs: float, seed: int) -> list[int]:
    """Every step's pairs in order: each epoch a seeded shuffle; a pure function (exact resume)."""
    order: list[int] = []
    epoch = 0
    while epoch < epochs:
        perm = list(range(n))
        random.Random(f"rm:{seed}:{epoch}").shuffle(perm)
        order += perm[: round(n * min(1.0, epochs - epoch))]
        epoch += 1
    return order


def pair_forward(rm: RewardModel, pairs: list[Pair], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(r_chosen [N], r_rejected [N], margin [N]): both sides of every pair in one padding-free packed
    forward (`RewardModel.packed`: no padding, attention per sequence, only the last tokens scored)."""
    rewards = rm.packed([p[0] for p in pairs] + [p[1] for p in pairs])
    N = len(pairs)
    return rewards[:N], rewards[N:], torch.tensor([p[2] for p in pairs], device=device)


@torch.no_grad()
def evaluate(rm: RewardModel, pairs: list[Pair], batch: int, device) -> tuple[float, float, float]:
    """(mean BT loss, pairwise accuracy, mean r_chosen - r_rejected) over pairs."""
    rm.eval()
    loss = correct = gap = 0.0
    for i in range(0, len(pairs), batch):
        c, r, m = pair_forward(rm, pairs[i:i + batch], device)
        loss += bt_loss(c, r, m).item() * len(c)
        correct += (c > r).sum().item()
        gap += (c - r).sum().item()
    rm.train()
    n = max(len(pairs), 1)
    return loss / n, correct / n, gap / n


# --- the run ---------------------------------------------------------------------------------------
def train_rm(a: argparse.Namespace, explicit: set[str], stop: Interrupts) -> int:
    ckpt_root = a.out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if a.resume else None
    state: dict = {}
    if resume_from is not None:
        state = read_trainer_state(resume_from)
        a = resume_args(a, state["args"], explicit, FREE_ON_RESUME, per_launch={"stop_at": None},
                        paths=("out", "model", "tokenizer", "data", "val"))
    elif a.resume:
        raise RunError(f"nothing to resume in {ckpt_root} (no checkpoint yet); pass --model/--data to start a run")
    elif (ckpt_root / "latest").exists():
        raise RunError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with --resume, or use "
                       f"another --out")
    if a.model is None or a.data is None:
        raise RunError("--model DIR and --data pairs.jsonl are required")
    a.micro_batch = a.micro_batch or a.batch_size
    if a.batch_size % a.micro_batch:
        raise RunError(f"--batch-size {a.batch_size} must be a multiple of --micro-batch {a.micro_batch}")

    device = resolve_device(a.device)
    bf16 = a.dtype == "bf16" or (a.dtype == "auto" and device.type == "cuda")
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    tok_dir = a.out / "tokenizer"
    if resume_from is None:
        model_dir = resolve_model_dir(a.model)
        candidates = [a.tokenizer] if a.tokenizer else [model_dir, model_dir / "tokenizer"]
        src = next((Path(d) for d in candidates if (Path(d) / "tokenizer.json").is_file()), None)
        if src is None:
            raise DataError(f"no tokenizer.json in {' or '.join(map(str, candidates))}; pass --tokenizer DIR")
        tokenizer = Tokenizer.from_dir(src)
        torch.manual_seed(a.seed)  # the new head's initialisation
        rm = RewardModel.from_pretrained(model_dir, dtype=torch.float32, device=device)
        eos = set(rm.args.eos_token_ids)
        if rm.pad_id is None or rm.pad_id in eos:  # the reward must read the closing EOS, not skip it
            try:
                pad = tokenizer.token_id(PAD_TOKEN)
            except KeyError:
                pad = None
            if pad is None or pad in eos:
                raise RunError(f"the model has no pad token distinct from end-of-sentence (pad_token_id "
                               f"{rm.pad_id}); set pad_token_id in {model_dir}/config.json")
            rm.model.args = rm.args.replace(pad_token_id=pad)
        tokenizer.save(tok_dir)
    else:
        tokenizer = Tokenizer.from_dir(resume_from)
        rm = RewardModel.from_pretrained(resume_from, dtype=torch.float32, device=device)
    rm.train()

    hashes = {"data": file_sha256(a.data)} | ({"val": file_sha256(a.val)} if a.val else {})
    if resume_from is not None and state.get("data_sha256") != hashes:
        raise RunError(f"the data changed since {resume_from} was saved (sha256 of --data/--val differ): an "
                       f"exact resume needs the same files")
    pairs, skipped = read_pairs(a.data, tokenizer, a.max_len, a.skip_bad_rows)
    if skipped.summary():
        print(skipped.summary(), file=sys.stderr)
    if a.val is not None:
        val, vskipped = read_pairs(a.val, tokenizer, a.max_len, a.skip_bad_rows)
        if vskipped.summary():
            print(vskipped.summary(), file=sys.stderr)
    else:
        order = list(range(len(pairs)))
        random.Random(f"rm-val:{a.seed}").shuffle(order)
        held = set(order[: max(1, round(len(pairs) * a.val_fraction))] if len(pairs) > 1 else [])
        val = [p for i, p in enumerate(pairs) if i in held]
        pairs = [p for i, p in enumerate(pairs) if i not in held]
    if not pairs or not val:
        raise DataError(f"{a.data}: {len(pairs)} training and {len(val)} held-out pairs left; need at least one "
                        f"of each")
    order = plan_pairs(len(pairs), a.epochs, a.seed)
    total_steps = math.ceil(len(order) / a.batch_size)
    sched = Schedule(total_tokens=total_steps, lr=a.lr, warmup_steps=max(1, round(a.warmup * total_steps)),
                     decay_start=0.0, decay_end=1.0, tail_switch=1.0, decay_ratio=a.min_lr_ratio,
                     tail_ratio=a.min_lr_ratio, batch_size=1, batch_start=1, micro_batch=1)
    named = [(n, p) for n, p in rm.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": a.weight_decay},
         {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}],
        lr=a.lr, betas=(0.9, 0.95), fused=True)
    step, tokens, nonfinite, seconds_before = 0, 0, 0, 0.0
    log = JsonlLog(a.out / "metrics.jsonl")
    if resume_from is not None:
        state = load_trainer_state(resume_from, rm, optimizer)
        step, tokens, nonfinite, seconds_before = state["step"], state["tokens"], state["nonfinite"], state["seconds"]
        log.truncate_after(step)
        print(f"resumed from {resume_from} at step {step} of {total_steps}")
    else:
        log.path.write_text("")
    print(f"rm: {len(pairs)} pairs -> {total_steps} steps of {a.batch_size}; {len(val)} held out; "
          f"{sum(p.numel() for _, p in named) / 1e6:.2f}M trained params on {device}")

    def run_eval() -> tuple[float, float, float]:
        with amp():
            loss, acc, gap = evaluate(rm, val, 2 * a.micro_batch, device)
        log.write({"kind": "val", "step": step, "tokens": tokens, "val_loss": loss, "val_accuracy": acc,
                   "val_reward_gap": gap})
        return loss, acc, gap

    def checkpoint() -> Path:
        run_state = {"step": step, "tokens": tokens, "nonfinite": nonfinite, "total_steps": total_steps,
                     "seconds": seconds_before + train_seconds, "data_sha256": hashes,
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
        with stop.critical():
            return save_checkpoint(ckpt_root, step, rm, optimizer, run_state, tokenizer_dir=tok_dir,
                                   keep_last=a.keep_last)

    if step == 0:
        _, acc0, _ = run_eval()
        print(f"step 0: held-out accuracy {acc0:.3f}")
    params = [p for _, p in named]
    bar = tqdm(total=total_steps, initial=step, unit="step", disable=a.quiet, dynamic_ncols=True, mininterval=1.0)
    train_seconds = 0.0
    loop = StepLoop("rm", a, stop, checkpoint, ckpt_root, bar, step, resume_from is not None)
    with loop.running(rewind=lambda: optimizer.zero_grad(set_to_none=True)):
        while step < total_steps and not stop.requested:
            t0 = time.perf_counter()
            batch = [pairs[i] for i in order[step * a.batch_size:(step + 1) * a.batch_size]]
            lr = sched.lr_at(step, step)
            loss_sum = correct = 0.0
            n_tok = 0
            for i in range(0, len(batch), a.micro_batch):
                mb = batch[i:i + a.micro_batch]
                with amp():
                    c, r, m = pair_forward(rm, mb, device)
                    loss = bt_loss(c, r, m) * len(mb) / len(batch)
                loss.backward()
                loss_sum += loss.item()
                correct += (c > r).sum().item()
                n_tok += sum(len(p[0]) + len(p[1]) for p in mb)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip if a.grad_clip > 0 else float("inf")).item()
            bad = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
            with stop.critical():
                apply_update(optimizer, lr, not bad)
                nonfinite += bad
                dt = time.perf_counter() - t0
                train_seconds += dt
                step, tokens = step + 1, tokens + n_tok
                log.write({"kind": "train", "step": step, "tokens": tokens, "loss": loss_sum,
                           "accuracy": correct / len(batch), "lr": lr, "grad_norm": grad_norm, "step_s": dt,
                           "tok_per_s": n_tok / dt, "skipped": bad})
            bar.update(1)
            bar.set_postfix_str(f"loss {loss_sum:.3f} lr {lr:.2e}", refresh=False)
            if loop.after_step(step, bad, step >= total_steps,
                               lambda: bar.write(f"step {step}: held-out accuracy {run_eval()[1]:.3f}"), lr):
                break
    code = loop.finish(step)
    if code is not None:
        return code

    loss, acc, gap = run_eval()
    records = read_jsonl(log.path)
    first = next(r for r in records if r["kind"] == "val")
    seconds = seconds_before + train_seconds
    summary = {"start": str(a.model), "steps": step, "tokens": tokens, "pairs": len(pairs), "val_pairs": len(val),
               "skipped_rows": skipped.count, "initial_val_accuracy": first["val_accuracy"],
               "final_val_accuracy": acc, "initial_val_loss": first["val_loss"], "final_val_loss": loss,
               "final_val_reward_gap": gap, "nonfinite_steps": nonfinite, "train_seconds": seconds,
               "tok_per_s": tokens / max(seconds, 1e-9), "checkpoint": str(latest_checkpoint(ckpt_root))}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["preset"] = f"reward model from {summary['start']}"
    summary["table"] = {
        "start": summary["start"], "data": f"{len(pairs)} pairs, {len(val)} held out ({skipped.count} rows skipped)",
        "trained": f"{step} steps, {tokens / 1e6:.3f}M tokens in {seconds / 60:.1f} min",
        "throughput": f"{summary['tok_per_s']:,.0f} tokens/s",
        "held-out pairwise accuracy": f"{first['val_accuracy']:.3f} -> {acc:.3f}",
        "held-out BT loss": f"{first['val_loss']:.3f} -> {loss:.3f}",
        "non-finite steps skipped": str(nonfinite), "checkpoint": summary["checkpoint"]}
    report = write_report(a.out, summary, plot_run(records, a.out), [], title="nanoseek reward model")
    print(f"done: {step} steps; held-out accuracy {first['val_accuracy']:.3f} -> {acc:.3f}; "
          f"{summary['tok_per_s']:,.0f} tok/s; report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
