"""Chat prompts from the tokenizer's own template, and R1-style replies split into reasoning and answer.

DeepSeek-V3's template renders `<｜begin▁of▁sentence｜>{system}<｜User｜>{q}<｜Assistant｜>{a}<｜end▁of▁sentence｜>...`
and ends with `<｜Assistant｜>` when a reply is wanted. DeepSeek-R1's template is the same and adds
`<think>\\n` after it, so the model starts by reasoning; R1 replies read `reasoning</think>answer`,
and the template keeps only the answer of past assistant turns (reasoning is never fed back).
`think=True` gives the R1 style with any tokenizer whose template does not already add it.
"""

from __future__ import annotations

THINK_BEGIN, THINK_END = "<think>", "</think>"


def chat_prompt(tokenizer, messages: list[dict], think: bool = False) -> list[int]:
    """messages [{"role": "system"|"user"|"assistant", "content": str}, ...] -> prompt ids ending
    with the assistant turn's opening (and `<think>\\n` when `think`)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if think and not text.rstrip().endswith(THINK_BEGIN):
        text += THINK_BEGIN + "\n"
    return tokenizer.encode(text)


def split_reasoning(text: str, thinking: bool = False) -> tuple[str, str]:
    """An R1-style reply -> (reasoning, answer), both stripped.

    `reasoning</think>answer` (with or without the opening `<think>`) splits at `</think>`. Without
    `</think>`: a reply that opens with `<think>`, or any reply when the prompt already opened the
    reasoning (`thinking=True`), is unfinished reasoning with no answer; otherwise it is all answer.
    """
    stripped = text.lstrip()
    opened = stripped.startswith(THINK_BEGIN)
    if opened:
        stripped = stripped[len(THINK_BEGIN):]
    if THINK_END in stripped:
        reasoning, answer = stripped.split(THINK_END, 1)
        return reasoning.strip(), answer.strip()
    if opened or thinking:
        return stripped.strip(), ""
    return "", text.strip()
