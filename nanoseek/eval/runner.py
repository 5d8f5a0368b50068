"""Sampling k completions per problem on the inference engine, and grading them.

    model, tokenizer = load_model(DIR, device="auto")
    prompts = [build_prompt(tokenizer, p, template="chat") for p in problems]
    samples = sample_problems(model, tokenizer, prompts, k=8, temperature=0.6, top_p=0.95, max_new_tokens=512)
    graded = grade(problems, prompts, samples, format_fn)    # one dict per completion
    summary = summarize(graded, k=8)

All n·k requests go through one `Engine` with continuous batching: each finished completion frees
its slot for the next request at once, so long and short completions never wait for each other.
Sample j of problem i is seeded with seed + i·k + j: a run is reproducible whatever the batch size.

Prompt templates:
* "chat" (default): the model's chat template with the problem as the user turn (plus an optional
  instruction line, e.g. R1's "Please reason step by step, and put your final answer within
  \\boxed{}."), ending with the assistant opener; `think=True` also opens `<think>\\n`;
* "zero": R1-Zero's plain-text template (SPEC §4), answers in `<answer>` tags.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanoseek.inference import Engine, SamplingParams, chat_prompt, split_reasoning
from nanoseek.inference.reasoning import prompt_opens_thinking
from nanoseek.rl.rewards import accuracy_for, countdown_numbers, countdown_value, extract_answer, format_reward
from nanoseek.rl.tasks import Problem, load_task

from .metrics import cons_at_k, pass_at_k

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. "
    "Assistant:")


class EvalError(Exception):
    """Bad input to eval/sample: reported as one line and exit status 2."""


def load_model(model_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               device: str = "auto"):
    """(Transformer in eval mode, Tokenizer) from a model dir (or run dir); EvalError on any problem."""
    from nanoseek.checkpoint import CheckpointError, resolve_model_dir
    from nanoseek.data import DataError, Tokenizer
    from nanoseek.device import DeviceError, resolve_device
    from nanoseek.model import ConfigError, Transformer

    try:
        device = resolve_device(device)
        model_dir = resolve_model_dir(model_dir)
    except (DeviceError, CheckpointError) as e:
        raise EvalError(str(e)) from None
    candidates = [Path(tokenizer_dir)] if tokenizer_dir else [model_dir, model_dir / "tokenizer"]
    tok_dir = next((d for d in candidates if (d / "tokenizer.json").is_file()), None)
    if tok_dir is None:
        raise EvalError(f"no tokenizer.json in {' or '.join(map(str, candidates))}; pass --tokenizer DIR")
    try:
        tokenizer = Tokenizer.from_dir(tok_dir)
        model = Transformer.from_pretrained(model_dir, device=device)
    except (CheckpointError, ConfigError, DataError, OSError) as e:
        raise EvalError(str(e)) from None
    if tokenizer.vocab_size > model.args.vocab_size:
        raise EvalError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} ids but the model's vocab_size "
                        f"is {model.args.vocab_size}")
    return model.eval(), tokenizer


def build_prompt(tokenizer, problem: Problem, template: str = "chat", instruction: str = "",
                 think: bool = False) -> list[int]:
    """The prompt ids for one problem (see the module docstring for the templates)."""
    text = problem.prompt + (f"\n{instruction}" if instruction else "")
    if template == "zero":
        return tokenizer.encode(R1_ZERO_TEMPLATE.format(prompt=text), add_bos=True)
    if template != "chat":
        raise EvalError(f"unknown template {template!r} (chat or zero)")
    return chat_prompt(tokenizer, [{"role": "user", "content": text}], think=think)


@dataclass
class Sample:
    """One completion: its new token ids (EOS included when it stopped), decoded text and finish reason."""

    tokens: list[int]
    text: str
    finish_reason: str


def sample_problems(model, tokenizer, prompts: list[list[int]], k: int, max_new_tokens: int = 512,
                    temperature: float = 0.6, top_p: float = 0.95, seed: int = 0, batch_size: int = 32,
                    progress: bool = True, engine: Engine | None = None, compile: bool | None = None,
                    speculative: str | None = "auto") -> list[list[Sample]]:
    """k completions for each prompt -> samples[i][j]. One engine, continuous batching (module docstring);
    `compile` / `speculative` are the Engine's (None: automatic / no speculation)."""
    longest = max(len(p) for p in prompts)
    context = model.args.max_position_embeddings
    if longest + 1 > context:
        raise EvalError(f"a prompt is {longest} tokens, the model's context is {context}")
    max_new_tokens = min(max_new_tokens, context - longest)
    if engine is None:
        # No tokenizer in the engine: completions are decoded once at the end, not as text deltas per token.
        engine = Engine(model, max_batch_size=min(batch_size, len(prompts) * k), max_seq_len=longest + max_new_tokens,
                        compile=compile, speculative=speculative)
    queue = [(i, j) for i in range(len(prompts)) for j in range(k)]
    queue.reverse()
    out: list[list[Sample | None]] = [[None] * k for _ in prompts]
    tokens: dict[int, list[int]] = {}
    where: dict[int, tuple[int, int]] = {}
    bar = tqdm(total=len(queue), unit="completion", disable=not progress, dynamic_ncols=True)
    with torch.inference_mode():
        while queue or engine.num_active:
            while queue and engine.free_slots > 0:
                i, j = queue.pop()
                params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p if temperature > 0 else 1.0, seed=seed + i * k + j,
                                        stop_token_ids=[tokenizer.eos_id])
                rid = engine.add_request(prompts[i], params)
                where[rid], tokens[rid] = (i, j), []
            for ev in engine.step():
                tokens[ev.request_id].append(ev.token_id)
                if ev.finished:
                    i, j = where.pop(ev.request_id)
                    ids = tokens.pop(ev.request_id)
                    out[i][j] = Sample(ids, tokenizer.decode(ids, skip_special_tokens=True), ev.finish_reason)
                    bar.update(1)
    bar.close()
    return out  # type: ignore[return-value]


def vote_answer(problem: Problem, completion: str) -> str | None:
    """The answer a completion casts in a majority vote: the extracted final answer, or for Countdown
    the value of a valid equation (any equation reaching the target is the same, right, answer)."""
    answer = extract_answer(completion)
    if answer is None or problem.task != "countdown":
        return answer
    value = countdown_value(answer, problem.numbers or countdown_numbers(problem.prompt))
    return None if value is None else str(value)


def grade(problems: list[Problem], prompt_texts: list[str], samples: list[list[Sample]],
          format_fn=format_reward) -> list[dict]:
    """One record per completion: problem index, sample index, prompt, completion, reference answer,
    extracted answer, correct (the task's accuracy rule), format (format_fn), tokens, finish_reason."""
    records = []
    for i, (problem, prompt, outs) in enumerate(zip(problems, prompt_texts, samples)):
        right = accuracy_for(problem.task)
        for j, s in enumerate(outs):
            completion = s.text
            records.append({
                "problem": i, "sample": j, "prompt": prompt, "completion": s.text, "reference": problem.answer,
                "answer": vote_answer(problem, completion), "correct": right(problem.prompt, completion, problem.answer),
                "format": format_fn(problem.prompt, completion, problem.answer), "tokens": len(s.tokens),
                "finish_reason": s.finish_reason,
            })
    return records


def summarize(records: list[dict], k: int, problems: list[Problem]) -> dict:
    """pass@1 (mean over the k samples, averaged over problems), pass@k, cons@k (not for code),
    format rate, mean completion length, and counts."""
    by_problem: dict[int, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["problem"], []).append(r)
    p1, pk, cons = [], [], []
    for i, rs in sorted(by_problem.items()):
        rs.sort(key=lambda r: r["sample"])
        c = sum(r["correct"] >= 1.0 for r in rs)
        p1.append(pass_at_k(len(rs), c, 1))
        pk.append(pass_at_k(len(rs), c, min(k, len(rs))))
        if problems[i].task != "code":
            cons.append(cons_at_k([r["answer"] for r in rs], problems[i].answer, k))
    n = max(len(p1), 1)
    return {
        "problems": len(p1), "k": k, "completions": len(records),
        "pass@1": sum(p1) / n, f"pass@{k}": sum(pk) / n, f"cons@{k}": (sum(cons) / len(cons)) if cons else None,
        "format_rate": sum(r["format"] for r in records) / max(len(records), 1),
        "mean_tokens": sum(r["tokens"] for r in records) / max(len(records), 1),
        "truncated": sum(r["finish_reason"] == "length" for r in records),
    }


def opens_thinking(tokenizer, prompt_ids: list[int]) -> bool:
    """Whether a prompt ends inside a `<think>` the template opened (so replies start in the reasoning)."""
    return prompt_opens_thinking(tokenizer.decode(prompt_ids[-4:]))


def to_chat_row(prompt_text: str, completion: str, opened: bool) -> dict:
    """A completion as a chat JSONL row, its reasoning in `reasoning_content` (R1's layout). A reply
    with a `</think>` but no opening `<think>` is read as reasoning first, as `format_r1` grades it."""
    opened = opened or ("</think>" in completion and not completion.lstrip().startswith("<think>"))
    reasoning, content = split_reasoning(completion, in_reasoning=opened)
    reply = {"role": "assistant", "content": content}
    if reasoning:
        reply["reasoning_content"] = reasoning
    return {"messages": [{"role": "user", "content": prompt_text}, reply]}


# --- what the eval and sample stages share -------------------------------------------------------------
def add_flags(p: argparse.ArgumentParser, n_default: int, split_default: str, model_required: bool = True) -> None:
    """Flags eval and sample share: model, task, prompting, sampling, runtime."""
    p.add_argument("--model", required=model_required, type=Path, help="model directory or training run directory")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model's)")
    p.add_argument("--task", required=True, help="arithmetic | countdown | FILE.jsonl")
    p.add_argument("--n", type=int, default=n_default, help="problems (a file: its first N; 0 = all)")
    p.add_argument("--split", default=split_default, choices=["train", "test"], help="procedural tasks' split")
    p.add_argument("--seed", type=int, default=0, help="problem and sampling seed")
    p.add_argument("--digits", type=int, default=3, help="arithmetic: largest operand digits")
    p.add_argument("--ops", default="+-*", help="arithmetic: the operators drawn, from +-* (e.g. + for sums only)")
    p.add_argument("--template", default="chat", choices=["chat", "zero"],
                   help="chat: the model's chat template; zero: R1-Zero's plain-text template")
    p.add_argument("--think", action="store_true", help="open the reply with <think> (chat template)")
    p.add_argument("--instruction", default="", help="a line appended to each problem")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="requests decoded together")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step (default: automatic, as in `nanoseek generate`)")
    p.add_argument("--speculative", choices=["auto", "mtp", "off"], default="auto",
                   help="MTP speculative decoding (sampling stays exact): auto while it is faster, mtp, off")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_flags(a) -> None:
    """Each flag's range, named with the value the user typed (one line, exit 2 from the stage)."""
    limits = [("--n", a.n, 0, 2**31 - 1), ("--k", a.k, 1, 2**31 - 1), ("--max-new-tokens", a.max_new_tokens, 1, 2**31 - 1),
              ("--batch-size", a.batch_size, 1, 2**31 - 1), ("--seed", a.seed, 0, 2**32 - 1), ("--digits", a.digits, 1, 18),
              ("--temperature", a.temperature, 0, 10)]
    for flag, value, lo, hi in limits:
        if not lo <= value <= hi:
            raise EvalError(f"{flag} must be in [{lo}, {hi}], got {value}")
    if not 0 < a.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {a.top_p}")
    if not a.ops or set(a.ops) - set("+-*"):
        raise EvalError(f"--ops takes operators from '+-*', got {a.ops!r}")
    if a.task in ("arithmetic", "countdown") and a.n == 0:
        raise EvalError(f"--n must be >= 1 for the {a.task} task")


@dataclass
class Sampled:
    """What eval and sample work on: the tokenizer, problems, their user texts and prompt ids, the
    completions samples[i][j], and the seconds sampling took."""

    tokenizer: object
    problems: list[Problem]
    texts: list[str]
    prompts: list[list[int]]
    samples: list[list[Sample]]
    seconds: float


def prompt_texts(problems: list[Problem], instruction: str) -> list[str]:
    """Each problem as the user asks it (the `prompt` of a graded record)."""
    return [p.prompt + (f"\n{instruction}" if instruction else "") for p in problems]


def run_flags(a) -> Sampled:
    """Load the model, build the task's prompts, sample a.k completions each (the eval/sample flags)."""
    model, tokenizer = load_model(a.model, a.tokenizer, a.device)
    problems = load_task(a.task, a.n, a.seed, a.split, digits=a.digits, ops=a.ops)
    texts = prompt_texts(problems, a.instruction)
    prompts = [build_prompt(tokenizer, p, a.template, a.instruction, a.think) for p in problems]
    t0 = time.perf_counter()
    if a.speculative == "mtp" and not len(model.mtp):
        raise EvalError(f"--speculative mtp needs MTP modules; {a.model} has none")
    samples = sample_problems(model, tokenizer, prompts, a.k, a.max_new_tokens, a.temperature, a.top_p, a.seed,
                              a.batch_size, progress=not a.quiet, compile=a.compile,
                              speculative=None if a.speculative == "off" else a.speculative)
    return Sampled(tokenizer, problems, texts, prompts, samples, time.perf_counter() - t0)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomic: a temp file renamed over the target."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
