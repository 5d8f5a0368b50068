"""Passkey retrieval: the needle-in-a-haystack test of long-context models.

    nanoseek eval --model DIR --task passkey --context 4096 [--n 20 --seed 0]

A random 5-digit key is hidden at some depth of ~`context` tokens of repetitive filler (the test of
Mohtashami & Jaggi, 2023, used by YaRN; DeepSeek-V3 §4.3 shows the same test after its context
extension), and the prompt ends with "What is the pass key? The pass key is". The model passes a
case when the first number of its greedy continuation is the key. Depths spread evenly over
[0, 1] (0: the key opens the text; 1: it closes the haystack), so a model that only sees recent
tokens scores on the late depths alone; the summary reports accuracy per depth bucket too.

The filler has no information and the key appears only once (written twice in one sentence, as the
original test does), so anything but attention to the needle has no way to the answer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

INTRO = "There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. "
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyCase:
    prompt: str
    key: str
    depth: float  # where the needle sits, as a share of the filler before it
    tokens: int  # prompt length in tokens (with BOS if the encoder adds one)


def make_case(encode: Callable[[str], list[int]], context: int, depth: float, key: str) -> PasskeyCase:
    """A prompt of at most `context` tokens (as `encode` counts them) with `key` at `depth` in [0, 1]."""
    if not key.isdigit():
        raise ValueError(f"the pass key must be digits, got {key!r}")

    def build(n_fill: int) -> str:
        before = round(n_fill * depth)
        return INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (n_fill - before) + QUESTION

    fixed = len(encode(build(0)))
    if fixed > context:
        raise ValueError(f"--context {context} is too short: the question and needle alone take {fixed} tokens")
    per_fill = max(1, len(encode(FILLER * 8)) / 8)
    n_fill = int((context - fixed) / per_fill)
    while n_fill > 0 and len(encode(build(n_fill))) > context:  # BPE merges make the estimate approximate
        n_fill -= 1
    prompt = build(n_fill)
    return PasskeyCase(prompt=prompt, key=key, depth=depth, tokens=len(encode(prompt)))


def make_cases(encode: Callable[[str], list[int]], context: int, n: int, seed: int = 0) -> list[PasskeyCase]:
    """n cases, depths i/(n-1) evenly over [0, 1], keys drawn from `seed` (5 digits, no leading 0)."""
    rng = random.Random(seed)
    depths = [i / (n - 1) if n > 1 else 0.5 for i in range(n)]
    return [make_case(encode, context, d, str(rng.randint(10000, 99999))) for d in depths]


def score(completion: str, key: str) -> bool:
    """Right when the first run of digits in the completion is the key (" 12345." passes, "1234" and
    "123456" do not)."""
    m = re.search(r"\d+", completion)
    return m is not None and m.group(0) == key


def summarize(cases: list[PasskeyCase], completions: list[str], buckets: int = 5) -> dict:
    """accuracy overall and per depth bucket ([0, 0.2), ... [0.8, 1]), plus the prompt lengths."""
    right = [score(c, case.key) for case, c in zip(cases, completions)]
    per_depth: dict[str, list[bool]] = {}
    for case, ok in zip(cases, right):
        b = min(int(case.depth * buckets), buckets - 1)
        per_depth.setdefault(f"{b / buckets:.1f}-{(b + 1) / buckets:.1f}", []).append(ok)
    return {
        "accuracy": sum(right) / max(1, len(right)),
        "cases": len(right),
        "accuracy_by_depth": {k: sum(v) / len(v) for k, v in sorted(per_depth.items())},
        "prompt_tokens": [min(c.tokens for c in cases), max(c.tokens for c in cases)] if cases else [],
    }


def run(model, tokenizer, context: int, n: int = 20, seed: int = 0, max_new_tokens: int = 8,
        batch_size: int = 4) -> tuple[dict, list[dict]]:
    """Greedy passkey retrieval on the engine: (summary, one record per case)."""
    from nanoseek.inference import Engine

    if context > model.args.max_position_embeddings:
        raise ValueError(f"--context {context} exceeds the model's max_position_embeddings "
                         f"({model.args.max_position_embeddings}); extend it first (nanoseek train --extend-context)")
    encode = lambda s: tokenizer.encode(s, add_bos=True)  # noqa: E731
    cases = make_cases(encode, context - max_new_tokens, n, seed)
    engine = Engine(model, max_batch_size=batch_size, max_seq_len=context, tokenizer=tokenizer)
    outs = engine.generate([encode(c.prompt) for c in cases], max_new_tokens=max_new_tokens, ignore_eos=True)
    completions = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    summary = summarize(cases, completions)
    summary.update(task="passkey", context=context)
    records = [{"key": c.key, "depth": c.depth, "tokens": c.tokens, "completion": t, "correct": score(t, c.key)}
               for c, t in zip(cases, completions)]
    return summary, records
