"""Verifiable tasks, rule rewards and the code sandbox."""

import json
import os
import time
from fractions import Fraction

import pytest

from nanoseek.data import DataError
from nanoseek.rl import rewards as R
from nanoseek.rl.sandbox import run_python
from nanoseek.rl.tasks import arithmetic, countdown, in_split, load_problems, load_task, worked_solution


# --- tasks ------------------------------------------------------------------------------------------
def test_splits_are_disjoint_and_reproducible():
    train = arithmetic(300, seed=0, split="train", digits=2)
    test = arithmetic(100, seed=5, split="test", digits=2)
    assert {p.prompt for p in train}.isdisjoint({p.prompt for p in test})
    assert len({p.prompt for p in train}) == 300  # distinct within a split
    assert arithmetic(300, seed=0, split="train", digits=2) == train
    assert arithmetic(300, seed=1, split="train", digits=2) != train
    for p in train[:50]:
        a, op, b = p.prompt[len("What is "):-1].split(" ")
        assert str(eval(f"{a}{ {'×': '*', '−': '-', '+': '+'}[op] }{b}")) == p.answer
    cd_train, cd_test = countdown(200, seed=0, split="train"), countdown(50, seed=0, split="test")
    assert {(tuple(sorted(p.numbers)), p.answer) for p in cd_train}.isdisjoint(
        {(tuple(sorted(p.numbers)), p.answer) for p in cd_test})
    # only 100 sums of two digits exist: a request for more than the split holds fails at once, naming the count
    sums = {f"What is {a} + {b}?" for a in range(10) for b in range(10) if in_split(f"{a}+{b}", "test")}
    assert {p.prompt for p in arithmetic(len(sums), split="test", digits=1, ops="+")} == sums
    with pytest.raises(ValueError, match=f"only {len(sums)} distinct test problems, {len(sums) + 1} asked"):
        arithmetic(len(sums) + 1, split="test", digits=1, ops="+")
    assert {p.prompt.split()[3] for p in load_task("arithmetic", 30, split="train", digits=2, ops="+-")} == {"+", "−"}
    assert in_split("x", "train") != in_split("x", "test")


def test_countdown_targets_are_reachable_and_checked():
    for p in countdown(20, seed=3):
        assert R.countdown_numbers(p.prompt) == p.numbers and 1 <= int(p.answer) <= 200
    prompt = "Using the numbers [3, 5, 2, 9], create an equation that equals 24."
    assert R.countdown(prompt, r"</think> \boxed{(9 - 5) × 3 × 2}", "24") == 1.0
    assert R.countdown(prompt, r"<answer>(9 + 3) * 2 = 24</answer>", "24") == 1.0
    assert R.countdown(prompt, r"\boxed{3 * 8}", "24") == 0.0  # 8 is not given
    assert R.countdown(prompt, r"\boxed{(9+3)*2 + 3 - 3}", "24") == 0.0  # 3 used twice
    assert R.countdown(prompt, r"\boxed{9 / (5 - 5)}", "24") == 0.0
    assert R.countdown(prompt, r"\boxed{__import__('os')}", "24") == 0.0
    assert R.countdown_value("9 / 2 * 5 + 3 - 2", [9, 2, 5, 3, 2]) == Fraction(45, 2) + 1


def test_load_problems_gsm8k_and_errors(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "Sam has 3 ...", "answer": "3 + 39 = 42\n#### 1,042"}) + "\n\n"
                    + json.dumps({"prompt": "2+2", "answer": 4}) + "\n"
                    + json.dumps({"prompt": "f", "tests": "assert f() == 1"}) + "\n")
    probs = load_problems(path)
    assert [(p.answer, p.task) for p in probs] == [("1042", "math"), ("4", "math"), ("assert f() == 1", "code")]
    assert load_task(str(path), 2) == probs[:2]
    path.write_text(json.dumps({"prompt": "q", "answer": "1"}) + "\n" + '{"prompt": "q"}\n')
    with pytest.raises(DataError, match=r"gsm\.jsonl:2: needs an \"answer\""):
        load_problems(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"gsm\.jsonl:1: expected an object"):
        load_problems(path)
    with pytest.raises(DataError, match="unknown task"):
        load_task("algebra", 3)


def test_worked_solutions_are_right_and_encodable():
    from nanoseek.data import load_deepseek_v3
    from nanoseek.data.chat import encode_chat

    tok = load_deepseek_v3()
    for p in arithmetic(30, seed=2, digits=3):
        row = worked_solution(p)
        reply = row["messages"][1]
        assert R.accuracy(p.prompt, f"<think>\n{reply['reasoning_content']}\n</think>\n\n{reply['content']}",
                          p.answer) == 1.0
        ids, mask = encode_chat(tok, row["messages"])
        assert any(mask)
    with pytest.raises(ValueError, match="arithmetic problems only"):
        worked_solution(countdown(1)[0])


# --- rewards ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("completion, answer, expected", [
    (r"<think>maybe \boxed{41}</think> The answer is \boxed{42}.", "42", 1.0),  # reasoning is not graded
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "3/4", 1.0),
    (r"\boxed{\frac{84}{2}}", "42", 1.0),  # nested braces
    (r"\boxed{1,234}", "1234", 1.0),
    (r"\boxed{1,23.4}", "123.4", 0.0),  # malformed thousands groups are not a number
    (r"\boxed{4 2}", "42", 1.0),  # spaces are dropped before comparing
    (r"\boxed{4.2.1}", "4.2", 0.0),
    (r"\boxed{1..5}", "1.5", 0.0),
    (r"\boxed{12a}", "12", 0.0),
    (r"\boxed{４２}", "42", 1.0),  # full-width digits
    (r"\boxed{٤٢}", "42", 1.0),  # Arabic-Indic digits
    (r"\boxed{−7}", "-7", 1.0),  # Unicode minus
    ("<answer> 42 </answer>", "42", 1.0),
    ("The answer is 42.", "42", 0.0),  # no agreed form, no reward
    (r"\boxed{42} or maybe \boxed{43}", "42", 0.0),  # hedging
    (r"\boxed{42} so \boxed{42.0}", "42", 1.0),  # several that agree
    (r"\boxed{42", "42", 0.0),  # unclosed
    ("", "42", 0.0),
])
def test_accuracy_on_tricky_strings(completion, answer, expected):
    assert R.accuracy("", completion, answer) == expected


def test_accuracy_symbolic_and_fallback(monkeypatch):
    assert R.accuracy("", r"\boxed{x + 1}", "x+1") == 1.0  # the string rule
    monkeypatch.setattr(R, "_math_verify", lambda: None)  # the documented fallback alone
    assert R.accuracy("", r"\boxed{1/2}", "0.5") == 1.0
    assert R.accuracy("", r"\boxed{1 + x}", "x+1") == 0.0  # symbolic equality needs math-verify
    assert R.extract_answer(r"\boxed{a{b}c} and \fbox{a{b}c}") == "a{b}c"
    # two plain numbers are decided by the rule alone: math-verify (slow, GRPO grades every completion) is not asked
    asked = []
    monkeypatch.setattr(R, "_math_verify", lambda: asked.append(1))
    assert R.accuracy("", r"\boxed{97}", "98") == 0.0 and R.accuracy("", r"\boxed{0.5}", "1/2") == 1.0
    assert not asked
    assert R.accuracy("", r"\boxed{\sqrt{4}}", "2") == 0.0 and asked  # not a plain number: math-verify's call


def test_math_verify_decides_symbolic_equality():
    pytest.importorskip("math_verify")
    assert R.accuracy("", r"\boxed{1 + x}", "x+1") == 1.0
    assert R.accuracy("", r"\boxed{\sqrt{4}}", "2") == 1.0
    assert R.accuracy("", r"\boxed{3}", "2") == 0.0


def test_format_and_language():
    assert R.format_zero("", "<think> a </think> <answer> 4 </answer>", "") == 1.0
    assert R.format_zero("", "<think> a </think> <answer> 4 </answer> extra", "") == 0.0
    assert R.format_zero("", "<answer>4</answer>", "") == 0.0
    assert R.format_r1("", "step one\n</think>\n\nIt is 4.", "") == 1.0  # the prompt opened <think>
    assert R.format_r1("", "<think>\nstep\n</think>\n\n4", "") == 1.0
    assert R.format_r1("", "</think> 4", "") == 0.0  # empty reasoning
    assert R.format_r1("", "step </think> 4 </think> 5", "") == 0.0
    assert R.format_r1("", "step </think>   ", "") == 0.0  # no answer
    assert R.format_reward("", "<think> a </think> <answer> 4 </answer>", "") == 1.0
    assert R.language("", "<think>we add the two numbers</think> 4", "") == 1.0
    assert R.language("", "<think>we add 两个 numbers</think> 4", "") == pytest.approx(3 / 5)
    assert R.language("", "<think>我们 add</think>", "", lang="zh") == pytest.approx(2 / 3)
    assert R.language("", "no reasoning at all", "") == 0.0


@pytest.mark.parametrize("completion, expected", [
    ("9 + 4 = 13: write 3, carry 1\n9 + 0 + 1 (carry) = 10: write 0\nSo 99 + 4 = 103.</think>\\boxed{103}", 1.0),
    ("9 + 4 = 13: write 3, carry 1\n9 + 0 + 1 (carry) = 10: write 0\nSo 95 + 4 = 103.</think>\\boxed{103}", 0.0),
    ("9 + 0 + 1 (carry) = 11", 0.0),  # the carry note dropped, the sum still checked
    ("The answer is \\boxed{7}.", 1.0),  # no equation: nothing false was said
    ("2 + 3 * 4 = 14 and 10 - 2 - 3 = 5", 1.0), ("2 + 3 * 4 = 20", 0.0), ("3 - 5 = -2", 1.0),
    ("3 × 4 = 12", 1.0), ("3 × 4 = 11", 0.0), ("05 + 3 = 8", 1.0),
    ("1.5 + 2 = 3.5 and 2 + 2 = 5.0 and 1,000 + 5 = 1,005", 1.0),  # decimals / thousands: not checked
])
def test_equations_reward_checks_every_stated_step(completion, expected):
    assert R.equations("", completion, "") == expected
    assert R.resolve("equations") is R.equations


def test_reward_specs_and_user_functions(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def short(prompt, completion, answer):\n"
                                            "    return 1.0 if len(completion) < 20 else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    specs = R.parse_rewards(["accuracy=1", "format=0.5", "my_rewards:short=0.25"])
    assert [(n, w) for n, _, w in specs] == [("accuracy", 1.0), ("format", 0.5), ("my_rewards:short", 0.25)]
    total = R.combine(specs)
    assert total("", r"a</think>\boxed{4}", "4") == pytest.approx(1.75)
    assert R.parse_rewards(["accuracy"])[0][2] == 1.0
    for bad, msg in [("nope", "unknown reward"), ("accuracy=x", "not a number"), ("no_such_mod:f", "cannot import"),
                     ("my_rewards:missing", "has no 'missing'")]:
        with pytest.raises(ValueError, match=msg):
            R.parse_rewards([bad])


# --- sandbox ----------------------------------------------------------------------------------------
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


@pytest.mark.parametrize("completion, expected", [
    ("```python\ndef add(a, b):\n    return a + b\n```", 1.0),
    ("```python\ndef add(a, b):\n    return a - b\n```", 0.0),
    ("```python\ndef add(a, b):\n    while True:\n        pass\n```", 0.0),  # infinite loop
    ("```python\nx = bytearray(1 << 40)\ndef add(a, b): return a + b\n```", 0.0),  # memory bomb
    ("```python\nimport os\nwhile True:\n    os.fork()\n```", 0.0),  # fork bomb
    ("```python\nopen('/tmp/nanoseek_sandbox_escape', 'w').write('x')\ndef add(a, b): return a + b\n```", 0.0),
    ("```python\nimport subprocess\nsubprocess.run(['true'])\ndef add(a, b): return a + b\n```", 0.0),
    ("```python\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\ndef add(a, b): return a + b\n```", 0.0),
    ("```python\nopen('scratch.txt', 'w').write('ok')\ndef add(a, b): return a + b\n```", 1.0),  # own dir is fine
])
def test_code_reward_in_the_sandbox(completion, expected):
    t0 = time.monotonic()
    assert R.code("", completion, TESTS, timeout=2.0, memory_mb=256) == expected
    assert time.monotonic() - t0 < 30  # killed within its limits (generous: the machine is shared)
    assert not os.path.exists("/tmp/nanoseek_sandbox_escape")


def test_sandbox_limits_and_cleanup():
    r = run_python("import os\nprint(os.getcwd())", timeout=5)
    assert r.ok and r.stdout.strip().startswith("/") and not os.path.exists(r.stdout.strip())  # dir removed
    r = run_python("while True: print('x' * 4096)", timeout=5)
    assert not r.ok and len(r.stdout) <= 1 << 20  # output bounded on disk, not buffered here
    r = run_python("import time\ntime.sleep(30)", timeout=1)
    assert r.reason == "timeout"
    assert run_python("import sys\nsys.exit(3)").reason == "exit 3"
