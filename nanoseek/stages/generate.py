"""Generate with a checkpoint: one prompt, a file of prompts, or an interactive chat.

    nanoseek generate --model runs/tiny/checkpoints/latest --prompt "def fib(n):" --no-chat
    nanoseek generate --model DIR --input-file prompts.txt --output completions.jsonl
    nanoseek generate --model DIR --interactive              # /clear resets, /exit quits
    nanoseek generate --model DIR --prompt "2+2?" --temperature 0 --speculative mtp

Modelled on DeepSeek-V3's inference/generate.py: prompts go through the tokenizer's chat template
by default (--no-chat for raw completion, --think to open an R1-style reasoning block), temperature
0.2, 200 new tokens. --prompt and --interactive stream tokens as they are produced; --input-file
(one prompt per line, blank lines skipped) runs them through the engine's continuous batching and
writes one JSON object per prompt, in input order, to --output (default stdout):
{"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}.
--interactive keeps the conversation (with --no-chat it completes each line on its own).

--model takes a model directory or a training run (RUN, RUN/checkpoints, RUN/checkpoints/latest:
the latest checkpoint). The tokenizer is looked up in --tokenizer, the model directory, or
MODEL/tokenizer. A model with no tokenizer, an empty or unreadable input file, a prompt or input
line that is not valid UTF-8, an --output that cannot be written, a prompt that does not fit the
model's context (max_position_embeddings) or a bad flag end with one line on stderr and exit
status 2, before anything is generated. A prompt that fits but leaves less room than
--max-new-tokens gets what room there is (noted on stderr). --output is written whole or not at
all (a temporary file renamed into place). In --interactive, a line typed in another encoding
is decoded with U+FFFD for the bad bytes (noted on stderr); Ctrl-C during a reply stops it,
Ctrl-C (or end of input) at the prompt ends the session. Ctrl-C elsewhere exits with status 130.

Under torchrun (`torchrun --nproc-per-node N -m nanoseek generate ...`) every rank loads its share of
the model and runs the same engine steps (nanoseek/inference/distributed.py); rank 0 reads the
prompts, prints and writes, and an error on any rank is one line from rank 0 and the same exit
status on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from nanoseek.atomic import write_atomic
from nanoseek.cli import float_in, int_in
from nanoseek.device import DeviceError, resolve_device
from nanoseek.inference import Engine, RequestFailed, SamplingParams, chat_prompt
from nanoseek.inference.distributed import RankFailed, Runtime, load_model, rank0_output
from nanoseek.parallel.env import torchrun_world

# --interactive has no prompts to size the cache from; cap it here unless --max-seq-len says otherwise.
INTERACTIVE_MAX_SEQ_LEN = 8192


class GenerateError(Exception):
    """A problem with the inputs, reported as one line and exit status 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanoseek generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path,
                   help="model directory, or a training run (RUN, RUN/checkpoints or RUN/checkpoints/latest: "
                        "its latest checkpoint)")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model's)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompt", help="complete one prompt and print the completion as it streams")
    mode.add_argument("--input-file", type=Path, help="one prompt per line; writes JSONL")
    mode.add_argument("--interactive", action="store_true", help="chat loop (/clear, /exit)")
    p.add_argument("--output", type=Path, help="JSONL output for --input-file (default: stdout)")
    p.add_argument("--max-new-tokens", type=int_in(1, 2**31 - 1), default=200)
    p.add_argument("--temperature", type=float_in(0), default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=float_in(0, 1, lo_open=True), default=1.0)
    p.add_argument("--top-k", type=int_in(0, 2**31 - 1), default=0, help="0 = off")
    p.add_argument("--min-p", type=float_in(0, 1, hi_open=True), default=0.0, help="0 = off")
    p.add_argument("--seed", type=int_in(0, 2**62), default=None, help="(--input-file: line i gets seed + i)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="format prompts with the tokenizer's chat template (default on)")
    p.add_argument("--think", action="store_true", help="open the reply with <think> (R1 style)")
    p.add_argument("--speculative", choices=["auto", "mtp", "off"], default="auto",
                   help="MTP speculative decoding: auto (default: while it is faster; off without MTP "
                        "modules), mtp (always) or off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step: --compile compiles at start (seconds from the disk "
                        "cache, tens of seconds cold), --no-compile never; default: once the job has run "
                        "eagerly for as long as compiling is known to take")
    p.add_argument("--batch-size", type=int_in(1, 65536), default=8, help="requests decoded together (--input-file)")
    p.add_argument("--max-seq-len", type=int_in(2, 2**31 - 1), default=None,
                   help="cache length per request (default: what the prompts need, or "
                        f"{INTERACTIVE_MAX_SEQ_LEN} for --interactive; at most the model's context)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp8"], default=None,
                   help="weights dtype (default: float32 on CPU, the checkpoint's otherwise); fp8 keeps the "
                        "FP8 layers as FP8 + block scales in memory, dequantised per matmul")
    a = p.parse_args(argv)
    problem = check_flags(a)
    if problem:
        p.error(problem)
    return a


def check_flags(a) -> str | None:
    """What the flags' types cannot check, in the user's words (None: all fine)."""
    if any(not s for s in a.stop):
        return "--stop must not be empty"
    for flag, text in [("--prompt", a.prompt)] + [("--stop", s) for s in a.stop]:
        bad = text is not None and not_utf8(text)
        if bad:
            return f"{flag} is not valid UTF-8 ({bad}); pass text in UTF-8"
    return None


def not_utf8(text: str) -> str | None:
    """Why a command-line string is not UTF-8 (Python keeps undecodable argv bytes as lone
    surrogates), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00
        where = f"byte 0x{byte:02x}" if 0x80 <= byte <= 0xFF else "a lone surrogate"
        return f"{where} at character {e.start + 1}"


def main(argv: list[str] | None = None) -> int:
    with rank0_output():
        a = parse_args(argv)
    try:
        a.device = resolve_device(a.device)
    except DeviceError as e:
        return error_line(GenerateError(f"--device {e}"), 2, leader=torchrun_world()[0] == 0)
    rt = Runtime.start(str(a.device))
    a.device = rt.dist.device  # under torchrun: this rank's GPU (LOCAL_RANK), whatever --device named
    code = run(a, rt)
    rt.close(code)
    return code


def run(a, rt: Runtime) -> int:
    """Everything after the flags; returns the exit status (every rank the same under torchrun)."""
    try:
        error, prompts = None, None
        try:
            if rt.leader:  # rank 0 alone reads and writes files
                prompts = read_prompts(a) if a.input_file else None
                check_output(a.output)
        except GenerateError as e:
            error = e
        rt.check(error, 2)
        model, tokenizer = load(a, rt)
        if not rt.leader:
            return rt.follow(model, tokenizer)
        rt.lead()
        if a.interactive:
            return interactive(a, rt, model, tokenizer)
        if a.prompt is not None:
            return one_prompt(a, rt, model, tokenizer)
        return input_file(a, rt, model, tokenizer, prompts)
    except GenerateError as e:
        return error_line(e, 2, rt.leader)
    except RankFailed as e:  # another rank's error (rank 0 prints it), or rank 0's (followers stay quiet)
        return error_line(e, e.code, rt.leader)
    except RequestFailed as e:
        print(f"\nnanoseek generate: error: the engine failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rt.leader:
            print("\nnanoseek generate: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not rt.enabled:
            raise
        # a rank went away inside a step (its own error, a lost connection): every rank stops
        rt.mark_broken()
        print(f"[rank {rt.dist.rank}] nanoseek generate: error: {type(e).__name__}: {e}".splitlines()[0],
              file=sys.stderr)
        return 1


def error_line(e: Exception, code: int, leader: bool) -> int:
    """The one line on stderr (rank 0's; followers exit with the same status and say nothing)."""
    if leader:
        print(f"nanoseek generate: error: {e}", file=sys.stderr)
    return code


def read_prompts(a) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of --input-file; GenerateError naming a bad line."""
    try:
        data = a.input_file.read_bytes()
    except OSError as e:
        raise GenerateError(f"cannot read --input-file {a.input_file}: {e.strerror or e}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the first prompt
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise GenerateError(f"cannot read --input-file {a.input_file}: line {line} is not valid UTF-8 "
                            f"(byte 0x{data[e.start]:02x}); save it as UTF-8") from None
    prompts = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not prompts:
        raise GenerateError(f"--input-file {a.input_file} has no prompts (one per line)")
    return prompts


def check_output(path: Path | None) -> None:
    """Fail before generating when --output cannot be written."""
    if path is None:
        return
    if path.is_dir():
        raise GenerateError(f"--output {path} is a directory; give a file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise GenerateError(f"--output {path}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GenerateError(f"--output {path}: cannot write in {parent} (permission denied)")


def load(a, rt: Runtime):
    """(model, tokenizer) on every rank; a failure on any rank is the same error on all (rt.check)."""
    model = tokenizer = error = None
    try:
        model, tokenizer = load_here(a)
    except Exception as e:  # one process: re-raised as it is by rt.check
        error = e
    rt.check(error, 2 if isinstance(error, GenerateError) else 1)
    return model, tokenizer


def load_here(a):
    import torch

    from nanoseek.checkpoint import CheckpointError, resolve_model_dir
    from nanoseek.data import DataError, Tokenizer
    from nanoseek.model import ConfigError

    try:
        a.model = resolve_model_dir(a.model)
    except CheckpointError as e:
        raise GenerateError(f"--model {e}") from None
    candidates = [a.tokenizer] if a.tokenizer else [a.model, a.model / "tokenizer"]
    tok_dir = next((d for d in candidates if (d / "tokenizer.json").is_file()), None)
    if tok_dir is None:
        raise GenerateError(f"no tokenizer.json in {' or '.join(map(str, candidates))}; pass --tokenizer DIR "
                            f"or copy one next to the model (nanoseek init --tokenizer DIR)")
    try:
        tokenizer = Tokenizer.from_dir(tok_dir)
        dtype = a.dtype if a.dtype in (None, "fp8") else getattr(torch, a.dtype)
        model = load_model(a.model, dtype=dtype, device=a.device)
    except (CheckpointError, ConfigError, DataError, OSError) as e:
        raise GenerateError(str(e)) from None
    if tokenizer.vocab_size > model.args.vocab_size:
        raise GenerateError(f"the tokenizer in {tok_dir} has {tokenizer.vocab_size} ids but the model's "
                            f"vocab_size is {model.args.vocab_size}")
    if a.speculative == "mtp" and not len(model.mtp):
        raise GenerateError(f"--speculative mtp needs MTP modules; {a.model} has none (num_nextn_predict_layers=0)")
    return model, tokenizer


def encode(a, tokenizer, messages_or_text) -> list[int]:
    if a.chat:
        messages = messages_or_text if isinstance(messages_or_text, list) else [
            {"role": "user", "content": messages_or_text}]
        return chat_prompt(tokenizer, messages, think=a.think)
    return tokenizer.encode(messages_or_text, add_bos=True)


def fit(a, n_prompt: int, context: int, where: str) -> int:
    """New tokens a prompt of n_prompt tokens gets within `context`; GenerateError if none fit."""
    if n_prompt >= context:
        raise GenerateError(f"{where} is {n_prompt} tokens but the model's context is {context} tokens "
                            f"(max_position_embeddings); shorten it")
    if n_prompt + a.max_new_tokens > context:
        print(f"note: {where} leaves room for {context - n_prompt} new tokens, not {a.max_new_tokens}",
              file=sys.stderr)
    return min(a.max_new_tokens, context - n_prompt)


def params(a, max_new_tokens: int, index: int = 0) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                          min_p=a.min_p, seed=None if a.seed is None else a.seed + index, stop=list(a.stop))


def context_of(a, model) -> int:
    context = model.args.max_position_embeddings
    return min(context, a.max_seq_len) if a.max_seq_len else context


def report(engine) -> None:
    s = engine.stats
    line = (f"[{s['new_tokens']} tokens in {s['prefill_s'] + s['decode_s']:.2f}s: prefill "
            f"{s['prefill_tokens_per_s']:.0f} tok/s, decode {s['decode_tokens_per_s']:.1f} tok/s")
    if "acceptance_rate" in s:
        line += f", MTP acceptance {s['acceptance_rate']:.0%}"
    line += ", compiled" if s["compiled"] else ", eager"
    print(line + "]", file=sys.stderr)


def make_engine(a, rt: Runtime, model, tokenizer, batch: int, max_seq_len: int) -> Engine:
    try:
        engine = rt.engine(model, max_batch_size=batch, max_seq_len=max_seq_len, tokenizer=tokenizer,
                           speculative=None if a.speculative == "off" else a.speculative, compile=a.compile)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if a.compile and not rt.enabled:  # compile before the real work, so the decode speed reported is the compiled one
        print("compiling the decode step...", file=sys.stderr, flush=True)
        engine.warmup()
    return engine


def one_prompt(a, rt: Runtime, model, tokenizer) -> int:
    context = context_of(a, model)
    ids = encode(a, tokenizer, a.prompt)
    n_new = fit(a, len(ids), context, "the prompt")
    engine = make_engine(a, rt, model, tokenizer, 1, len(ids) + n_new)
    for ev in engine.stream(ids, params(a, n_new)):
        print(ev.text, end="", flush=True)
    print()
    report(engine)
    return 0


def input_file(a, rt: Runtime, model, tokenizer, prompts: list[tuple[int, str]]) -> int:
    context = context_of(a, model)
    ids = [encode(a, tokenizer, text) for _, text in prompts]
    budgets = [fit(a, len(x), context, f"the prompt on line {n} of {a.input_file}") for x, (n, _) in zip(ids, prompts)]
    max_seq_len = max(len(x) + b for x, b in zip(ids, budgets))
    engine = make_engine(a, rt, model, tokenizer, min(a.batch_size, len(ids)), max_seq_len)
    results = complete_all(engine, ids, [params(a, b, i) for i, b in enumerate(budgets)])
    failed = sum(reason == "error" for _, _, reason in results)
    rows = []
    for (_, text), x, (tokens, completion, reason) in zip(prompts, ids, results):
        row = dict(prompt=text, completion=completion, prompt_tokens=len(x), completion_tokens=len(tokens),
                   finish_reason=reason)
        if reason == "error":  # completion is empty, the engine's message in "error"
            row.update(completion="", error=completion)
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    if a.output:
        write_atomic(a.output, "".join(rows))
    else:
        sys.stdout.writelines(rows)
    report(engine)
    if failed:
        print(f"nanoseek generate: error: {failed} of {len(results)} prompt(s) failed in the engine "
              f"(finish_reason \"error\" in the output)", file=sys.stderr)
        return 1
    return 0


def complete_all(engine: Engine, prompts: list[list[int]], params_list: list[SamplingParams]):
    """Continuous batching by hand: requests join as slots free up.
    Returns per prompt (token ids, text, finish_reason); a prompt the engine failed has
    finish_reason "error" and the engine's message as its text."""
    engine.reset_stats()
    todo = list(range(len(prompts)))[::-1]
    index, tokens, texts, reasons = {}, [[] for _ in prompts], ["" for _ in prompts], [None] * len(prompts)
    while todo or engine.num_active:
        while todo and engine.free_slots:
            i = todo.pop()
            index[engine.add_request(prompts[i], params_list[i])] = i
        for ev in engine.step():
            i = index[ev.request_id]
            if ev.finish_reason == "error":  # the engine failed this prompt (and freed its slot)
                reasons[i], texts[i] = "error", ev.error
                continue
            tokens[i].append(ev.token_id)
            texts[i] += ev.text
            if ev.finished:
                reasons[i] = ev.finish_reason
    return list(zip(tokens, texts, reasons))


def interactive(a, rt: Runtime, model, tokenizer) -> int:
    max_seq_len = context_of(a, model) if a.max_seq_len else min(model.args.max_position_embeddings,
                                                                  INTERACTIVE_MAX_SEQ_LEN)
    engine = make_engine(a, rt, model, tokenizer, 1, max_seq_len)
    # Ctrl-C is how a chat ends or a reply stops, even when our parent ignored SIGINT (a process started
    # in the background by a script, or from a parent that ignores it, inherits SIG_IGN)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    print("nanoseek chat: /clear starts over, /exit (or Ctrl-C, Ctrl-D) quits, Ctrl-C stops a reply",
          file=sys.stderr)
    messages: list[dict] = []
    turn = 0
    while True:
        try:
            print(">>> ", end="", flush=True)
            line = read_line()
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session
            print()
            return 0
        if line is None:  # end of input
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            return 0
        if line == "/clear":
            messages = []
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": line})
        ids = encode(a, tokenizer, messages if a.chat else line)
        if len(ids) >= max_seq_len:
            print(f"error: the conversation is {len(ids)} tokens, more than the {max_seq_len}-token context; "
                  f"/clear to start over", file=sys.stderr)
            messages.pop()
            continue
        n_new = min(a.max_new_tokens, max_seq_len - len(ids))
        reply = ""
        stream = engine.stream(ids, params(a, n_new, turn))
        try:
            for ev in stream:
                print(ev.text, end="", flush=True)
                reply += ev.text
        except KeyboardInterrupt:  # Ctrl-C during a reply stops it
            stream.close()  # cancels the request: the engine is idle for the next turn
            print(" [stopped]", end="")
        print()
        messages.append({"role": "assistant", "content": reply})
        turn += 1


def read_line() -> str | None:
    """One line of stdin (None at end of input). Bytes that are not UTF-8 are replaced with U+FFFD,
    and the user is told, rather than ending the session on a stray byte."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream (tests, an embedding program)
        return sys.stdin.readline() or None
    data = raw.readline()
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print("note: that line is not valid UTF-8; the bad bytes were replaced with U+FFFD", file=sys.stderr)
        return data.decode("utf-8", errors="replace")
