"""Generative reward (DeepSeek-V3 §5.2): a judge model writes its reasoning, then a score.

    judge = JudgeReward("runs/judge", template=None, max_new_tokens=256)   # any nanoseek checkpoint
    rewards = judge.score(prompts, completions)                            # in [0, 1], batched
    judge.stats()  # {"genrm/missing": 1, "genrm/out_of_range": 0, ...} since the last call

`nanoseek grpo --reward genrm:DIR=W [--genrm-template FILE] [--genrm-max-tokens N]`. Each completion's
final answer (reasoning before </think> left out, as for `rm:`) is put into the template with the
question, rendered as one user turn with the judge's own chat template, and all of a group's judge
prompts are decoded together on `nanoseek.inference.Engine` (continuous batching, greedy, so a
verdict is reproducible). The score is read from the judge's final text (after its own </think>, if
it reasons R1-style): the last "Score: N" (also "score = N", "score is N", "**Score:** N/10") or,
failing that, the last \\boxed{N}. The reward is N / 10 for N in [0, 10]; a verdict without a score,
with a score outside [0, 10], or a judge prompt longer than the judge's context gives reward 0 and is
counted (logged per step as genrm/missing, genrm/out_of_range, genrm/too_long), never an error.

Templates: Python format strings over {prompt} and {completion} (and {answer}, the task's reference
answer, empty for rows without one); literal braces are doubled. A template file must use
{completion}; any other field is a one-line error when the run starts.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from nanoseek.checkpoint import CheckpointError, load, resolve_model_dir
from nanoseek.inference import Engine, chat_prompt, split_reasoning

MAX_SCORE = 10
FIELDS = {"prompt", "completion", "answer"}
DEFAULT_TEMPLATE = """You are judging a reply to a user's request. Think about whether it is correct, helpful and \
clear, then end with a line "Score: N", N an integer from 0 (useless) to 10 (excellent).

[Request]
{prompt}

[Reply]
{completion}"""

# "Score: 7", "score = 7.5", "Score is 7", "**Score:** 7/10" (the /10 is read as the scale, not a division)
SCORE = re.compile(r"score[^\w-]{0,4}(?:is\s+|of\s+)?\**\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+))?", re.IGNORECASE)
BOXED = re.compile(r"\\boxed\{\s*(-?\d+(?:\.\d+)?)\s*\}")


def parse_score(text: str, max_score: float = MAX_SCORE) -> tuple[float | None, str]:
    """A judge's output -> (score or None, "ok" | "missing" | "out_of_range"). Reads the text after the
    judge's reasoning (</think>) when it has one, the last "Score: N" there, else the last \\boxed{N};
    "N/D" with D other than max_score is out of range (another scale than the one asked for)."""
    if "</think>" in text:
        text = split_reasoning(text)[1]
    m = (SCORE.findall(text) or [None])[-1]
    if m is None:
        boxed = BOXED.findall(text)
        if not boxed:
            return None, "missing"
        m = (boxed[-1], "")
    value, scale = float(m[0]), m[1]
    if scale and float(scale) != max_score:
        return None, "out_of_range"
    if not 0 <= value <= max_score:
        return None, "out_of_range"
    return value, "ok"


def read_template(path: str | Path | None) -> str:
    """The built-in template (None) or a file's; ValueError naming the file and what is wrong."""
    if path is None:
        return DEFAULT_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--genrm-template {path}: cannot read ({e})") from None
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise ValueError(f"--genrm-template {path}: not a format string ({e}); double literal braces") from None
    if bad := fields - FIELDS:
        raise ValueError(f"--genrm-template {path}: unknown field(s) {sorted(bad)}; use {{prompt}}, {{completion}}, "
                         f"{{answer}} (double literal braces)")
    if "completion" not in fields:
        raise ValueError(f"--genrm-template {path}: it never shows the judge the {{completion}}")
    return text


class JudgeReward:
    """A checkpoint as a generative judge: a GRPO reward term scored per group in batches
    (`batched = True`: the stage calls `score`, and merges `stats()` into the step's record)."""

    batched = True

    def __init__(self, path, device="cpu", template: str | Path | None = None, max_new_tokens: int = 256,
                 batch_size: int = 16, name: str = "genrm"):
        from nanoseek.data import Tokenizer

        self.template = read_template(template)
        self.path = resolve_model_dir(path)
        if not (self.path / "tokenizer.json").is_file():
            raise CheckpointError(f"{self.path}: a judge needs its tokenizer.json next to it")
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.model = load(self.path, device=device).eval().requires_grad_(False)
        self.max_new_tokens = max_new_tokens
        self.context = self.model.args.max_position_embeddings
        if max_new_tokens >= self.context:
            raise ValueError(f"--genrm-max-tokens {max_new_tokens} leaves no room for the judge's prompt "
                             f"(context {self.context})")
        self.engine = Engine(self.model, max_batch_size=batch_size, max_seq_len=self.context, tokenizer=self.tokenizer,
                             speculative=None, compile=False)
        self.name = name
        self.counts = {"missing": 0, "out_of_range": 0, "too_long": 0}
        self.judged = 0

    def prompt_ids(self, prompt: str, completion: str, answer: str = "", in_reasoning: bool = False) -> list[int]:
        """The judge's prompt: the template filled with the question and the completion's final answer."""
        reply = split_reasoning(completion, in_reasoning)[1]
        text = self.template.format(prompt=prompt, completion=reply, answer=answer)
        return chat_prompt(self.tokenizer, [{"role": "user", "content": text}])

    def judge(self, prompts: list[str], completions: list[str], answers: list[str] | None = None,
              in_reasoning: bool = False) -> list[str]:
        """The judge's verdict texts, decoded together (greedy); "" for a prompt over the context."""
        ids = [self.prompt_ids(p, c, a or "", in_reasoning)
               for p, c, a in zip(prompts, completions, answers or [""] * len(prompts))]
        room = self.context - self.max_new_tokens
        fits = [i for i, x in enumerate(ids) if len(x) <= room]
        texts = [""] * len(ids)
        with torch.inference_mode():
            outs = self.engine.generate([ids[i] for i in fits], max_new_tokens=self.max_new_tokens, temperature=0.0,
                                        speculative=None) if fits else []
        for i, out in zip(fits, outs):
            texts[i] = self.tokenizer.decode(out, skip_special_tokens=True)
        self.counts["too_long"] += len(ids) - len(fits)
        return texts

    def score(self, prompts: list[str], completions: list[str], in_reasoning: bool = False,
              answers: list[str] | None = None) -> list[float]:
        """Rewards in [0, 1]: the judge's score / 10; 0 (counted) when it gives none or one out of range."""
        texts = self.judge(prompts, completions, answers, in_reasoning)
        rewards = []
        for text in texts:
            value, status = parse_score(text) if text else (None, "too_long")
            if status in ("missing", "out_of_range"):
                self.counts[status] += 1
            rewards.append(0.0 if value is None else value / MAX_SCORE)
        self.judged += len(texts)
        return rewards

    def stats(self) -> dict[str, int]:
        """Counts since the last call: {NAME/missing, NAME/out_of_range, NAME/too_long, NAME/judged}."""
        out = {f"{self.name}/{k}": v for k, v in self.counts.items()} | {f"{self.name}/judged": self.judged}
        self.counts = dict.fromkeys(self.counts, 0)
        self.judged = 0
        return out
