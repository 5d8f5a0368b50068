"""Chat prompts from the tokenizer's own template (R1-style replies are split by `reasoning.py`).

DeepSeek-V3's template renders `<｜begin▁of▁sentence｜>{system}<｜User｜>{q}<｜Assistant｜>{a}<｜end▁of▁sentence｜>...`
and ends with `<｜Assistant｜>` when a reply is wanted. DeepSeek-R1's template is the same and adds
`<think>\\n` after it, so the model starts by reasoning; R1 replies read `reasoning</think>answer`,
and the template keeps only the answer of past assistant turns (reasoning is never fed back).
`think=True` gives the R1 style with any tokenizer whose template does not already add it.
"""

from __future__ import annotations

from .reasoning import THINK_BEGIN


def chat_prompt(tokenizer, messages: list[dict], think: bool = False) -> list[int]:
    """messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt ids ending
    with the assistant turn's opening (and `<think>\\n` when `think`)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if think and not text.rstrip().endswith(THINK_BEGIN):
        text += THINK_BEGIN + "\n"
    return tokenizer.encode(text)
