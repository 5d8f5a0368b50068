"""The R1 paper's evaluation metrics (DeepSeek-R1 §3, "Evaluation Setup").

    pass_at_k(n, c, k)                  unbiased pass@k from n samples of which c are correct
    cons_at_k(answers, reference, k)    majority vote over the first k extracted answers
    paired_difference(before, after)    pass@1 after - before on the same problems, with its paired
                                        standard error (is an improvement larger than the noise?)

R1 reports pass@1 as the mean correctness of k samples per problem (temperature 0.6, top-p 0.95),
which is `pass_at_k(k, c, 1)` = c / k averaged over problems, and cons@64, the accuracy of the
majority answer of 64 samples.
"""

from __future__ import annotations

from collections import Counter
from math import comb, sqrt

from nanoseek.rl.rewards import normalize, same_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is
    correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021). Needs 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority(answers: list[str | None]) -> str | None:
    """The most common answer (compared after `nanoseek.rl.rewards.normalize`); None answers do not
    vote. Ties go to the answer whose first occurrence comes first. None if nobody answered."""
    keys = [None if a is None else normalize(a) for a in answers]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return None
    best = max(counts.values())
    for a, key in zip(answers, keys):
        if key is not None and counts[key] == best:
            return a
    return None


def cons_at_k(answers: list[str | None], reference: str, k: int) -> float:
    """1.0 if the majority answer of answers[:k] equals the reference (`same_answer`), else 0.0."""
    if k < 1:
        raise ValueError(f"cons_at_k needs k >= 1, got {k}")
    winner = majority(answers[:k])
    return float(winner is not None and same_answer(winner, reference))


def paired_difference(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict:
    """Change of pass@1 between two evaluations of the same problems, paired by problem.

    before/after: problem key (its prompt) -> the correctness of each of its samples (1.0 correct).
    Each problem contributes d = mean(after) - mean(before); the change is mean(d) and its standard
    error sd(d) / sqrt(n) (sample sd, n - 1): pairing removes the spread of problem difficulty, which
    dominates the unpaired error of two pass@1 figures. Raises ValueError when the problem sets differ.
    Returns {"problems", "before", "after", "delta", "se", "up", "down"} (up/down: problems whose
    mean correctness rose/fell)."""
    if set(before) != set(after):
        only_b, only_a = len(set(before) - set(after)), len(set(after) - set(before))
        raise ValueError(f"the two evaluations cover different problems ({only_b} only in the baseline, "
                         f"{only_a} only in this one): use the same --task, --split, --n, --seed and --digits")
    if not before:
        raise ValueError("no problems to compare")
    mean = {k: (sum(v) / len(v)) for k, v in before.items()}, {k: (sum(v) / len(v)) for k, v in after.items()}
    d = [mean[1][k] - mean[0][k] for k in before]
    n = len(d)
    delta = sum(d) / n
    se = sqrt(sum((x - delta) ** 2 for x in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"problems": n, "before": sum(mean[0].values()) / n, "after": sum(mean[1].values()) / n,
            "delta": delta, "se": se, "up": sum(x > 0 for x in d), "down": sum(x < 0 for x in d)}
