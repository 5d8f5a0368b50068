"""Reinforcement-learning pieces that need no model: verifiable tasks, rule rewards, the code sandbox.

    tasks.py    arithmetic and Countdown generators (disjoint seeded splits), user JSONL problems
                (GSM8K answers too), worked solutions for cold-start SFT
    rewards.py  accuracy / countdown / code / format / language rewards, user rewards by import
                path, weighted sums from `--reward name=weight`
    sandbox.py  a separate, limited process for model-written code
"""
