"""Prepare a pre-training dataset: corpus -> tokenizer -> FIM -> packed token shards.

    nanoseek prepare --out runs/tiny/data                  # Python stdlib, 4K-token BPE
    nanoseek prepare docs/ chats.jsonl --out runs/data --tokenizer deepseek-v3
    python -m nanoseek.stages.prepare --out /tmp/data --max-bytes 1000000 --seq-len 128

Writes OUT/tokenizer/ (Hugging Face layout, loadable by AutoTokenizer), OUT/train.bin and
OUT/val.bin (token shards, see nanoseek/data/shards.py) and OUT/meta.json. Everything is
written to a temporary directory next to OUT and moved into place only when complete, so a
prepare that fails (or is interrupted) leaves an existing dataset in OUT as it was. What can be
checked before the work is checked first: OUT writable and not a file, at least two different
documents, enough text for one --seq-len window in each split, the vocabulary size.
Identical documents (and a file given twice) are kept once, so no document is in both splits.

With no inputs the corpus is the running Python's standard library (~11 MB of .py files),
so the tiny end-to-end run needs no download. The BPE is trained on the train split only, so
validation bits-per-byte measure text the tokenizer never saw either. FIM is applied to the
train split only: validation stays plain left-to-right text, so its loss and bits-per-byte
don't move when --fim-rate changes.
"""

import argparse
import itertools
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nanoseek.atomic import swap_into_place
from nanoseek.cli import int_in
from nanoseek.data.corpus import STDLIB_MAX_BYTES, DataError, read_corpus, stdlib_corpus
from nanoseek.data.fim import encode_documents
from nanoseek.data.shards import ShardWriter, split_documents, write_meta
from nanoseek.data.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE, Tokenizer, load_deepseek_v3, train_bpe

DEFAULT_VOCAB_SIZE = 4096
# What prepare writes into --out; anything else already there is carried over untouched.
OUTPUTS = ("tokenizer", "train.bin", "val.bin", "meta.json")
# Documents per call to the batch encoder: big enough to keep every core busy, small
# enough for the progress bar to move.
ENCODE_CHUNK = 256


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nanoseek prepare",
        description="Tokenize a corpus into packed train/val token shards.")
    parser.add_argument("inputs", nargs="*",
                        help="files or directories (.txt .md .py .jsonl .parquet); "
                             "none: the Python standard library")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tokenizer", default="bpe",
                        help="'bpe' (train one here), 'deepseek-v3' (the real 128K "
                             "vocabulary) or a path to a HF tokenizer dir (default: bpe)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"BPE vocabulary size, special tokens included "
                             f"(default {DEFAULT_VOCAB_SIZE}; only with --tokenizer bpe)")
    parser.add_argument("--seq-len", type=int_in(1, 2**31 - 1), default=256,
                        help="training sequence length; recorded in meta.json and checked "
                             "against the split sizes (default 256)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents held out for validation (default 0.01, "
                             "at least one)")
    parser.add_argument("--fim-rate", type=float, default=0.1,
                        help="fraction of train documents rearranged for fill-in-the-middle "
                             "(default 0.1, as DeepSeek-V3)")
    parser.add_argument("--seed", type=int_in(0), default=0, help="split and FIM seed (default 0)")
    parser.add_argument("--max-docs", type=int, default=None,
                        help="stop reading after this many documents")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help=f"stop reading after this many bytes of text (default: no cap, "
                             f"{STDLIB_MAX_BYTES:,} for the stdlib corpus)")
    parser.add_argument("--text-field", default="text",
                        help="field holding the text in .jsonl/.parquet (default 'text')")
    args = parser.parse_args(argv)
    if args.vocab_size is not None and args.tokenizer != "bpe":
        parser.error("--vocab-size only applies to --tokenizer bpe")
    if args.vocab_size is not None and not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        parser.error(f"argument --vocab-size: must be an integer in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (the "
                     f"256 byte tokens and the special tokens need {MIN_VOCAB_SIZE - 1}), got {args.vocab_size}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if not 0 <= args.fim_rate <= 1:
        parser.error(f"--fim-rate must be between 0 and 1, got {args.fim_rate}")
    for flag in ("max_docs", "max_bytes"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.tokenizer not in ("bpe", "deepseek-v3") and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        parser.error(f"--tokenizer {args.tokenizer}: no tokenizer.json in that directory (or 'bpe', 'deepseek-v3')")
    problem = check_out(Path(args.out))
    if problem:
        parser.error(f"--out {args.out}: {problem}")
    return args


def check_out(out: Path) -> str | None:
    """Why `out` cannot receive a dataset (None if it can): checked before any work."""
    if out.exists() and not out.is_dir():
        return "exists and is not a directory"
    parent = out.absolute().parent
    while not parent.exists():  # created later; the first existing ancestor must allow it
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent} (permission denied)"
    return None


def load_corpus(args: argparse.Namespace):
    # The library warns about skipped files; the stage reports them in its own words.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.inputs:
            corpus = read_corpus(args.inputs, text_field=args.text_field,
                                 max_docs=args.max_docs, max_bytes=args.max_bytes)
        else:
            cap = STDLIB_MAX_BYTES if args.max_bytes is None else args.max_bytes
            corpus = stdlib_corpus(max_docs=args.max_docs, max_bytes=cap)
    if corpus.skipped:
        where, why = corpus.skipped[0]
        print(f"warning: skipped {len(corpus.skipped)} unreadable file(s)/record(s), "
              f"first: {where}: {why}", file=sys.stderr)
    return corpus


def get_tokenizer(args: argparse.Namespace, train_docs: list[str]) -> Tokenizer:
    if args.tokenizer == "bpe":
        vocab_size = args.vocab_size or DEFAULT_VOCAB_SIZE
        mb = sum(len(d) for d in train_docs) / 1e6
        print(f"training a {vocab_size}-token BPE on {len(train_docs):,} documents ({mb:.1f}M characters)...",
              file=sys.stderr, flush=True)
        return train_bpe(train_docs, vocab_size=vocab_size, progress=sys.stderr.isatty())
    if args.tokenizer == "deepseek-v3":
        return load_deepseek_v3()
    return Tokenizer.from_dir(args.tokenizer)


def write_split(path: Path, docs: list[str], tok: Tokenizer, fim_rate: float,
                rng: random.Random) -> tuple[int, int]:
    """Tokenize docs (with FIM) into one shard file; returns (tokens, FIM documents)."""
    fim_docs = 0
    with ShardWriter(path, tok.vocab_size) as writer, \
            tqdm(total=len(docs), desc=f"tokenizing {path.stem}", unit="doc") as bar:
        for start in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[start:start + ENCODE_CHUNK]
            ids, num_fim = encode_documents(tok, chunk, rng, fim_rate)
            writer.write(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64))
            fim_docs += num_fim
            bar.update(len(chunk))
    return writer.num_tokens, fim_docs


def check_room(args: argparse.Namespace, splits: dict[str, list[str]]) -> None:
    """Fail before tokenizing when a split cannot hold one --seq-len window: a byte-level
    tokenizer gives at most one token per UTF-8 byte, plus BOS/EOS (and FIM sentinels) per doc."""
    for name, docs in splits.items():
        most = sum(len(d.encode("utf-8")) + 5 for d in docs)
        if most < args.seq_len + 1:
            raise DataError(f"the {name} split ({len(docs)} documents) has at most {most} tokens, less "
                            f"than one window of --seq-len {args.seq_len} + 1; use more data, a larger "
                            f"--val-fraction or a smaller --seq-len")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        return prepare(args, out)
    except DataError as e:
        print(f"nanoseek prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnanoseek prepare: interrupted; {out} was left as it was", file=sys.stderr)
        return 130


def prepare(args: argparse.Namespace, out: Path) -> int:
    t0 = time.perf_counter()
    corpus = load_corpus(args)
    if corpus.duplicates:
        print(f"note: dropped {corpus.duplicates:,} duplicate document(s) (identical text is kept once, "
              f"so no document is in both splits)", file=sys.stderr)
    train_docs, val_docs = split_documents(corpus.documents, args.val_fraction, args.seed)
    check_room(args, {"train": train_docs, "val": val_docs})
    tok = get_tokenizer(args, train_docs)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        splits = write_dataset(args, tmp, tok, corpus, train_docs, val_docs)
        if out.exists():  # carry over what is not ours (notes, other files) untouched
            for item in out.iterdir():
                if item.name not in OUTPUTS and not (tmp / item.name).exists():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    train, val = splits["train"], splits["val"]
    total_tokens, total_bytes = train["tokens"] + val["tokens"], train["bytes"] + val["bytes"]
    print(f"prepared {len(corpus.documents):,} docs ({train['docs']:,} train / "
          f"{val['docs']:,} val, {train['fim_docs']:,} FIM), "
          f"{total_bytes / 1e6:.1f} MB -> {total_tokens:,} tokens "
          f"({total_bytes / total_tokens:.2f} bytes/token), "
          f"tokenizer {tok.name} ({tok.vocab_size:,} ids), "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"wrote {out}/tokenizer/, {out}/train.bin, {out}/val.bin, {out}/meta.json")
    return 0


def write_dataset(args, out: Path, tok: Tokenizer, corpus, train_docs: list[str], val_docs: list[str]) -> dict:
    """Tokenizer, both shards and meta.json into `out` (the temporary directory); returns the splits' info."""
    tok.save(out / "tokenizer")
    splits = {}
    for name, docs, fim_rate in (("train", train_docs, args.fim_rate),
                                 ("val", val_docs, 0.0)):
        rng = random.Random(f"fim:{name}:{args.seed}")
        tokens, fim_docs = write_split(out / f"{name}.bin", docs, tok, fim_rate, rng)
        if tokens < args.seq_len + 1:
            raise DataError(f"the {name} split has only {tokens} tokens, less than one "
                            f"window of --seq-len {args.seq_len} + 1; use more data, a "
                            f"larger --val-fraction or a smaller --seq-len")
        num_bytes = sum(len(d.encode("utf-8")) for d in docs)
        splits[name] = {"file": f"{name}.bin", "docs": len(docs), "fim_docs": fim_docs,
                        "fim_rate": fim_rate, "tokens": tokens, "bytes": num_bytes,
                        "bytes_per_token": num_bytes / tokens}
    write_meta(out / "meta.json", {
        "format": "nanoseek-tokens",
        "vocab_size": tok.vocab_size,
        "tokenizer": {"name": tok.name, "dir": "tokenizer", "vocab_size": tok.vocab_size,
                      "sha256": tok.fingerprint(), "bos_id": tok.bos_id,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id},
        "seq_len": args.seq_len,
        "fim_rate": args.fim_rate,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "corpus": {"sources": corpus.sources, "docs": len(corpus.documents),
                   "skipped": len(corpus.skipped), "duplicates": corpus.duplicates,
                   "max_docs": args.max_docs, "max_bytes": args.max_bytes},
        "splits": splits,
    })
    return splits


if __name__ == "__main__":
    sys.exit(main())
