"""Chat data for supervised fine-tuning: conversations -> token ids + a loss mask, packed rows.

    ids, loss_mask = encode_chat(tokenizer, messages)          # one conversation
    convs, skipped = read_chat_jsonl(path, tokenizer, max_len)  # a JSONL file, bad rows named
    batch = pack(convs, seq_len)                                # padding-free packed rows

A row of the JSONL file is `{"messages": [{"role": "system"|"user"|"assistant", "content": str,
"reasoning_content": str (assistant only, optional)}, ...]}` (extra keys are ignored).

What is rendered (and so what is learned) is exactly what the model's own chat template renders,
with one addition for R1 data:
* every turn goes through `tokenizer.apply_chat_template` (DeepSeek-V3's template for our BPE and
  the real V3 tokenizer; a checkpoint's own Jinja template otherwise): system prompts are joined at
  the top, user turns are `<｜User｜>{content}`, assistant turns `<｜Assistant｜>{content}<｜end▁of▁sentence｜>`;
* the template keeps only the text after `</think>` of an assistant turn: R1's rule that reasoning
  is never fed back into the context. So the reasoning of earlier assistant turns is dropped, as it
  will be at inference time, and only the **last** assistant turn carries its reasoning, written as
  R1 writes it: `<think>\\n{reasoning_content}\\n</think>\\n\\n{content}`. (A last turn whose
  content already holds `...</think>...` is kept verbatim.) When the template's generation prompt
  itself opens `<think>\\n` (DeepSeek-R1's later template), that opener is prompt, not loss.

The loss mask is True on every assistant turn's tokens as rendered (reasoning, content and the
end-of-sentence that closes the turn) and False elsewhere (BOS, system, user turns and the
`<｜Assistant｜>` opener, which belongs to the prompt). The ids are the tokenization of the whole
rendered string in one call (identical to `tokenizer.encode(text)`), and each token's mask comes
from where its first character falls, so a token never straddles the split unnoticed.

Packing (what TRL calls padding-free): whole conversations are laid end to end in rows of at most
`seq_len` tokens; positions restart at 0 for each conversation and `doc_ids` tell the model not to
attend across them (`Transformer.run(..., doc_ids=...)`). The leftover tail of a row is padding
with a loss mask of False and a doc id of its own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.data.corpus import DataError

ROLES = ("system", "user", "assistant")
THINK_BEGIN, THINK_END = "<think>", "</think>"


def validate_messages(messages) -> None:
    """Raise DataError (no file/line: the caller adds it) unless `messages` is a valid conversation."""
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} is not an object")
        role = m.get("role")
        if role is None:
            raise DataError(f"message {i} has no role")
        if role not in ROLES:
            raise DataError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m.get("content"), str):
            raise DataError(f"message {i} ({role}): content must be a string, got "
                            f"{type(m.get('content')).__name__}")
        if "reasoning_content" in m and m["reasoning_content"] is not None:
            if role != "assistant":
                raise DataError(f"message {i} ({role}): only assistant turns have reasoning_content")
            if not isinstance(m["reasoning_content"], str):
                raise DataError(f"message {i}: reasoning_content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("no assistant turn (nothing to learn)")


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """One conversation -> (ids, loss_mask), both of length N.

    tokenizer: a `nanoseek.data.Tokenizer`; messages: [{"role", "content", "reasoning_content"?}, ...].
    loss_mask[i] is True exactly on the tokens of assistant turns as rendered (see the module
    docstring). Raises DataError on an invalid conversation or a template that cannot be split
    into turns.
    """
    validate_messages(messages)
    # The template joins every system prompt at the top; render them there so each prefix below
    # is a prefix of the whole.
    messages = [m for m in messages if m["role"] == "system"] + [m for m in messages if m["role"] != "system"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]  # turns after the last reply teach nothing
    render = tokenizer.apply_chat_template
    text = render([], add_generation_prompt=False)  # BOS
    spans: list[tuple[int, int]] = []  # [start, end) character spans in the loss
    for i, m in enumerate(messages):
        plain = [{"role": x["role"], "content": x["content"]} for x in messages[: i + 1]]
        full = render(plain, add_generation_prompt=False)
        if not full.startswith(text):
            raise DataError(f"the chat template does not render message {i} after the ones before it; "
                            f"this template cannot be used for training")
        if m["role"] != "assistant":
            text = full
            continue
        piece = full[len(text):]
        gen_prompt = render(plain[:-1], add_generation_prompt=True)[len(text):]  # "<｜Assistant｜>"
        opener = _common_prefix(piece, gen_prompt)
        body = piece[len(opener):]
        if i == last:
            body, opener = _with_reasoning(m, body, gen_prompt, opener, i)
        start = len(text) + len(opener)
        text = text + opener + body
        spans.append((start, len(text)))
    enc = tokenizer.tk.encode(text, add_special_tokens=False)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc.offsets]
    return list(enc.ids), mask


def _with_reasoning(m: dict, body: str, gen_prompt: str, opener: str, i: int) -> tuple[str, str]:
    """The last assistant turn as the model writes it: R1's think block, then the content as the
    template renders it (which ends with the end-of-sentence). Returns (body, opener)."""
    content = m["content"]
    shown = content.split(THINK_END)[-1]  # what the template kept
    if not body.startswith(shown):
        raise DataError(f"message {i}: the chat template changes the assistant content; cannot train on it")
    reasoning = m.get("reasoning_content")
    if reasoning is not None:
        reply = f"{THINK_BEGIN}\n{reasoning}\n{THINK_END}\n\n{content}"
    else:
        reply = content  # verbatim, inline reasoning included
    tail = body[len(shown):]
    # A template whose generation prompt opens the think block (R1) puts `<think>\n` in the prompt.
    opened = gen_prompt[len(opener):]
    if opened and reply.startswith(opened):
        return reply[len(opened):] + tail, opener + opened
    return reply + tail, opener


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@dataclass
class Skipped:
    """Rows left out of a file, by reason: {"reason": [line numbers]}."""

    path: str
    lines: dict[str, list[int]] = field(default_factory=dict)
    truncated: list[int] = field(default_factory=list)

    def add(self, reason: str, line: int) -> None:
        self.lines.setdefault(reason, []).append(line)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.lines.values())

    def summary(self) -> str:
        """One line per reason, naming the file and up to 5 line numbers; '' when nothing happened."""
        parts = []
        for reason, lines in self.lines.items():
            parts.append(f"{self.path}: skipped {len(lines)} row(s), {reason}: lines {_lines(lines)}")
        if self.truncated:
            parts.append(f"{self.path}: truncated {len(self.truncated)} row(s) to the sequence length: "
                         f"lines {_lines(self.truncated)}")
        return "\n".join(parts)


def _lines(lines: list[int]) -> str:
    return ", ".join(map(str, lines[:5])) + (f" (+{len(lines) - 5} more)" if len(lines) > 5 else "")


def jsonl_lines(path: Path) -> list[tuple[int, bytes]]:
    """The non-blank lines of a JSONL file with their 1-based numbers; a UTF-8 byte-order mark at the
    start is dropped. An unreadable file is one DataError."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    return [(n, line) for n, line in enumerate(raw.split(b"\n"), start=1) if line.strip()]


def parse_json_line(line: bytes):
    """One JSONL line -> its value; DataError("not UTF-8" / "invalid JSON (...)") for the caller to place."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError("not UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON ({e.msg})") from None


def read_chat_jsonl(path: str | os.PathLike, tokenizer, max_len: int, too_long: str = "drop",
                    skip_bad: bool = False) -> tuple[list[tuple[list[int], list[bool]]], Skipped]:
    """Read and encode a chat JSONL file.

    max_len: longest conversation in tokens (the packed row length). too_long: "drop" (counted
    skip) or "truncate" (keep the first max_len tokens; counted; dropped if no loss token is left)
    or "error". skip_bad: count invalid rows (bad JSON, roles, contents, no assistant turn) as skips
    instead of raising. Errors are DataError("FILE:LINE: what is wrong"). Blank lines are ignored.
    Returns ([(ids, loss_mask), ...], Skipped).
    """
    if too_long not in ("drop", "truncate", "error"):
        raise ValueError(f"too_long must be drop, truncate or error, got {too_long!r}")
    path = Path(path)
    skipped = Skipped(str(path))
    out: list[tuple[list[int], list[bool]]] = []
    for n, line in jsonl_lines(path):
        try:
            row = parse_json_line(line)
            if not isinstance(row, dict) or "messages" not in row:
                raise DataError('expected an object with a "messages" list')
            ids, mask = encode_chat(tokenizer, row["messages"])
        except DataError as e:
            if not skip_bad:
                raise DataError(f"{path}:{n}: {e}") from None
            skipped.add("invalid", n)
            continue
        if len(ids) > max_len:
            if too_long == "error":
                raise DataError(f"{path}:{n}: conversation of {len(ids)} tokens is longer than the "
                                f"sequence length {max_len}")
            if too_long == "drop" or not any(mask[1:max_len]):
                skipped.add(f"longer than {max_len} tokens", n)
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            skipped.truncated.append(n)
        if not any(mask[1:]):
            skipped.add("no assistant token to learn", n)
            continue
        out.append((ids, mask))
    return out, skipped


@dataclass
class PackedBatch:
    """Rows of packed conversations, all LongTensor/BoolTensor [B, T]:
    inputs, targets (inputs shifted by one within each conversation), loss_mask (on targets),
    positions (restart at 0 per conversation), doc_ids (distinct per conversation within a row,
    padding has its own)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device) for t in (self.inputs, self.targets, self.loss_mask, self.positions,
                                                       self.doc_ids)))


def pack_rows(lengths: list[int], seq_len: int, window: int = 64) -> list[list[int]]:
    """First-fit packing of conversations (by their `len(ids) - 1` training tokens) into rows of at
    most seq_len tokens, in order: [[conversation index, ...], ...]. Deterministic. Only the newest
    `window` rows with room are searched, so packing stays linear in the number of conversations."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []  # indices of rows still searched
    for i, n in enumerate(lengths):
        need = n - 1
        if need > seq_len:
            raise ValueError(f"conversation {i} needs {need} tokens, more than seq_len={seq_len}")
        for r in open_rows:
            if room[r] >= need:
                rows[r].append(i)
                room[r] -= need
                break
        else:
            rows.append([i])
            room.append(seq_len - need)
            open_rows.append(len(rows) - 1)
        open_rows = [r for r in open_rows if room[r] > 0][-window:]
    return rows


def pack(convs: list[tuple[list[int], list[bool]]], seq_len: int, rows: list[list[int]] | None = None,
         pad_id: int = 0) -> PackedBatch:
    """Lay conversations end to end in rows of seq_len training tokens: `rows` lists the conversation
    indices of each row (default: `pack_rows` over all of them, in order).

    Conversation (ids, mask) contributes inputs ids[:-1], targets ids[1:], loss_mask mask[1:]."""
    if rows is None:
        rows = pack_rows([len(ids) for ids, _ in convs], seq_len)
    B = len(rows)
    inputs = torch.full((B, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((B, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(B, seq_len, dtype=torch.bool)
    positions = torch.zeros(B, seq_len, dtype=torch.long)
    doc_ids = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ids, mask = convs[i]
            n = len(ids) - 1
            if at + n > seq_len:
                raise ValueError(f"row {b} holds more than seq_len={seq_len} tokens")
            inputs[b, at:at + n] = torch.tensor(ids[:-1])
            targets[b, at:at + n] = torch.tensor(ids[1:])
            loss_mask[b, at:at + n] = torch.tensor(mask[1:])
            positions[b, at:at + n] = torch.arange(n)
            doc_ids[b, at:at + n] = d
            at += n
        positions[b, at:] = torch.arange(seq_len - at)
    return PackedBatch(inputs, targets, loss_mask, positions, doc_ids)
