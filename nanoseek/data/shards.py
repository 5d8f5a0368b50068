"""Token shards on disk: the document split, the file format, its writer and its reader.

A prepared dataset is a directory:

    train.bin  val.bin   flat token streams (documents back to back, each BOS ... EOS)
    meta.json            tokenizer, counts, seq_len, FIM rate, raw bytes per split
    tokenizer/           the HF tokenizer dir the tokens came from

Packing is just concatenation: the stream is stored flat and training cuts windows of
seq_len+1 tokens out of it (see loader.py), so the same shards serve any sequence length and
no token is lost to padding. Like DeepSeek-V3, there is no cross-document attention mask:
a window may span a document boundary and the model learns that BOS starts afresh.

Each .bin file is a fixed 32-byte little-endian header followed by the raw tokens:

    magic      8 bytes   b"NSEEKTOK"
    version    uint32    1
    dtype      uint32    1 = uint16 (vocab <= 65536), 2 = uint32
    num_tokens uint64
    vocab_size uint64    the tokenizer's, so a mismatched tokenizer or model is caught

Reading memory-maps the tokens after validating the header against the file size, so a
truncated copy or a foreign file fails loudly at open instead of training on garbage.
"""

import json
import math
import os
import random
import struct
import tempfile
from pathlib import Path

import numpy as np

from nanoseek.atomic import write_atomic
from nanoseek.data.corpus import DataError

MAGIC = b"NSEEKTOK"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")  # magic, version, dtype code, num_tokens, vocab_size
DTYPES = {1: np.dtype(np.uint16), 2: np.dtype(np.uint32)}


def split_documents(docs: list[str], val_fraction: float, seed: int
                    ) -> tuple[list[str], list[str]]:
    """Document-level train/val split: (train_docs, val_docs), each in corpus order.

    Splitting whole documents (not token ranges) keeps validation text unseen in training;
    identical documents are kept once (the first), so none lands in both splits. At least one
    document goes to each side; the choice depends only on seed and the number of documents.
    """
    docs = list(dict.fromkeys(docs))
    if not 0 < val_fraction < 1:
        raise DataError(f"val fraction must be between 0 and 1, got {val_fraction}")
    if len(docs) < 2:
        raise DataError(f"need at least 2 documents to split into train and val, got "
                        f"{len(docs)} (identical documents count once)")
    num_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val_idx = set(random.Random(seed).sample(range(len(docs)), num_val))
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest dtype holding ids 0..vocab_size-1: halves the file for small vocabs."""
    return DTYPES[1] if vocab_size <= 1 << 16 else DTYPES[2]


class ShardWriter:
    """Streams token ids into a .bin file, atomically.

    Tokens go to a temp file next to `path`; `close()` fills in the header's count, fsyncs
    and renames it into place. On an exception inside `with`, the temp file is removed and
    any existing `path` is left untouched.

        with ShardWriter(out / "train.bin", vocab_size) as w:
            for doc in docs:
                w.write(doc)
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.num_tokens = 0
        fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        self._file = os.fdopen(fd, "wb")
        self._file.write(self._header())  # placeholder until the count is known

    def write(self, ids) -> None:
        """Append token ids (a list or 1-D array); every id must be < vocab_size."""
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise DataError(f"token id {int(arr.max())} out of range for vocab size "
                            f"{self.vocab_size} while writing {self.path}")
        self._file.write(arr.astype(self.dtype).tobytes())
        self.num_tokens += arr.size

    def close(self) -> int:
        """Finish the file and move it into place; returns the token count."""
        self._file.seek(0)
        self._file.write(self._header())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(self._tmp, self.path)
        return self.num_tokens

    def abort(self) -> None:
        self._file.close()
        os.unlink(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _header(self) -> bytes:
        code = 1 if self.dtype == DTYPES[1] else 2
        return HEADER.pack(MAGIC, VERSION, code, self.num_tokens, self.vocab_size)


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int, int]:
    """Validate a .bin file's header against its size: (dtype, num_tokens, vocab_size)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no token shard at {path} (run `nanoseek prepare --out DIR`)")
    size = path.stat().st_size
    if size < HEADER.size:
        raise DataError(f"{path} is truncated: {size} bytes, shorter than the "
                        f"{HEADER.size}-byte header")
    with open(path, "rb") as f:
        magic, version, code, num_tokens, vocab_size = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise DataError(f"{path} is not a nanoseek token shard: magic bytes {magic!r}, "
                        f"expected {MAGIC!r}")
    if version != VERSION:
        raise DataError(f"{path} has format version {version}; this code reads "
                        f"version {VERSION} (re-run nanoseek prepare)")
    if code not in DTYPES:
        raise DataError(f"{path} has unknown dtype code {code} (corrupted header?)")
    dtype = DTYPES[code]
    expected = HEADER.size + num_tokens * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "corrupted (trailing bytes)"
        raise DataError(f"{path} is {what}: header says {num_tokens} {dtype.name} tokens "
                        f"= {expected} bytes, file has {size} bytes")
    if vocab_size == 0 or dtype != dtype_for_vocab(vocab_size):
        raise DataError(f"{path} has a corrupted header: vocab size {vocab_size} "
                        f"with dtype {dtype.name}")
    return dtype, num_tokens, vocab_size


class TokenShards:
    """One split of a prepared dataset, memory-mapped.

    path_or_dir: the prepare output dir (reads `{split}.bin` and meta.json) or a .bin file.
    tokenizer_vocab_size: if given, must equal the vocab the shards were built with: ids
        from another tokenizer would be silently wrong.
    model_vocab_size: if given, must be >= the shards' vocab (a model's embedding may be
        padded past the tokenizer, e.g. DeepSeek-V3's 129,280 rows for 128,815 ids).

    Attributes: tokens (np.memmap [num_tokens] uint16/uint32), num_tokens, vocab_size,
    meta (meta.json dict or None), bytes_per_token (raw UTF-8 bytes / tokens, or None).
    """

    def __init__(self, path_or_dir: str | os.PathLike, split: str = "train", *,
                 tokenizer_vocab_size: int | None = None,
                 model_vocab_size: int | None = None):
        path = Path(path_or_dir)
        self.path = path / f"{split}.bin" if path.is_dir() else path
        self.split = split
        dtype, self.num_tokens, self.vocab_size = read_header(self.path)
        if self.num_tokens == 0:
            self.tokens = np.zeros(0, dtype=dtype)  # mmap refuses zero-length maps
        else:
            self.tokens = np.memmap(self.path, dtype=dtype, mode="r", offset=HEADER.size,
                                    shape=(self.num_tokens,))
        meta_path = self.path.parent / "meta.json"
        try:
            self.meta = json.loads(meta_path.read_text("utf-8")) if meta_path.is_file() else None
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path}: not valid JSON ({e}); re-run nanoseek prepare for this dataset") from None
        if self.meta is not None and not isinstance(self.meta, dict):
            raise DataError(f"{meta_path}: not a JSON object; re-run nanoseek prepare for this dataset")
        self.bytes_per_token = None
        info = self._split_info()
        if info is not None:
            if info["tokens"] != self.num_tokens or self.meta["vocab_size"] != self.vocab_size:
                raise DataError(f"{meta_path} does not describe {self.path} (meta says "
                                f"{info['tokens']} tokens, vocab {self.meta['vocab_size']}; "
                                f"file has {self.num_tokens}, vocab {self.vocab_size}); "
                                f"re-run nanoseek prepare")
            self.bytes_per_token = info["bytes"] / max(1, self.num_tokens)
        if tokenizer_vocab_size is not None and tokenizer_vocab_size != self.vocab_size:
            raise DataError(f"tokenizer mismatch: {self.path} was built with a "
                            f"{self.vocab_size}-token vocabulary, but the tokenizer in use "
                            f"has {tokenizer_vocab_size}; use the tokenizer saved next to "
                            f"the shards or re-run nanoseek prepare")
        if model_vocab_size is not None and model_vocab_size < self.vocab_size:
            raise DataError(f"vocab mismatch: {self.path} holds ids up to "
                            f"{self.vocab_size - 1}, but the model's vocab_size is "
                            f"{model_vocab_size}")

    def bits_per_byte(self, loss_nats: float) -> float:
        """Mean next-token loss (nats/token) -> bits per raw UTF-8 byte of this split.

        bpb = loss * tokens / (ln 2 * bytes): comparable across tokenizers, unlike loss.
        """
        if self.bytes_per_token is None:
            raise DataError(f"no meta.json with byte counts next to {self.path}")
        return loss_nats / (math.log(2) * self.bytes_per_token)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.path)!r}, tokens={self.num_tokens}, "
                f"vocab_size={self.vocab_size})")

    def _split_info(self) -> dict | None:
        if self.meta is None:
            return None
        for info in self.meta.get("splits", {}).values():
            if info.get("file") == self.path.name:
                return info
        return None


def write_meta(path: str | os.PathLike, meta: dict) -> None:
    """meta.json, atomically (it is written last: its presence marks a finished prepare)."""
    write_atomic(path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
