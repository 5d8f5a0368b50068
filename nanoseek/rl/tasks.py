"""Verifiable tasks: problems with a reference answer that a rule can check.

    problems = arithmetic(100, seed=0, split="train", digits=3)     # "What is 482 × 37?" -> "17834"
    problems = countdown(100, seed=0, split="test", count=4)        # reach 24 with [3, 5, 2, 9]
    problems = load_problems("gsm8k_test.jsonl")                     # {"question", "answer": "... #### 42"}
    problems = load_task("arithmetic" | "countdown" | PATH, n, seed, split, digits=2, ops="+")
    rows = worked_solutions(problems)                                # cold-start SFT chat rows

A `Problem` is a prompt, a reference answer (a string) and the task name, which picks the
accuracy rule (`nanoseek.rl.rewards.accuracy_for`). Countdown's reference is the target; the
numbers are in `Problem.numbers` and in the prompt as "[a, b, c]".

Splits: every problem has a canonical key ("482*37", "3,5,9,2->24"); a problem is a test problem
when the sha256 of its key falls in the first 20% of the hash range, a train problem otherwise.
So the two splits can never share a problem, whatever the seeds and sizes, and the same seed
gives the same list. A split with too few distinct problems (1-digit sums) raises ValueError.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from nanoseek.data.corpus import DataError

TEST_FRACTION = 0.2
OPS = {"+": "+", "-": "−", "*": "×"}  # ASCII in keys and code, the usual signs in prompts


@dataclass
class Problem:
    """prompt: the question text; answer: the reference answer; task: "arithmetic" | "countdown" |
    "math" (user files) | "code" (answer = test code); numbers: countdown's allowed numbers; reward:
    which of GRPO's reward terms score it (None: all; "rm": the reward models only, for general
    prompts without a checkable answer; "rule": the other terms only; R1 §2.3.4)."""

    prompt: str
    answer: str
    task: str = "math"
    numbers: list[int] = field(default_factory=list)
    reward: str | None = None


def in_split(key: str, split: str) -> bool:
    """Whether the problem with canonical `key` belongs to `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return (h < TEST_FRACTION) == (split == "test")


def _draw(n: int, seed: int, split: str, make, what: str) -> list:
    """n distinct problems of `split` from make(rng) -> (key, problem), reproducible from seed."""
    rng = random.Random(f"{what}:{seed}:{split}")
    seen, out = set(), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"{what}: could not find {n} distinct {split} problems (only {len(out)}); "
                             f"allow larger problems")
        key, problem = make(rng)
        if key in seen or not in_split(key, split):
            continue
        seen.add(key)
        out.append(problem)
    return out


def arithmetic(n: int, seed: int = 0, split: str = "train", digits: int = 3, ops: str = "+-*") -> list[Problem]:
    """n problems "What is a op b?" with a, b of 1..`digits` digits, op from `ops` (+, -, *)."""
    if digits < 1 or not ops or any(o not in OPS for o in ops):
        raise ValueError(f"arithmetic needs digits >= 1 and ops from '+-*', got digits={digits}, ops={ops!r}")
    if 100**digits * len(ops) <= 100_000:  # small spaces (1-digit: 300 problems): count the split exactly
        have = sum(in_split(f"{a}{op}{b}", split) for a in range(10**digits) for b in range(10**digits) for op in set(ops))
        if n > have:
            raise ValueError(f"arithmetic with digits={digits}, ops={ops!r} has only {have} distinct {split} "
                             f"problems, {n} asked: ask for fewer or allow more digits")

    def make(rng):
        a, b = (rng.randint(0, 10 ** rng.randint(1, digits) - 1) for _ in range(2))
        op = rng.choice(ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return f"{a}{op}{b}", Problem(f"What is {a} {OPS[op]} {b}?", str(value), "arithmetic")

    return _draw(n, seed, split, make, f"arithmetic{digits}{ops}")


def countdown(n: int, seed: int = 0, split: str = "train", count: int = 4, max_number: int = 25,
              max_target: int = 200) -> list[Problem]:
    """n Countdown problems: reach the target with some of `count` numbers (1..max_number) and
    + − × ÷, each number at most once. Every target is reachable (it is built from the numbers)."""
    if count < 2:
        raise ValueError("countdown needs at least 2 numbers")

    def make(rng):
        while True:
            numbers = [rng.randint(1, max_number) for _ in range(count)]
            used = rng.sample(numbers, rng.randint(2, count))
            value = Fraction(used[0])
            for x in used[1:]:
                op = rng.choice("+-*/")
                if op == "/" and (value % x != 0):
                    op = "+"
                value = value + x if op == "+" else value - x if op == "-" else value * x if op == "*" else value / x
            if 1 <= value <= max_target and value.denominator == 1:
                target = int(value)
                break
        key = ",".join(map(str, sorted(numbers))) + f"->{target}"
        prompt = (f"Using the numbers {numbers}, create an equation that equals {target}. You can use "
                  f"+, -, * and /, and each number at most once.")
        return key, Problem(prompt, str(target), "countdown", numbers)

    return _draw(n, seed, split, make, f"countdown{count}-{max_number}-{max_target}")


GSM8K_ANSWER = re.compile(r"####\s*(.+?)\s*$", re.S)


def load_problems(path: str | os.PathLike, task: str = "math") -> list[Problem]:
    """User problems from JSONL: one `{"prompt" or "question": str, "answer": str|number}` per line
    (GSM8K's "reasoning ... #### 42" answers keep the part after ####, commas dropped).
    Code problems: `{"prompt": ..., "tests": "assert f(1) == 2\\n..."}` (task "code"). An optional
    "reward": "rm" | "rule" picks GRPO's reward terms per prompt ("rm" rows need no answer).
    Bad rows raise DataError naming the file and line; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected an object")
        prompt = row.get("prompt", row.get("question"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f'{path}:{n}: needs a "prompt" (or "question") string')
        choice = row.get("reward")
        if choice not in (None, "rm", "rule"):
            raise DataError(f'{path}:{n}: "reward" must be "rm" or "rule", got {choice!r}')
        if choice == "rm" and "answer" not in row and "tests" not in row:
            out.append(Problem(prompt, "", task, reward="rm"))
            continue
        if "tests" in row:
            if not isinstance(row["tests"], str):
                raise DataError(f'{path}:{n}: "tests" must be a string of Python test code')
            out.append(Problem(prompt, row["tests"], "code", reward=choice))
            continue
        answer = row.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f'{path}:{n}: needs an "answer" string or number')
        m = GSM8K_ANSWER.search(answer)
        if m:
            answer = m.group(1).replace(",", "")
        out.append(Problem(prompt, answer.strip(), task, reward=choice))
    if not out:
        raise DataError(f"{path}: no problems")
    return out


def load_task(name: str, n: int, seed: int = 0, split: str = "test", digits: int = 3,
              ops: str = "+-*") -> list[Problem]:
    """A task by name: "arithmetic" (operands up to `digits` digits, operators from `ops`), "countdown",
    or a JSONL file of problems (first n; all if n <= 0). New tasks go here as one more branch."""
    if name == "arithmetic":
        return arithmetic(n, seed, split, digits=digits, ops=ops)
    if name == "countdown":
        return countdown(n, seed, split)
    if name.endswith(".jsonl") or Path(name).is_file():
        problems = load_problems(name)
        return problems[:n] if n > 0 else problems
    raise DataError(f"unknown task {name!r}: use arithmetic, countdown or a .jsonl file of problems")


# --- cold-start SFT data ---------------------------------------------------------------------------
def worked_solution(problem: Problem) -> dict:
    """A chat row with a step-by-step solution of an arithmetic problem in `reasoning_content`
    (column by column for + and −, partial products for ×) and the answer boxed in `content`."""
    m = re.fullmatch(r"What is (\d+) (.) (\d+)\?", problem.prompt)
    if problem.task != "arithmetic" or m is None:
        raise ValueError("worked solutions exist for arithmetic problems only")
    a, sign, b = int(m.group(1)), m.group(2), int(m.group(3))
    if sign == OPS["*"]:
        steps, total = [], 0
        for place, d in enumerate(reversed(str(b))):
            part = a * int(d) * 10**place
            steps.append(f"{a} × {d}{'0' * place} = {part}")
            total += part
        steps.append(f"Adding the partial products: {' + '.join(str(a * int(d) * 10**p) for p, d in enumerate(reversed(str(b))))} = {total}.")
    elif sign == OPS["+"]:
        steps, carry, digits = [], 0, []
        xa, xb = str(a)[::-1], str(b)[::-1]
        for i in range(max(len(xa), len(xb))):
            da, db = int(xa[i]) if i < len(xa) else 0, int(xb[i]) if i < len(xb) else 0
            s = da + db + carry
            steps.append(f"{da} + {db}" + (f" + {carry} (carry)" if carry else "") + f" = {s}: write {s % 10}"
                         + (", carry 1" if s >= 10 else ""))
            digits.append(s % 10)
            carry = s // 10
        if carry:
            steps.append("write the final carry 1")
        total = a + b
        steps.append(f"So {a} + {b} = {total}.")
    else:
        total = a - b
        if a >= b:
            steps = [f"{a} is at least {b}, so the result is {a} − {b} = {total}.",
                     f"Check: {total} + {b} = {total + b}."]
        else:
            steps = [f"{b} is larger than {a}, so the result is negative: −({b} − {a}).",
                     f"{b} − {a} = {b - a}, so the answer is {total}."]
    assert str(total) == problem.answer
    return {"messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "content": f"The answer is \\boxed{{{total}}}.",
                          "reasoning_content": "\n".join(steps)}]}


def worked_solutions(problems: list[Problem]) -> list[dict]:
    return [worked_solution(p) for p in problems]
