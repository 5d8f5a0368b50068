"""Evaluation on verifiable tasks: the R1 metrics and a sampler on the inference engine.

    metrics.py  pass_at_k (unbiased), cons_at_k (majority vote), the vote's tie-breaking, paired_difference
    runner.py   prompts (chat / R1-Zero templates), k completions per problem with continuous
                batching, grading with the rule rewards, the summary; chat rows for rejection sampling

The stages `nanoseek eval` and `nanoseek sample` (nanoseek/stages/) drive them.
"""

from .metrics import cons_at_k, majority, paired_difference, pass_at_k

__all__ = ["pass_at_k", "cons_at_k", "majority", "paired_difference"]
