"""Token ids to a text stream: incremental detokenisation and stop strings.

Two things make streaming text harder than decoding each token on its own:

* **A token is not a character.** Byte-level BPE splits multi-byte UTF-8 characters across
  tokens, and decoding half a character gives U+FFFD. We decode a small window of recent ids and
  release the new text only once it no longer ends in U+FFFD (the prefix/read-offset scheme of
  Hugging Face's text-generation-inference).
* **A stop string can span tokens, and its start can arrive before its end.** Text that could
  still grow into a stop string is held back: after each token we release everything except the
  longest suffix that is a prefix of some stop string. By induction no released text ever
  contains the start of a stop string, so searching the held-back buffer alone finds every match;
  the earliest match ends generation and neither it nor anything after it is released.

Special tokens (BOS/EOS) are skipped in the text; `<think>` and the chat tokens are ordinary
tokens in DeepSeek's vocabulary and come through.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class TextStream:
    """Turns one request's generated ids into text deltas.

    push(token_id) -> (delta, stopped): the newly releasable text, and whether a stop string
    completed (then `delta` is the text before it and the stream is done).
    flush() -> the text still held back (call when generation ends for another reason).
    `text` is everything released so far.
    """

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already taken
        self.read_offset = 0
        self.held = ""  # decoded, not released (may become a stop string)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self, final: bool = False) -> str:
        """Text added by ids[read_offset:], or "" while it ends inside a multi-byte character."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        self.held += self._new_text()
        if not self.stop:
            return self._release(len(self.held)), False
        hits = [i for i in (self.held.find(s) for s in self.stop) if i >= 0]
        if hits:
            delta = self._release(min(hits))
            self.held = ""
            return delta, True
        return self._release(len(self.held) - self._partial_stop()), False

    def flush(self) -> str:
        self.held += self._new_text(final=True)
        return self._release(len(self.held))

    def _partial_stop(self) -> int:
        """Length of the longest suffix of `held` that is a proper prefix of a stop string."""
        longest = min(len(self.held), max(len(s) for s in self.stop) - 1)
        for n in range(longest, 0, -1):
            tail = self.held[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _release(self, n: int) -> str:
        delta, self.held = self.held[:n], self.held[n:]
        self.text += delta
        return delta
