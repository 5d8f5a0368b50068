"""Reading a text corpus into a list of documents.

A document is the unit that gets BOS/EOS (and maybe FIM) and the unit of the train/val
split. What counts as one document depends on the file type:

    .txt .md .py   the whole file
    .jsonl         one line, its text field (default "text")
    .parquet       one row, its text column (needs pyarrow)

Directories are walked recursively in sorted order, so the same inputs always give the same
documents in the same order. With no inputs, `stdlib_corpus()` reads the Python standard
library of the running interpreter: every machine has it, so the tiny end-to-end run needs
no download.

Design choices:
- The corpus is held in memory as a list of str. This is a nano project: tens of MB, and the
  BPE trainer and the document-level split both want to see all documents anyway. Use
  `max_bytes` / `max_docs` to cap big inputs.
- Files that can't be read or aren't UTF-8 are skipped, not fatal: one bad file in a
  directory of thousands shouldn't stop a run. They are counted and reported in one warning.
  A UTF-8 byte-order mark at the start of a file is dropped (editors on Windows write one).
- Exact duplicates are dropped (the first copy is kept, `Corpus.duplicates` counts the rest),
  and a file reached twice (given twice, or by itself and through its directory) is read once:
  the train/val split is by document, and a document in both splits would leak validation
  text into training.
"""

import hashlib
import json
import os
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")

# The embedded default corpus: stdlib .py files minus tests (huge, often deliberately odd
# code), the IDLE GUI, installed third-party packages, and single files so large they are
# data rather than code (pydoc_data/topics.py is 750 KB of one dict literal).
STDLIB_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
STDLIB_MAX_FILE_BYTES = 256 * 1024
# The whole filtered stdlib is ~11 MB on CPython 3.11, so this cap rarely bites; it keeps the
# tiny run's prepare time bounded on interpreters with a bigger stdlib.
STDLIB_MAX_BYTES = 12_000_000


class DataError(ValueError):
    """A problem with the data the user pointed us at (missing, empty, corrupt, mismatched).

    Stage scripts turn it into a one-line error message and a non-zero exit, not a traceback.
    """


@dataclass
class Corpus:
    """Documents read from some inputs, in a deterministic order.

    documents: one str per document, never empty.
    sources:   the inputs as given (or "stdlib:<dir>"), for meta.json and error messages.
    skipped:   (path or path:line, reason) for every file/line/row that was skipped.
    duplicates: documents dropped because an identical one came earlier.
    """

    documents: list[str]
    sources: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    duplicates: int = 0

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of all documents: the denominator of bits-per-byte."""
        return sum(len(d.encode("utf-8")) for d in self.documents)


def read_corpus(
    inputs: list[str | os.PathLike],
    *,
    text_field: str = "text",
    max_docs: int | None = None,
    max_bytes: int | None = None,
) -> Corpus:
    """Read files and directories into a Corpus.

    Reading stops once `max_docs` documents or at least `max_bytes` UTF-8 bytes have been
    collected (so the last document may overshoot the byte cap; documents are never cut).
    Raises DataError if an input doesn't exist, has an unsupported suffix, or if nothing
    readable was found at all.
    """
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError(f"no such file or directory: {p}")
        if p.is_file() and p.suffix not in SUFFIXES:
            raise DataError(f"unsupported file type {p.suffix or '(none)'!r}: {p} "
                            f"(supported: {', '.join(SUFFIXES)})")
    files, seen = [], set()
    for f in (f for p in paths for f in _expand(p)):
        key = f.resolve()  # the same file given twice, or by itself and through its directory
        if key not in seen:
            seen.add(key)
            files.append(f)
    corpus = _collect(files, [str(p) for p in paths], text_field, max_docs, max_bytes)
    if not corpus.documents:
        looked = ", ".join(str(p) for p in paths)
        raise DataError(f"no documents found in: {looked} "
                        f"(looked for non-empty {', '.join(SUFFIXES)} files; "
                        f"{len(corpus.skipped)} skipped)")
    return corpus


def stdlib_files() -> list[Path]:
    """The .py files of the embedded corpus, in sorted (deterministic) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_SKIP_DIRS]  # prunes the walk
        for name in filenames:
            path = Path(dirpath) / name
            if name.endswith(".py") and path.stat().st_size <= STDLIB_MAX_FILE_BYTES:
                files.append(path)
    return sorted(files)


def stdlib_corpus(*, max_docs: int | None = None,
                  max_bytes: int | None = STDLIB_MAX_BYTES) -> Corpus:
    """The embedded default corpus: the running interpreter's standard library .py files."""
    root = sysconfig.get_paths()["stdlib"]
    corpus = _collect(stdlib_files(), [f"stdlib:{root}"], "text", max_docs, max_bytes)
    if not corpus.documents:
        raise DataError(f"no .py files found in the standard library at {root}")
    return corpus


def _expand(path: Path) -> list[Path]:
    """A file as itself; a directory as its supported files, recursively, sorted."""
    if path.is_file():
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        # Hidden directories are VCS metadata and caches (.git, .venv), never corpus.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix in SUFFIXES:
                found.append(Path(dirpath) / name)
    return sorted(found)


def _collect(files: list[Path], sources: list[str], text_field: str,
             max_docs: int | None, max_bytes: int | None) -> Corpus:
    corpus = Corpus(documents=[], sources=sources)
    total = 0
    digests = set()
    for path in files:
        for doc in _documents(path, text_field, corpus.skipped):
            if (max_docs is not None and len(corpus.documents) >= max_docs) or \
                    (max_bytes is not None and total >= max_bytes):
                _warn_skipped(corpus.skipped)
                return corpus
            digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=16).digest()
            if digest in digests:
                corpus.duplicates += 1
                continue
            digests.add(digest)
            corpus.documents.append(doc)
            total += len(doc.encode("utf-8"))
    _warn_skipped(corpus.skipped)
    return corpus


def _documents(path: Path, text_field: str, skipped: list) -> Iterator[str]:
    """Yield the non-empty documents of one file; record what was skipped and why."""
    if path.suffix == ".parquet":
        yield from _parquet_documents(path, text_field, skipped)
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a leading BOM is dropped
    except (OSError, UnicodeDecodeError) as e:
        skipped.append((str(path), f"{type(e).__name__}: {e}"))
        return
    if path.suffix != ".jsonl":
        if text.strip():
            yield text
        return
    # split("\n"), not splitlines(): the latter also breaks at U+2028, U+0085 and friends,
    # which JSON allows raw inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[text_field]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            skipped.append((f"{path}:{lineno}", f"no string field {text_field!r} ({e!r})"))
            continue
        if not isinstance(value, str):
            skipped.append((f"{path}:{lineno}", f"field {text_field!r} is not a string"))
        elif not _encodable(value):
            skipped.append((f"{path}:{lineno}", f"field {text_field!r} has a lone surrogate escape "
                                                f"(not valid Unicode)"))
        elif value.strip():
            yield value


def _parquet_documents(path: Path, text_field: str, skipped: list) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed "
                        f"(pip install pyarrow)") from None
    try:
        table = pq.read_table(path, columns=[text_field])
    except Exception as e:  # pyarrow raises its own zoo of types for bad files/columns
        skipped.append((str(path), f"{type(e).__name__}: {e}"))
        return
    for row, value in enumerate(table.column(text_field).to_pylist()):
        if isinstance(value, str) and value.strip():
            yield value
        elif value is not None and not isinstance(value, str):
            skipped.append((f"{path}:row {row}", f"column {text_field!r} is not a string"))


def _encodable(text: str) -> bool:
    """JSON can spell lone surrogates (\\ud800), which no UTF-8 tokenizer can encode."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        first = "; ".join(f"{where}: {why}" for where, why in skipped[:3])
        warnings.warn(f"skipped {len(skipped)} unreadable or undecodable "
                      f"file(s)/record(s) (first: {first})", stacklevel=3)
