"""DeepSeek-R1's reasoning parser: `<think>...</think>` to `reasoning_content`, the rest to `content`.

R1 writes its chain of thought between `<think>` and `</think>`, then the answer. DeepSeek's
API returns the two separately, and so does `nanoseek serve --reasoning-parser deepseek-r1`;
`split_reasoning` does the same for a finished reply (generation scripts, RL reward functions).

The split runs on text deltas as they stream, so a tag can arrive cut anywhere ("<th", "ink>"):
text that could still be the start of a tag is held back until the next delta decides it.
Feeding the whole output at once and feeding it in pieces give the same two strings, which is
how the non-streaming and streaming replies stay identical.

When the output starts in the thoughts:
- the output itself begins with `<think>` (after optional whitespace): the V3 chat template
  leaves the tag to the model;
- or the prompt already ends with `<think>` (R1's later template opens the tag itself, so the
  model never writes it): pass `in_reasoning=True`.
Otherwise the output is all content, and a stray `</think>` in it stays content. Whitespace
at the edges of the reasoning and at the start of the answer after it is dropped ("<think>\n...\n
</think>\n\n" is R1's layout), matching DeepSeek's API.
"""

from __future__ import annotations

THINK_BEGIN, THINK_END = "<think>", "</think>"


class ReasoningParser:
    """Incremental splitter. `feed(delta)` and `finish()` return (reasoning, content) deltas."""

    def __init__(self, in_reasoning: bool = False):
        # "start": not yet known whether a <think> opens the output; "reasoning"; "content".
        self.state = "reasoning" if in_reasoning else "start"
        self.pending = ""  # held-back text: maybe part of a tag, or whitespace to maybe drop
        self.at_edge = True  # at the start of the reasoning or of the content: drop whitespace

    def feed(self, delta: str) -> tuple[str, str]:
        """Add a text delta; return the (reasoning, content) text that is now certain."""
        self.pending += delta
        reasoning, content = "", ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(THINK_BEGIN):
                self.state = "reasoning"
                self.pending = head[len(THINK_BEGIN):]
            elif THINK_BEGIN.startswith(head):
                return "", ""  # only whitespace or a prefix of "<think>" so far
            else:
                # No thoughts: the output is an answer, kept verbatim.
                self.state, self.at_edge = "content", False
        if self.state == "reasoning":
            end = self.pending.find(THINK_END)
            if end >= 0:
                reasoning = self._edge(self.pending[:end].rstrip())
                self.pending = self.pending[end + len(THINK_END):]
                self.state, self.at_edge = "content", True
            else:
                # Hold back trailing whitespace and any tail that could start "</think>".
                keep = _tag_prefix_len(self.pending, THINK_END)
                body = self.pending[:len(self.pending) - keep]
                stripped = body.rstrip()
                reasoning = self._edge(stripped)
                self.pending = body[len(stripped):] + self.pending[len(body):]
                return reasoning, ""
        if self.state == "content":
            content, self.pending = self._edge(self.pending), ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The output ended: release what was held back."""
        if self.state == "reasoning":
            text, self.pending = self._edge(self.pending.rstrip()), ""
            return text, ""
        text = self._edge(self.pending) if self.state == "content" else self.pending
        self.pending = ""
        return "", text

    def _edge(self, text: str) -> str:
        """Drop leading whitespace at the start of a section, then pass text through."""
        if self.at_edge:
            text = text.lstrip()
            self.at_edge = not text
        return text


def split_reasoning(text: str, in_reasoning: bool = False) -> tuple[str, str]:
    """The whole output at once -> (reasoning, content)."""
    parser = ReasoningParser(in_reasoning)
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return r1 + r2, c1 + c2


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a `<think>` the template opened."""
    return prompt.rstrip().endswith(THINK_BEGIN)


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
