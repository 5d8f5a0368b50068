"""GRPO with rule rewards on our own engine: DeepSeek-R1's reasoning RL (and R1-Zero from a base model).

    nanoseek grpo --model runs/sft --task arithmetic --reward accuracy=1 --reward format=0.2 --out runs/rl
    nanoseek grpo --model runs/base --task arithmetic --template zero --reward accuracy=1 \\
        --reward format_zero=0.5 --beta 0.001 --ref-model-sync-steps 400 --out runs/r1zero   # R1-Zero
    nanoseek grpo --model DIR --task problems.jsonl --reward my_module:my_fn=0.5 --out RUN
    nanoseek grpo --out RUN --resume                 # continue RUN/checkpoints/latest exactly

One step (R1 §2.2, DeepSeekMath §4.1):
1. P prompts (--prompts-per-step), G completions each (--num-generations), sampled by
   `nanoseek.inference.Engine` over the policy's own weights (no copy; continuous batching;
   temperature / top-p; the sampled tokens' log-probs recorded; --speculative mtp drafts with the
   MTP modules and keeps the sampling distribution exact) -- nanoseek/rl/rollout.py.
2. Rewards (weighted rule rewards, `--reward NAME=WEIGHT`, a user's by `module:function`), then
   group-relative advantages; --dynamic-sampling drops groups whose rewards all agree and draws
   more prompts until P groups carry a signal.
3. --num-iterations (μ) passes over --steps-per-generation minibatches, each an AdamW step on
   `grpo_loss` (nanoseek/rl/grpo.py) with the policy's log-probs recomputed in the training forward,
   the reference model's when --beta > 0, the old policy's when μ > 1 or minibatches > 1 (else the
   ratio is exactly 1 at the first pass, as in TRL).

Flags carry TRL's GRPOConfig names where TRL has the option (the README says where each variant
comes from). Writes OUT/metrics.jsonl (one line per step), OUT/samples.md (a table of completions
every --sample-every steps), OUT/checkpoints/ (HF layout, + reference/ when β > 0, + trainer_state:
optimizer, RNG, data position), and at the end OUT/summary.json, OUT/report.md and OUT/grpo.png.

Design choices:
- fp32 everywhere on CPU. Request j of prompt i is seeded from a counter of requests drawn so far,
  saved in the checkpoint: with the optimizer, RNG and data position restored, --resume continues
  with the same numbers as an uninterrupted run.
- The run machinery is `nanoseek train`'s (nanoseek/train/run.py): one writer per run directory,
  Ctrl-C / SIGTERM finish the step and save it (exit 130 / 143), resume keeps the saved settings.
- A step whose loss or gradient norm is not finite is not applied (and counted); --max-nonfinite in
  a row stop the run, so the last good checkpoint stays.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.checkpoint import CheckpointError
from nanoseek.cli import float_in, int_in
from nanoseek.data import DataError
from nanoseek.eval.runner import EvalError, build_prompt, load_model
from nanoseek.inference import Engine
from nanoseek.inference.compiled import compile_mode
from nanoseek.model import ConfigError, Transformer
from nanoseek.rl import rewards as R
from nanoseek.rl.grpo import group_advantages, grpo_loss
from nanoseek.rl.genrm import JudgeReward
from nanoseek.rl.reward_model import RewardScorer
from nanoseek.rl.report import plot_grpo, sample_table, write_report
from nanoseek.rl.rollout import Batch, CompiledLogps, completion_logps, rollout
from nanoseek.rl.tasks import load_task
from nanoseek.train.metrics import JsonlLog, read_jsonl
from nanoseek.train.run import (Interrupts, RunError, StepLoop, apply_update, claim_run_dir, explicit_flags,
                               resume_args)
from nanoseek.train.state import latest_checkpoint, load_trainer_state, read_trainer_state, save_checkpoint

FREE_ON_RESUME = {"model", "tokenizer", "out", "resume", "device", "save_every", "keep_last", "stop_at",
                  "sample_every", "max_nonfinite", "quiet", "compile"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanoseek grpo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="the policy to start from: a model or run directory")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model's)")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, metrics, report)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoints/latest with the saved settings")
    g = p.add_argument_group("task, prompts and rewards")
    g.add_argument("--task", help="arithmetic | countdown | FILE.jsonl (its train split for procedural tasks)")
    g.add_argument("--n-problems", type=int_in(1), default=2000, help="training problems drawn from the task (a "
                   "file: its first N)")
    g.add_argument("--digits", type=int_in(1, 9), default=3, help="arithmetic: largest operand digits")
    g.add_argument("--ops", default="+-*", help="arithmetic: the operators drawn, from +-* (e.g. + for sums only)")
    g.add_argument("--template", default="chat", choices=["chat", "zero"],
                   help="chat: the model's chat template (with <think> opened, see --think); zero: R1-Zero's "
                        "plain-text template, for base models (SPEC §4)")
    g.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                   help="chat template: open the reply with <think> (R1)")
    g.add_argument("--instruction", default="", help="a line appended to each problem")
    g.add_argument("--reward", action="append", default=[], metavar="NAME[=WEIGHT]",
                   help="reward term, repeatable: accuracy, countdown, code, format, format_zero, format_r1, "
                        "language, module:function, rm:DIR (a reward model from `nanoseek rm`, scored in batches) or "
                        "genrm:DIR (a checkpoint as a generative judge: reasoning, then a 0-10 score) "
                        "(default: the task's accuracy rule =1 and format=0.2)")
    g.add_argument("--genrm-template", type=Path, help="genrm: the judge's prompt, a format string over {prompt}, "
                   "{completion}, {answer} (default: nanoseek.rl.genrm.DEFAULT_TEMPLATE)")
    g.add_argument("--genrm-max-tokens", type=int_in(1), default=256, help="genrm: the judge's tokens at most")
    g = p.add_argument_group("sampling (TRL names)")
    g.add_argument("--prompts-per-step", type=int_in(1), default=8, help="P: questions per step (R1-Zero: 32)")
    g.add_argument("--num-generations", type=int_in(2), default=8, help="G: completions per question (R1-Zero: 16)")
    g.add_argument("--max-completion-length", type=int_in(1), default=64, help="new tokens per completion")
    g.add_argument("--temperature", type=float_in(0, 10, lo_open=True), default=1.0, help="(R1-Zero: 1)")
    g.add_argument("--top-p", type=float_in(0, 1, lo_open=True), default=1.0)
    g.add_argument("--top-k", type=int_in(0), default=0, help="sample among the k most likely tokens (0: off)")
    g.add_argument("--speculative", default="none", choices=["none", "mtp"],
                   help="mtp: draft with the MTP modules (exact sampling distribution)")
    g.add_argument("--rollout-batch", type=int_in(1), default=64, help="requests decoded together")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-completion-length tokens "
                   "(benchmarks)")
    g = p.add_argument_group("objective (TRL names)")
    g.add_argument("--steps", type=int_in(1), help="GRPO steps")
    g.add_argument("--stop-at", type=int_in(1), help="stop after this step with a checkpoint, as if interrupted")
    g.add_argument("--lr", type=float_in(0, lo_open=True), default=1e-5, help="learning rate (R1-Zero: 3e-6)")
    g.add_argument("--warmup-steps", type=int_in(0), default=0)
    g.add_argument("--weight-decay", type=float_in(0), default=0.0)
    g.add_argument("--beta1", type=float_in(0, 1, hi_open=True), default=0.9)
    g.add_argument("--beta2", type=float_in(0, 1, hi_open=True), default=0.99)
    g.add_argument("--grad-clip", type=float_in(0), default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--num-iterations", type=int_in(1), default=1, help="μ: optimisation passes per batch of rollouts")
    g.add_argument("--steps-per-generation", type=int_in(1), default=1, help="minibatches (optimizer steps) per pass")
    g.add_argument("--epsilon", type=float_in(0, 1, lo_open=True), default=0.2, help="clip: ratio >= 1 - epsilon")
    g.add_argument("--epsilon-high", type=float_in(0, lo_open=True), help="clip: ratio <= 1 + epsilon_high "
                   "(DAPO clip-higher: 0.28; default: --epsilon)")
    g.add_argument("--beta", type=float_in(0), default=0.0, help="KL weight to the reference (R1-Zero: 0.001)")
    g.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    g.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none", "true", "false"],
                   help="divide advantages by the group's std (group/true), the batch's (batch), or not "
                        "(none/false: Dr. GRPO)")
    g.add_argument("--importance-sampling-level", default="token", choices=["token", "sequence"],
                   help="sequence: GSPO's one length-normalised ratio per completion")
    g.add_argument("--mask-truncated-completions", action="store_true",
                   help="completions cut by the length limit do not count in the loss (DAPO)")
    g.add_argument("--dynamic-sampling", action="store_true", help="drop groups whose rewards all agree and draw "
                   "more prompts until the batch is full (DAPO)")
    g.add_argument("--max-sampling-rounds", type=int_in(1), default=4, help="dynamic sampling: draws per step at most")
    g.add_argument("--ref-model-sync-steps", type=int_in(0), default=0, help="refresh the reference every N steps "
                   "(R1-Zero: 400; 0: never)")
    g.add_argument("--ref-model-mixup-alpha", type=float_in(0, 1), default=1.0,
                   help="refresh: ref = alpha·policy + (1-alpha)·ref (1: replace, as R1-Zero)")
    g.add_argument("--keep-routing", action="store_true", help="routing replay: the training forwards use the experts "
                   "each token was routed to during the rollout (DeepSeek-V3.2)")
    g.add_argument("--unbiased-kl", action="store_true", help="k3 × π_θ/π_old: an unbiased KL gradient off-policy "
                   "(DeepSeek-V3.2)")
    g.add_argument("--off-policy-mask", type=float_in(0), metavar="DELTA", help="drop negative-advantage sequences "
                   "whose mean log(π_rollout/π_θ) exceeds DELTA (DeepSeek-V3.2)")
    g.add_argument("--keep-sampling-mask", action="store_true", help="the engine records the top-p/top-k "
                   "truncation of each sampled token; training log-probs use the same truncation (DeepSeek-V3.2)")
    g.add_argument("--seed", type=int_in(0, 2**31 - 1), default=0, help="problem order and sampling seed")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the rollouts' decode step and the log-prob forwards now (--compile) or never "
                        "(--no-compile). Default: automatic, as in `nanoseek generate`: eager first, compiled once "
                        "the eager time spent reaches what compiling this shape cost here last time (seconds from "
                        "a warm disk cache; minutes cold, so short runs stay eager). NANOSEEK_COMPILE=0/1 forces it")
    g.add_argument("--save-every", type=int_in(0), default=0, help="checkpoint every N steps (0: at the end only)")
    g.add_argument("--keep-last", type=int_in(0), default=2, help="checkpoints to keep (0: all)")
    g.add_argument("--sample-every", type=int_in(0), default=10, help="a table of completions every N steps (0: off)")
    g.add_argument("--max-nonfinite", type=int_in(1), default=5, help="stop after this many non-finite steps in a row")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.resume and (a.model is None or a.task is None or a.steps is None):
        parser.error("--model, --task and --steps are required (or --resume)")
    try:
        with claim_run_dir(a.out, "grpo"), Interrupts() as stop:
            return train(a, explicit_flags(parser, argv), stop)
    except (DataError, ConfigError, CheckpointError, RunError, EvalError, ValueError) as e:
        print(f"nanoseek grpo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek grpo: interrupted; the newest checkpoint is "
              f"{latest_checkpoint(a.out / 'checkpoints') or 'none'}", file=sys.stderr)
        return 130


def reward_terms(a, device="cpu") -> list[tuple[str, callable, float]]:
    """--reward terms; default: the task's accuracy rule (weight 1) and the template's format (0.2)."""
    if a.reward:
        models = [r for r in a.reward if r.startswith(("rm:", "genrm:"))]
        terms = R.parse_rewards([r for r in a.reward if r not in models])
        for k, spec in enumerate(models):  # reward models and judges: loaded once, scored per group in batches
            kind, _, rest = spec.partition(":")
            path, _, weight = rest.rpartition("=") if "=" in rest else (rest, "", "1")
            try:
                w = float(weight)
            except ValueError:
                raise ValueError(f"--reward {spec!r}: the weight {weight!r} is not a number") from None
            name = kind if sum(m.startswith(kind + ":") for m in models) == 1 else f"{kind}{k}"
            terms.append((name, RewardScorer(path, device) if kind == "rm" else
                          JudgeReward(path, device, a.genrm_template, a.genrm_max_tokens, name=name), w))
        return terms
    task = "countdown" if a.task == "countdown" else "accuracy"
    fmt = "format_zero" if a.template == "zero" else "format"
    return R.parse_rewards([f"{task}=1", f"{fmt}=0.2"])


def train(a: argparse.Namespace, explicit: set[str], stop: Interrupts) -> int:
    ckpt_root = a.out / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if a.resume else None
    if resume_from is not None:
        a = resume_args(a, read_trainer_state(resume_from)["args"], explicit, FREE_ON_RESUME,
                        per_launch={"stop_at": None}, paths=("out",))
        model_dir = resume_from
    elif a.resume:
        raise RunError(f"nothing to resume in {ckpt_root} (no checkpoint yet)")
    elif (ckpt_root / "latest").exists():
        raise RunError(f"{ckpt_root} holds checkpoints of an earlier run: continue it with --resume, or use "
                       f"another --out")
    else:
        model_dir = a.model
    if a.epsilon_high is not None and a.epsilon_high < a.epsilon:
        raise RunError(f"--epsilon-high {a.epsilon_high} must be at least --epsilon {a.epsilon}")
    if a.keep_sampling_mask and a.speculative != "none":
        raise RunError("--keep-sampling-mask needs plain rollouts (the speculative path does not record masks)")
    scale = {"true": "group", "false": "none"}.get(a.scale_rewards, a.scale_rewards)

    # --- policy, reference, tokenizer, problems ------------------------------------------------------
    policy, tokenizer = load_model(model_dir, a.tokenizer or (resume_from if resume_from else None), a.device)
    device = policy.embed_tokens.weight.device
    policy.float()
    terms = reward_terms(a, device)
    ref = None
    if a.beta > 0:
        ref = Transformer.from_pretrained(resume_from / "reference", device=device) if resume_from else \
            copy.deepcopy(policy)
        ref.requires_grad_(False).eval()
    if not a.ops or set(a.ops) - set("+-*"):
        raise RunError(f"--ops takes operators from '+-*', got {a.ops!r}")
    problems = load_task(a.task, a.n_problems, a.seed, "train", digits=a.digits, ops=a.ops)
    if not problems:
        raise DataError(f"--task {a.task}: no problems")
    n_models = sum(getattr(fn, "batched", False) for _, fn, _ in terms)  # reward models and judges
    for kind, needs in (("rm", n_models > 0), ("rule", len(terms) > n_models)):
        if any(p.reward == kind for p in problems) and not needs:
            raise RunError(f'--task {a.task}: rows with "reward": "{kind}" but no '
                           f'{"--reward rm:DIR (or genrm:DIR)" if kind == "rm" else "rule reward"} term to score them')
    prompts = [build_prompt(tokenizer, p, a.template, a.instruction, a.think and a.template == "chat")
               for p in problems]
    max_len = max(map(len, prompts)) + a.max_completion_length
    if max_len > policy.args.max_position_embeddings:
        raise RunError(f"the longest prompt ({max(map(len, prompts))} tokens) + --max-completion-length "
                       f"{a.max_completion_length} exceeds the model's context {policy.args.max_position_embeddings}")
    speculative = None if a.speculative == "none" else a.speculative
    mode = compile_mode(a.compile)
    engine = Engine(policy, max_batch_size=min(a.rollout_batch, a.prompts_per_step * a.num_generations),
                    max_seq_len=max_len, speculative=speculative, compile=a.compile,
                    record_routing=a.keep_routing, record_sampling_mask=a.keep_sampling_mask)
    # the training forwards: compiled from the start (on), after the ski-rental rent (auto), or eager (None)
    logps = CompiledLogps(device, policy, mode) if mode != "off" else None
    accuracy = R.accuracy_for(problems[0].task) if problems[0].task != "code" else None

    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=a.lr, betas=(a.beta1, a.beta2),
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for all tensors: ~8x faster
    log = JsonlLog(a.out / "metrics.jsonl")
    if resume_from is not None:
        state = load_trainer_state(resume_from, policy, optimizer)
        step, data, nonfinite = state["step"], state["data"], state["nonfinite"]
        log.truncate_after(step)
        print(f"resumed {resume_from} at step {step}")
    else:
        log.truncate_after(-1)
        step, data, nonfinite = 0, {"epoch": 0, "cursor": 0, "requests": 0}, 0
        (a.out / "samples.md").unlink(missing_ok=True)
    print(f"policy: {policy.num_params() / 1e6:.2f}M params | {len(problems)} problems ({a.task}), template "
          f"{a.template} | P={a.prompts_per_step} G={a.num_generations} | rewards: "
          f"{', '.join(f'{n}={w:g}' for n, _, w in terms)} | {device}")

    def draw(n: int) -> list[int]:
        """The next n problem indices: epochs over the problems, each in a seeded order."""
        out = []
        while len(out) < n:
            order = list(range(len(problems)))
            random.Random(f"{a.seed}:{data['epoch']}").shuffle(order)
            take = order[data["cursor"] : data["cursor"] + n - len(out)]
            out += take
            data["cursor"] += len(take)
            if data["cursor"] >= len(problems):
                data["epoch"], data["cursor"] = data["epoch"] + 1, 0
        return out

    def checkpoint() -> Path:
        run_state = {"step": step, "data": dict(data), "nonfinite": nonfinite,
                     "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
        with stop.critical():
            return save_checkpoint(ckpt_root, step, policy, optimizer, run_state, tokenizer_dir=tok_dir,
                                   keep_last=a.keep_last, extra_models={"reference": ref} if ref is not None else None)

    tok_dir = a.out / "tokenizer"  # tokenizer files only: checkpoints copy every file of this directory
    tokenizer.save(tok_dir)
    bar = tqdm(total=a.steps, initial=step, unit="step", disable=a.quiet, dynamic_ncols=True)
    loop = StepLoop("grpo", a, stop, checkpoint, ckpt_root, bar, step, resume_from is not None)
    last_table, committed = "", dict(data)

    def rewind() -> None:  # a second signal: drop the step in flight (its update never started)
        optimizer.zero_grad(set_to_none=True)
        data.update(committed)

    def compiling_s() -> float:  # seconds spent compiling so far (rollouts' decode graphs, log-prob forwards)
        return engine.steps.compile_s + (logps.compile_s if logps is not None else 0.0)

    with loop.running(rewind):
        while step < a.steps and not stop.requested:
            compiled_before = compiling_s()
            # --- 1. rollouts (+ dynamic sampling) and rewards -----------------------------------------
            t0 = time.perf_counter()
            groups, values, drawn_groups, new_tokens = [], [], 0, 0
            for _ in range(a.max_sampling_rounds if a.dynamic_sampling else 1):
                want = a.prompts_per_step - len(groups)
                idx = draw(want)
                policy.eval()
                outs = rollout(engine, [prompts[i] for i in idx], a.num_generations, a.max_completion_length,
                               a.temperature, a.top_p, seed=a.seed * 2**32 + data["requests"],
                               ignore_eos=a.ignore_eos, top_k=a.top_k, eos_ids=[tokenizer.eos_id])
                data["requests"] += want * a.num_generations
                drawn_groups += want
                for i, group in zip(idx, outs):
                    texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for c in group]
                    # the R1 recipe: a task row's "reward" field picks rule terms or reward models (None: all)
                    choice = problems[i].reward
                    per_fn = [[None] * len(texts) if choice and (choice == "rm") != is_rm else
                              fn.score([problems[i].prompt] * len(texts), texts, a.think and a.template == "chat",
                                       answers=[problems[i].answer] * len(texts))
                              if is_rm else [float(fn(problems[i].prompt, t, problems[i].answer)) for t in texts]
                              for _, fn, _ in terms for is_rm in [getattr(fn, "batched", False)]]
                    total = [sum(w * v[j] for (_, _, w), v in zip(terms, per_fn) if v[j] is not None)
                             for j in range(len(group))]
                    new_tokens += sum(len(c.tokens) for c in group)
                    if a.dynamic_sampling and len(set(total)) == 1:
                        continue
                    groups.append((i, group, texts, per_fn, total))
                if len(groups) >= a.prompts_per_step:
                    break
            rollout_s = time.perf_counter() - t0
            all_values = [v for g in groups for v in g[4]]

            # --- 2. advantages and the training batch -------------------------------------------------
            t1 = time.perf_counter()
            rec = {"kind": "grpo", "step": step + 1, "groups": len(groups), "groups_drawn": drawn_groups}
            stats_sum: dict[str, float] = {}
            loss_value, grad_norm, skipped = 0.0, 0.0, not groups
            if groups:
                comps = [c for g in groups for c in g[1]]
                rewards = torch.tensor([g[4] for g in groups])
                adv = group_advantages(rewards, scale).flatten()
                batch = Batch.of(comps, routing=a.keep_routing, device=device, sampling_mask=a.keep_sampling_mask)
                if a.mask_truncated_completions:
                    batch.mask *= torch.tensor([c.finish_reason != "length" for c in comps],
                                               dtype=batch.mask.dtype, device=device)[:, None]
                policy.train()
                with torch.no_grad():
                    ref_logp = completion_logps(ref, batch, a.temperature, replay=False, compiled=logps) \
                        if ref is not None else None
                    old_logp = None
                    if a.num_iterations > 1 or a.steps_per_generation > 1:
                        old_logp = completion_logps(policy, batch, a.temperature, compiled=logps)
                rec["rollout_logp_gap"] = _logp_gap(comps, old_logp, batch) if a.temperature == 1.0 else None
                # π_rollout for --off-policy-mask: the engine's log-probs (raw model = the sampling
                # distribution at temperature 1), else the old policy's in the training forward
                rollout_logp = _engine_logps(comps, batch) if a.off_policy_mask is not None and \
                    a.temperature == 1.0 else None
                n_tokens = batch.mask.sum()
                minibatches = torch.arange(len(comps)).chunk(a.steps_per_generation)
                lr = a.lr * min(1.0, (step + 1) / a.warmup_steps) if a.warmup_steps else a.lr
                # --- 3. μ passes over the minibatches, one AdamW step each (never half-applied) --------
                with stop.critical():
                    for _ in range(a.num_iterations):
                        for rows in minibatches:
                            sub = batch.select(rows)
                            logp = completion_logps(policy, sub, a.temperature, compiled=logps)
                            old = logp.detach() if old_logp is None else old_logp[rows][:, : logp.shape[1]]
                            loss, stats = grpo_loss(
                                logp, old, None if ref_logp is None else ref_logp[rows][:, : logp.shape[1]],
                                adv[rows].to(device), sub.mask, epsilon=a.epsilon, epsilon_high=a.epsilon_high,
                                beta=a.beta, loss_type=a.loss_type, importance_sampling_level=a.importance_sampling_level,
                                max_completion_length=a.max_completion_length, num_items_in_batch=n_tokens,
                                unbiased_kl=a.unbiased_kl, off_policy_delta=a.off_policy_mask,
                                rollout_logp=None if rollout_logp is None else rollout_logp[rows][:, : logp.shape[1]])
                            if old_logp is None:
                                rec["rollout_logp_gap"] = _logp_gap([comps[r] for r in rows.tolist()], logp.detach(), sub) \
                                    if a.temperature == 1.0 else None
                            loss.backward()
                            norm = torch.nn.utils.clip_grad_norm_(policy.parameters(),
                                                                  a.grad_clip if a.grad_clip > 0 else float("inf")).item()
                            finite = math.isfinite(loss.item()) and math.isfinite(norm)
                            skipped = skipped or not finite
                            apply_update(optimizer, lr, finite)
                            loss_value, grad_norm = loss.item(), norm
                            for k, v in stats.items():
                                stats_sum[k] = stats_sum.get(k, 0.0) + v / (a.num_iterations * len(minibatches))
                    if ref is not None and a.ref_model_sync_steps and (step + 1) % a.ref_model_sync_steps == 0:
                        _mix(ref, policy, a.ref_model_mixup_alpha)
            policy.eval()
            train_s = time.perf_counter() - t1
            if logps is not None:
                logps.after_update(train_s)

            # --- 4. bookkeeping ------------------------------------------------------------------------
            with stop.critical():
                step += 1
                nonfinite += skipped and bool(groups)
                committed = dict(data)
                lengths = [len(c.tokens) for g in groups for c in g[1]]
                texts = [(problems[g[0]], t) for g in groups for t in g[2]]
                rec.update({
                    "reward": _mean(all_values), "reward_std": _std(all_values),
                    **{f"rewards/{n}/mean": _mean([v for g in groups for v in g[3][k] if v is not None])
                       for k, (n, _, _) in enumerate(terms)},
                    **{f"rewards/{n}/std": _std([v for g in groups for v in g[3][k] if v is not None])
                       for k, (n, _, _) in enumerate(terms)},
                    "accuracy": _mean([accuracy(p.prompt, t, p.answer) for p, t in texts if p.reward != "rm"])
                    if accuracy else None,
                    "format_rate": _mean([R.format_reward(p.prompt, t, p.answer) for p, t in texts]),
                    "completion_length": _mean(lengths), "completion_length_max": max(lengths, default=0),
                    "truncated": _mean([c.finish_reason == "length" for g in groups for c in g[1]]),
                    "frac_reward_zero_std": 1 - sum(len(set(g[4])) > 1 for g in groups) / max(len(groups), 1)
                    if not a.dynamic_sampling else 1 - len(groups) / max(drawn_groups, 1),
                    "loss": loss_value, "grad_norm": grad_norm, "lr": a.lr if not a.warmup_steps else
                    a.lr * min(1.0, step / a.warmup_steps), "kl": stats_sum.get("kl", 0.0),
                    "clip_ratio/low_mean": stats_sum.get("clip_ratio/low_mean", 0.0),
                    "clip_ratio/high_mean": stats_sum.get("clip_ratio/high_mean", 0.0),
                    "clip_ratio/region_mean": stats_sum.get("clip_ratio/region_mean", 0.0),
                    "ratio_mean": stats_sum.get("ratio_mean", 1.0),
                    "off_policy_masked": stats_sum.get("off_policy_masked", 0.0), "rollout_s": rollout_s, "train_s": train_s,
                    "compile_s": compiling_s() - compiled_before,
                    **{k: v for _, fn, _ in terms if hasattr(fn, "stats") for k, v in fn.stats().items()},
                    "rollout_tokens_per_s": new_tokens / max(rollout_s, 1e-9), "skipped": skipped})
                log.write(rec)
            bar.update(1)
            bar.set_postfix_str(f"reward {rec['reward']:.3f} len {rec['completion_length']:.1f}", refresh=False)
            if a.sample_every and (step % a.sample_every == 0 or step == a.steps) and groups:
                rows = [(problems[g[0]].prompt, g[2][0], g[4][0]) for g in groups[:4]]
                last_table = sample_table(step, rows)
                with open(a.out / "samples.md", "a") as f:
                    f.write(last_table)
            if loop.after_step(step, skipped and bool(groups), step >= a.steps):
                break
    code = loop.finish(step)
    if code is not None:
        return code
    finish(a, read_jsonl(log.path), latest_checkpoint(ckpt_root), last_table)
    return 0


def finish(a, records: list[dict], ckpt: Path, last_table: str) -> None:
    """summary.json, grpo.png and report.md."""
    recs = [r for r in records if r.get("kind") == "grpo"]
    head, tail = recs[: max(1, len(recs) // 10)], recs[-max(1, len(recs) // 10):]
    summary = {"steps": len(recs), "checkpoint": str(ckpt),
               "reward_first": _mean([r["reward"] for r in head if r["reward"] is not None]),
               "reward_last": _mean([r["reward"] for r in tail if r["reward"] is not None]),
               "accuracy_first": _mean([r["accuracy"] for r in head if r.get("accuracy") is not None]),
               "accuracy_last": _mean([r["accuracy"] for r in tail if r.get("accuracy") is not None]),
               "format_first": _mean([r["format_rate"] for r in head]), "format_last": _mean([r["format_rate"] for r in tail]),
               "length_first": _mean([r["completion_length"] for r in head]),
               "length_last": _mean([r["completion_length"] for r in tail]),
               "rollout_s": sum(r["rollout_s"] for r in recs), "train_s": sum(r["train_s"] for r in recs)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = {"run": f"{summary['steps']} steps, P={a.prompts_per_step} G={a.num_generations}, task {a.task}, "
                    f"template {a.template}, loss {a.loss_type}, beta {a.beta}",
             "reward (first 10% -> last 10% of steps)": f"{summary['reward_first']:.3f} -> {summary['reward_last']:.3f}",
             "accuracy": f"{summary['accuracy_first']:.3f} -> {summary['accuracy_last']:.3f}",
             "format rate": f"{summary['format_first']:.3f} -> {summary['format_last']:.3f}",
             "completion length": f"{summary['length_first']:.1f} -> {summary['length_last']:.1f} tokens",
             "time": f"rollouts {summary['rollout_s']:.0f} s, updates {summary['train_s']:.0f} s",
             "checkpoint": str(ckpt)}
    report = write_report(a.out, "nanoseek GRPO run", table, plot_grpo(records, a.out), last_table)
    print(f"done: reward {summary['reward_first']:.3f} -> {summary['reward_last']:.3f}, accuracy "
          f"{summary['accuracy_first']:.3f} -> {summary['accuracy_last']:.3f}; report: {report}")


def _logp_gap(comps, logp: torch.Tensor | None, batch: Batch) -> float | None:
    """Mean |training-forward log-prob - engine log-prob| over the completion tokens (temperature 1)."""
    if logp is None:
        return None
    recorded = _engine_logps(comps, batch)
    return ((logp - recorded).abs() * batch.mask).sum().item() / max(batch.mask.sum().item(), 1.0)


def _engine_logps(comps, batch: Batch) -> torch.Tensor:
    """The engine's recorded log-probs of the completion tokens as [N, T] (0 at padding)."""
    recorded = torch.zeros_like(batch.mask)
    for n, c in enumerate(comps):
        recorded[n, : len(c.logprobs)] = torch.tensor(c.logprobs[: recorded.shape[1]])
    return recorded


@torch.no_grad()
def _mix(ref, policy, alpha: float) -> None:
    """Reference refresh: ref <- alpha·policy + (1 - alpha)·ref (TRL's sync_ref_model)."""
    for r, p in zip(ref.parameters(), policy.parameters()):
        r.mul_(1 - alpha).add_(p.detach(), alpha=alpha)


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else 0.0


def _std(xs) -> float:
    xs = [float(x) for x in xs]
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


if __name__ == "__main__":
    sys.exit(main())
