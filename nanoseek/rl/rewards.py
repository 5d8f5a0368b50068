"""Rule rewards (R1 §2.2.2): plain functions `reward(prompt, completion, answer) -> float`.

    accuracy      the final answer equals the reference (numbers, fractions, symbolic)    0 or 1
    countdown     the final answer is an equation over the prompt's numbers hitting the target
    code          the completion's Python passes the reference test code in the sandbox
    format        R1-Zero tags `<think>…</think> <answer>…</answer>`, or the R1 chat layout
    language      share of the reasoning's words written in the target language (R1 §2.3.3)
    equations     every equation the completion states ("7 + 6 = 13", "9 + 0 + 1 (carry) = 10") holds

    fn = combine(parse_rewards(["accuracy=1", "format=0.1", "my_module:my_fn=0.5"]))
    fn(prompt, completion, answer)  # 1·accuracy + 0.1·format + 0.5·my_fn

**Where the answer is** (`extract_answer`): the text after the last `</think>` if there is one
(the reasoning is never graded), then
1. `\\boxed{...}` (nested braces balanced, `\\fbox` too): the boxed contents;
2. otherwise `<answer>...</answer>`: its contents (a `\\boxed{}` inside still wins);
3. otherwise nothing: `None`, reward 0. (No guessing from the last number: a model must state
   its answer in the agreed form, or reward hacking by listing numbers would pay.)
Several answers: if they all normalise to the same value that is the answer, if they differ the
completion hedged and gets `None` (reward 0).

**Comparing** (`same_answer`): first the rule below; when it says no, both sides are not plain
numbers (two different numbers are simply different) and `math-verify` is installed (pip install math-verify), its `parse`/`verify` get the last word (LaTeX, sets,
intervals, symbolic equality such as `x+1` = `1+x`). The rule, the whole check without it: both
sides are normalised (NFKC and every Unicode decimal digit to ASCII, so `４２` and `٤٢` are 42;
`−` → `-`; `$`, `\\text{}`, `\\left`/`\\right`, spaces, a trailing period and thousands commas in
well-formed groups are dropped) and compared as exact numbers when both parse as one (integers,
decimals, `a/b`, `\\frac{a}{b}`, a percent sign kept as written), else as strings. A malformed
number ("1,23.4", "4 2", "--5") does not parse and so matches only the identical string.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from fractions import Fraction
from typing import Callable

from .sandbox import run_python

Reward = Callable[[str, str, str], float]
THINK_END = "</think>"


# --- extraction ------------------------------------------------------------------------------------
def _boxed(text: str) -> list[str]:
    """Contents of every \\boxed{...} / \\fbox{...} with balanced braces, in order."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end():i - 1])
    return out


def final_part(completion: str) -> str:
    """The text after the last </think> (all of it when there is none)."""
    return completion.rsplit(THINK_END, 1)[-1]


def extract_answers(completion: str) -> list[str]:
    """Every stated final answer (see the module docstring), in order."""
    text = final_part(completion)
    boxed = _boxed(text)
    if boxed:
        return boxed
    return re.findall(r"<answer>(.*?)</answer>", text, re.S)


def extract_answer(completion: str) -> str | None:
    """The final answer, or None when there is none or several that disagree."""
    answers = extract_answers(completion)
    if not answers:
        return None
    keys = {normalize(a) for a in answers}
    return answers[-1].strip() if len(keys) == 1 else None


# --- comparison ------------------------------------------------------------------------------------
def ascii_digits(text: str) -> str:
    """NFKC, then every Unicode decimal digit (Arabic-Indic, Devanagari, ...) as its ASCII digit."""
    s = unicodedata.normalize("NFKC", text)
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() and not c.isascii() else c for c in s)


def normalize(text: str) -> str:
    """Canonical form for comparing and voting (see the module docstring)."""
    s = ascii_digits(text).replace("\u2212", "-")
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;)", "", s)
    s = s.replace("$", "").replace(" ", "").strip().rstrip(".")
    s = re.sub(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", s)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    value = to_number(s)
    return s if value is None else _fmt(value)


def to_number(s: str) -> Fraction | None:
    """An exact number from "42", "-3.5", "7/8" (already normalised), or None."""
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?", s):
        return None
    try:
        num, _, den = s.partition("/")
        value = Fraction(num)
        return value / Fraction(den) if den else value
    except (ValueError, ZeroDivisionError):
        return None


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _math_verify():
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def same_answer(given: str, reference: str) -> bool:
    """Whether an extracted answer equals the reference: math-verify when installed, else the
    numeric/string fallback."""
    a, b = normalize(given), normalize(reference)
    if a == b:
        return True
    if to_number(a) is not None and to_number(b) is not None:
        return False  # two exact numbers that differ: nothing for math-verify to add (and it is slow)
    mv = _math_verify()
    if mv is None:
        return False
    try:
        gold = mv.parse(f"${ascii_digits(reference)}$")
        pred = mv.parse(f"${ascii_digits(given)}$")
        return bool(gold and pred and mv.verify(gold, pred))
    except Exception:  # its parsers and timeouts raise many kinds: not a match
        return False


# --- the rewards -----------------------------------------------------------------------------------
def accuracy(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals `answer`, else 0.0."""
    given = extract_answer(completion)
    return float(given is not None and same_answer(given, answer))


def countdown_value(expression: str, numbers: list[int]) -> Fraction | None:
    """The exact value of an arithmetic expression over `numbers` (each at most once), or None when
    it uses other numbers, reuses one, or is not plain + − × ÷ and parentheses."""
    expr = unicodedata.normalize("NFKC", expression).replace("×", "*").replace("÷", "/").replace("−", "-")
    expr = expr.split("=")[0].strip()
    if not expr or not re.fullmatch(r"[\d\s+\-*/().]+", expr) or "**" in expr or "//" in expr:
        return None
    used = [int(x) for x in re.findall(r"\d+", expr)]
    pool = list(numbers)
    for x in used:
        if x not in pool:
            return None
        pool.remove(x)
    try:
        # Only digits, operators and parentheses reach eval: integers become Fractions, so ÷ is exact.
        value = eval(re.sub(r"(\d+)", r"Fraction(\1)", expr), {"__builtins__": {}}, {"Fraction": Fraction})
    except Exception:  # syntax errors, division by zero, absurd nesting
        return None
    return value if isinstance(value, Fraction) else None


def countdown_numbers(prompt: str) -> list[int]:
    """The numbers of a countdown prompt, written "[a, b, c]"."""
    m = re.search(r"\[([\d,\s]+)\]", prompt)
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else []


def countdown(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the final answer is an equation over the prompt's numbers equal to `answer` (the target)."""
    given = extract_answer(completion)
    if given is None:
        return 0.0
    value = countdown_value(given, countdown_numbers(prompt))
    return float(value is not None and value == Fraction(answer))


def code_block(completion: str) -> str:
    """The last ```python (or plain ```) block of the final part; the whole final part if none."""
    blocks = re.findall(r"```(?:python|py)?\s*\n(.*?)```", final_part(completion), re.S)
    return blocks[-1] if blocks else final_part(completion)


def code(prompt: str, completion: str, answer: str, timeout: float = 5.0, memory_mb: int = 512) -> float:
    """1.0 when the completion's code followed by the test code `answer` exits cleanly in the sandbox."""
    return float(run_python(code_block(completion) + "\n\n" + answer, timeout=timeout, memory_mb=memory_mb).ok)


ZERO_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.S)


def format_zero(prompt: str, completion: str, answer: str) -> float:
    """R1-Zero: exactly `<think> … </think> <answer> … </answer>` and nothing else."""
    ok = ZERO_FORMAT.fullmatch(completion) and completion.count("<think>") == 1 and completion.count(THINK_END) == 1
    return float(bool(ok))


def format_r1(prompt: str, completion: str, answer: str) -> float:
    """R1 chat: reasoning closed by one `</think>` (opened by the prompt or by the completion), then a
    non-empty answer."""
    if completion.count(THINK_END) != 1 or completion.count("<think>") > 1:
        return 0.0
    head, tail = completion.split(THINK_END)
    if "<think>" in head and not head.lstrip().startswith("<think>"):
        return 0.0
    return float(bool(head.replace("<think>", "").strip()) and bool(tail.strip()))


def format_reward(prompt: str, completion: str, answer: str) -> float:
    """Either format: R1-Zero tags or the R1 chat layout."""
    return max(format_zero(prompt, completion, answer), format_r1(prompt, completion, answer))


# "a op b [op c ...] = d" over integers, + − × only (a worked sum's steps; "(carry)"-style notes are
# dropped first); numbers inside decimals or thousands groups ("1.5", "1,000") are not equations' terms
EQUATION = re.compile(r"(?<![\d.,])(\d+(?:\s*[-+*]\s*\d+)+)\s*=\s*(-?\d+)(?![.,]?\d)")


def _integer_value(expr: str) -> int:
    """The value of integers joined by + - * ("9 + 0 + 1", "3 * 4 - 2"), * binding tighter."""
    tokens = re.findall(r"\d+|[-+*]", expr)
    total, sign, product = 0, 1, int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        if op == "*":
            product *= int(number)
        else:
            total, sign, product = total + sign * product, 1 if op == "+" else -1, int(number)
    return total + sign * product


def equations(prompt: str, completion: str, answer: str) -> float:
    """1.0 when every integer equation the completion states holds (vacuously when it states none),
    else 0.0: a filter on the chain of thought for rejection sampling, where a right final answer
    can follow a wrong step ("So 13 + 66 = 89."), which distillation would then teach."""
    text = unicodedata.normalize("NFKC", completion).replace("×", "*").replace("−", "-")
    text = re.sub(r"\s*\([a-z ]*\)", "", text)  # "1 (carry)" -> "1"
    ok = all(_integer_value(m.group(1)) == int(m.group(2)) for m in EQUATION.finditer(text))
    return float(ok)


SCRIPTS = {
    "en": lambda w: all("a" <= c.lower() <= "z" for c in w),
    "zh": lambda w: all("\u4e00" <= c <= "\u9fff" for c in w),
}


def language(prompt: str, completion: str, answer: str, lang: str = "en") -> float:
    """Share of the reasoning's words in the target language's script (R1 §2.3.3): words are runs
    of letters (numbers and symbols do not count); Chinese counts each Han character as a word.
    No reasoning (no </think>) or no words: 0.0."""
    if THINK_END not in completion:
        return 0.0
    thoughts = completion.rsplit(THINK_END, 1)[0].replace("<think>", "")
    words = re.findall(r"[^\W\d_]+", thoughts)
    words = [c for w in words for c in (list(w) if re.search(r"[\u4e00-\u9fff]", w) else [w])]
    if not words:
        return 0.0
    return sum(SCRIPTS[lang](w) for w in words) / len(words)


REWARDS: dict[str, Reward] = {
    "accuracy": accuracy, "countdown": countdown, "code": code, "format": format_reward,
    "format_zero": format_zero, "format_r1": format_r1, "language": language, "equations": equations,
}


def resolve(name: str) -> Reward:
    """A reward by name (REWARDS) or import path "module:function"; ValueError if neither."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}: use one of {', '.join(REWARDS)} or module:function")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import {module!r} ({e})") from None
    except AttributeError:
        raise ValueError(f"reward {name!r}: {module!r} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def parse_rewards(specs: list[str]) -> list[tuple[str, Reward, float]]:
    """["accuracy=1", "format=0.1", "pkg.mod:fn"] -> [(name, fn, weight)]; weight defaults to 1.
    The weight is after the last '='."""
    out = []
    for spec in specs:
        name, eq, weight = spec.rpartition("=") if "=" in spec else (spec, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"--reward {spec!r}: the weight {weight!r} is not a number") from None
        out.append((name, resolve(name), w))
    return out


def combine(rewards: list[tuple[str, Reward, float]]) -> Reward:
    """The weighted sum of several rewards, as one reward function."""
    def total(prompt: str, completion: str, answer: str) -> float:
        return sum(w * float(fn(prompt, completion, answer)) for _, fn, w in rewards)
    return total


def accuracy_for(task: str) -> Reward:
    """The correctness rule of a task: countdown's equation check, the sandboxed tests for code,
    answer comparison otherwise."""
    return countdown if task == "countdown" else code if task == "code" else accuracy
