"""Reinforcement-learning pieces that need no model: verifiable tasks, rule rewards, the code sandbox.

    tasks.py    arithmetic and Countdown generators (disjoint seeded splits), user JSONL problems
                (GSM8K answers too), worked solutions for cold-start SFT
    rewards.py  accuracy / countdown / code / format / language rewards, user rewards by import
                path, weighted sums from `--reward name=weight`
    sandbox.py  a separate, limited process for model-written code
    grpo.py     the GRPO loss and group-relative advantages (pure functions)
    rollout.py  G completions per prompt on the inference engine, log-probs, routing replay
"""

from .grpo import group_advantages, grpo_loss

__all__ = ["group_advantages", "grpo_loss"]
