"""Data pipeline: corpus, tokenizer, FIM, shards, loader and the `prepare` stage."""

import json
import random
import sys
import warnings

import numpy as np
import pytest
import torch

from nanoseek.data import (BatchLoader, DataError, ShardWriter, TokenShards, Tokenizer,
                           encode_documents, eval_batches, fim_split, fim_tokens,
                           load_deepseek_v3, read_corpus, split_documents, stdlib_corpus,
                           stdlib_files, train_bpe)
from nanoseek.data.shards import HEADER, MAGIC
from nanoseek.data.tokenizer import (ASSISTANT, BOS, CHAT_TEMPLATE, EOS, FIM_BEGIN, FIM_END,
                                     FIM_HOLE, THINK_BEGIN, THINK_END, USER, deepseek_v3_dir)
from nanoseek.stages import prepare

# Documents with the things byte-level BPE round trips must survive: indentation, tabs,
# CRLF, trailing spaces, digits, CJK, emoji, combining marks, and no final newline.
DOCS = [
    "def add(a, b):\n    return a + b\n",
    "Hello, world!  Trailing spaces   \n\tTabbed line\r\nCRLF line 1234567890",
    "中文文本和日本語のテキスト、カタカナ。 Emoji: 🦙🚀 — e\u0301 combined",
    "class Foo:\n    \"\"\"Docstring.\"\"\"\n\n    x = [i ** 2 for i in range(10)]\n",
    "# Markdown\n\n* item one\n* item two\n\n```python\nprint('hi')\n```",
] + [f"doc {i}: the quick brown fox jumps over the lazy dog {i * 7919}\n" * (1 + i % 5)
     for i in range(60)]


def stream_of(shards: TokenShards) -> list[int]:
    return [int(t) for t in shards.tokens]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(DOCS * 3, vocab_size=600)


@pytest.fixture(scope="module")
def bpe_dir(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe.save(path)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """`prepare` run on a small directory corpus with FIM off; returns (out dir, docs)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.py").write_text(DOCS[0], encoding="utf-8")
    (root / "b.txt").write_text(DOCS[1], encoding="utf-8", newline="")
    (root / "sub").mkdir()
    (root / "sub" / "c.md").write_text(DOCS[4], encoding="utf-8")
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[2:4] + DOCS[5:])]
    (root / "sub" / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \x80")  # skipped with a warning
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("never read")
    (root / "notes.csv").write_text("ignored suffix in a directory walk")
    out = tmp_path_factory.mktemp("prepared")
    prepare.main([str(root), "--out", str(out), "--vocab-size", "600", "--seq-len", "16",
                  "--val-fraction", "0.1", "--fim-rate", "0", "--seed", "3"])
    # The corpus in reading order: sorted walk, a.py, b.txt, sub/c.md, sub/d.jsonl.
    docs = [DOCS[0], DOCS[1], DOCS[4]] + DOCS[2:4] + DOCS[5:]
    return out, docs


# ---------------------------------------------------------------- corpus


def test_read_corpus_order_fields_and_skips(tmp_path):
    (tmp_path / "b.jsonl").write_text(
        '{"body": "first"}\nnot json\n{"body": 3}\n{"other": "x"}\n\n{"body": "second"}\n')
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.bin.txt").write_bytes(b"\x80\x81")
    with pytest.warns(UserWarning, match="skipped 4"):
        corpus = read_corpus([tmp_path], text_field="body")
    assert corpus.documents == ["alpha", "first", "second"]
    assert len(corpus.skipped) == 4
    assert corpus.num_bytes == len("alphafirstsecond")
    with pytest.warns(UserWarning):
        capped = read_corpus([tmp_path], text_field="body", max_docs=2)
    assert capped.documents == ["alpha", "first"]
    # Raw line separators are legal inside JSON strings; they must not split a record.
    odd = "a\u2028b\x85c\rd"
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": odd}, ensure_ascii=False) + "\n",
                                        encoding="utf-8", newline="")
    assert read_corpus([tmp_path / "odd.jsonl"]).documents == [odd]


def test_read_corpus_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_corpus([tmp_path / "missing"])
    with pytest.raises(DataError, match="no documents found"):
        read_corpus([tmp_path])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        read_corpus([tmp_path / "x.csv"])


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="needs pyarrow"):
        read_corpus([tmp_path / "t.parquet"])


def test_parquet_documents_are_read(tmp_path):
    """A real parquet file (written with pyarrow): rows in order from the text column, empty and null
    rows dropped, a non-string value skipped with a warning, and a file without the column skipped
    whole (pyarrow is in the test extra)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "", None, "second doc\nwith two lines", "  ", "héllo 🦙"],
                             "id": [1, 2, 3, 4, 5, 6]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["other field"], "n": [7]}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"body": [3]}), tmp_path / "c.parquet")
    assert read_corpus([tmp_path / "a.parquet"]).documents == ["first doc", "second doc\nwith two lines", "héllo 🦙"]
    assert read_corpus([tmp_path / "b.parquet"], text_field="body").documents == ["other field"]
    with pytest.warns(UserWarning, match="skipped 2"):  # b.parquet has no "text"; c.parquet's is not str
        corpus = read_corpus([tmp_path], text_field="text")
    assert corpus.documents == ["first doc", "second doc\nwith two lines", "héllo 🦙"]
    with pytest.raises(DataError, match="no documents found.*1 skipped"):
        read_corpus([tmp_path / "c.parquet"], text_field="body")


def test_stdlib_corpus_is_deterministic_and_capped():
    a = stdlib_corpus(max_bytes=100_000)
    b = stdlib_corpus(max_bytes=100_000)
    assert a.documents == b.documents and len(a.documents) > 1
    # The cap is reached by the last document at most (documents are never cut).
    assert a.num_bytes - len(a.documents[-1].encode()) < 100_000 <= a.num_bytes
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert any(f.parent.name == "asyncio" for f in files)  # packages are walked
    for f in files:
        assert f.suffix == ".py" and f.stat().st_size <= 256 * 1024
        assert not {"test", "tests", "idlelib", "site-packages"} & set(f.parts), f


def test_split_documents():
    docs = [f"d{i}" for i in range(50)]
    train, val = split_documents(docs, 0.1, seed=1)
    assert len(val) == 5 and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.1, seed=1) == (train, val)
    assert split_documents(docs, 0.1, seed=2) != (train, val)
    assert len(split_documents(docs[:3], 0.01, seed=0)[1]) == 1  # at least one val doc
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(docs[:1], 0.1, seed=0)


# ---------------------------------------------------------------- tokenizer


def test_bpe_layout_mirrors_deepseek(bpe):
    real = load_deepseek_v3()
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 1) == (real.bos_id, real.eos_id,
                                                                  real.pad_id)
    assert bpe.vocab_size == 600
    # The tail tokens sit at the end of the vocabulary in the real order.
    tail = [THINK_BEGIN, THINK_END, FIM_HOLE, FIM_BEGIN, FIM_END, USER, ASSISTANT]
    for tok in (bpe, real):
        ids = [tok.token_id(t) for t in tail]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert [bpe.fim_begin_id, bpe.fim_hole_id, bpe.fim_end_id] == [
        bpe.token_id(FIM_BEGIN), bpe.token_id(FIM_HOLE), bpe.token_id(FIM_END)]
    assert real.fim_hole_id == 128800 and real.think_begin_id == 128798
    assert json.loads(bpe.tk.to_str())["pre_tokenizer"] == \
        json.loads(real.tk.to_str())["pre_tokenizer"]
    # Special-token strings are single ids; BOS/EOS are dropped by skip_special_tokens,
    # <think> is not (it is an ordinary added token in DeepSeek-V3 too).
    text = f"{BOS}{USER}hi{ASSISTANT}{THINK_BEGIN}x{THINK_END}y{EOS}"
    for tok in (bpe, real):
        ids = tok.encode(text)
        assert ids[:2] == [tok.bos_id, tok.user_id] and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == f"{USER}hi{ASSISTANT}" \
                                                            f"{THINK_BEGIN}x{THINK_END}y"
    with pytest.raises(KeyError):
        bpe.token_id("<not a token>")


def test_encode_decode_round_trip(bpe):
    for doc in DOCS:
        assert bpe.decode(bpe.encode(doc)) == doc
        assert bpe.encode(doc, add_bos=True) == [bpe.bos_id] + bpe.encode(doc)
    assert bpe.encode_batch(DOCS[:3]) == [bpe.encode(d) for d in DOCS[:3]]
    ids = bpe.encode(DOCS[2])
    assert bpe.decode(torch.tensor(ids)) == bpe.decode(np.array(ids)) == DOCS[2]


def test_save_and_from_dir(bpe, bpe_dir, tmp_path):
    loaded = Tokenizer.from_dir(bpe_dir)
    assert loaded.fingerprint() == bpe.fingerprint()
    assert loaded.encode(DOCS[2]) == bpe.encode(DOCS[2])
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text("utf-8"))
    assert config["bos_token"] == BOS and config["pad_token"] == EOS
    assert config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((bpe_dir / "special_tokens_map.json").read_text("utf-8"))[
        "eos_token"] == EOS
    with pytest.raises(DataError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_is_deepseek_v3s():
    config = json.loads((deepseek_v3_dir() / "tokenizer_config.json").read_text("utf-8"))
    assert CHAT_TEMPLATE == config["chat_template"]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Be kind."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "<think>2+2=4</think>4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get", "arguments": '{"city": "X"}'}},
         {"type": "function", "function": {"name": "get2", "arguments": "{}"}}]},
     {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "20C"},
     {"role": "assistant", "content": "Sunny, 20C."},
     {"role": "user", "content": "thanks"},
     {"role": "assistant", "content": "again", "tool_calls": [
         {"type": "function", "function": {"name": "h", "arguments": "{}"}}]},
     {"role": "tool", "content": "out"}],
]


@pytest.mark.parametrize("which", ["bpe", "deepseek-v3"])
def test_chat_template_matches_transformers(which, bpe_dir):
    transformers = pytest.importorskip("transformers")
    path = bpe_dir if which == "bpe" else deepseek_v3_dir()
    ours = Tokenizer.from_dir(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoTokenizer.from_pretrained(str(path))
    for messages in CONVERSATIONS:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    text = ours.apply_chat_template(CONVERSATIONS[1])
    assert text.startswith(BOS + "Be brief.\n\nBe kind." + USER)
    assert text.endswith(ASSISTANT) and "2+2=4" not in text  # past reasoning dropped
    assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
    assert hf.encode(DOCS[2], add_special_tokens=False) == ours.encode(DOCS[2])


def test_foreign_chat_template_rendered_like_transformers(bpe, tmp_path):
    transformers = pytest.importorskip("transformers")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}" \
               "{% if add_generation_prompt %}[assistant]{% endif %}"
    Tokenizer(bpe.tk, {**bpe.config, "chat_template": template}).save(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    expected = hf.apply_chat_template(CONVERSATIONS[1], tokenize=False,
                                      add_generation_prompt=True)
    assert ours.apply_chat_template(CONVERSATIONS[1]) == expected
    assert expected.startswith("[system] Be brief.\n")


def test_deepseek_v3_tokenizer_round_trips():
    tok = load_deepseek_v3()
    assert tok.vocab_size == 128815 and tok.name == "deepseek-v3"
    assert tok.model_max_length == 131072
    for doc in DOCS:
        assert tok.decode(tok.encode(doc)) == doc
    assert tok.encode("Hello world") == [19923, 2058]  # known ids of the real vocabulary


# ---------------------------------------------------------------- FIM


def test_fim_tokens_layout(bpe):
    pre, mid, suf = [10, 11], [20], [30, 31, 32]
    assert fim_tokens(bpe, pre, mid, suf) == [
        bpe.bos_id, bpe.fim_begin_id, 10, 11, bpe.fim_hole_id, 30, 31, 32,
        bpe.fim_end_id, 20, bpe.eos_id]


def test_document_forced_into_fim(bpe):
    text = DOCS[3]
    docs, num_fim = encode_documents(bpe, [text], random.Random(5), fim_rate=1.0)
    assert num_fim == 1
    # Replay the same random stream: one draw for "FIM or not", then the two cuts.
    replay = random.Random(5)
    replay.random()
    pre, mid, suf = fim_split(text, replay)
    assert pre + mid + suf == text
    ids = docs[0]
    assert ids == ([bpe.bos_id, bpe.fim_begin_id] + bpe.encode(pre) + [bpe.fim_hole_id]
                   + bpe.encode(suf) + [bpe.fim_end_id] + bpe.encode(mid) + [bpe.eos_id])
    # Each FIM marker occurs exactly once and in PSM order.
    for marker in (bpe.fim_begin_id, bpe.fim_hole_id, bpe.fim_end_id):
        assert ids.count(marker) == 1
    assert ids.index(bpe.fim_begin_id) < ids.index(bpe.fim_hole_id) < ids.index(
        bpe.fim_end_id)


def test_fim_pieces_are_pinned_for_a_fixed_seed(bpe):
    """The cuts for a fixed seed, pinned (not replayed through the project's own split function):
    two uniform character positions, sorted; then the PSM layout puts the middle last."""
    rng = random.Random(1234)
    text = "0123456789abcdefghij"
    assert [fim_split(text, rng) for _ in range(4)] == [
        ("012", "3456789abcd", "efghij"), ("", "01", "23456789abcdefghij"),
        ("0", "123456789abcdefgh", "ij"), ("01", "2", "3456789abcdefghij")]
    texts = ["def add(a, b):\n    return a + b\n", "Hello, world!"]
    docs, num_fim = encode_documents(bpe, texts, random.Random(3), fim_rate=1.0)
    pieces = []
    for ids in docs:
        hole, end = ids.index(bpe.fim_hole_id), ids.index(bpe.fim_end_id)
        assert ids[:2] == [bpe.bos_id, bpe.fim_begin_id] and ids[-1] == bpe.eos_id
        pieces.append((bpe.decode(ids[2:hole]), bpe.decode(ids[end + 1:-1]), bpe.decode(ids[hole + 1:end])))
    assert num_fim == 2 and pieces == [("def add(", "a, b):\n    retu", "rn a + b\n"),
                                       ("Hello, ", "wor", "ld!")]  # (pre, middle, suf)


def test_fim_middle_length_distribution():
    """Two independent uniform cuts of an n-character text: the middle is |i - j| long, so its mean
    is ~n/3, it is empty with probability 1/(n+1), longer than n/2 with probability ~1/4, and the
    prefix and suffix are ~n/3 long each on average."""
    rng, n, N = random.Random(0), 100, 4000
    text = "x" * n
    splits = [fim_split(text, rng) for _ in range(N)]
    assert all(pre + mid + suf == text for pre, mid, suf in splits)
    mid = np.array([len(m) for _, m, _ in splits])
    assert 0.31 < mid.mean() / n < 0.36
    assert (mid == 0).mean() < 0.03 and 0.2 < (mid > n / 2).mean() < 0.3
    assert 0.3 < np.mean([len(p) for p, _, _ in splits]) / n < 0.37
    assert 0.3 < np.mean([len(s) for _, _, s in splits]) / n < 0.37


def test_fim_rate_and_determinism(bpe):
    texts = [f"text number {i}" for i in range(2000)]
    docs, num_fim = encode_documents(bpe, texts, random.Random(0), fim_rate=0.1)
    assert 140 < num_fim < 260
    assert sum(d[1] == bpe.fim_begin_id for d in docs) == num_fim
    plain = [d for d in docs if d[1] != bpe.fim_begin_id]
    assert all(d[0] == bpe.bos_id and d[-1] == bpe.eos_id for d in plain)
    assert encode_documents(bpe, texts, random.Random(0), fim_rate=0.1)[0] == docs
    assert encode_documents(bpe, texts, random.Random(1), fim_rate=0.1)[0] != docs
    assert encode_documents(bpe, texts, random.Random(0), fim_rate=0.0)[1] == 0


# ---------------------------------------------------------------- shards and batches


def test_round_trip_documents_through_shards_and_batches(prepared):
    out, docs = prepared
    tok = Tokenizer.from_dir(out / "tokenizer")
    meta = json.loads((out / "meta.json").read_text("utf-8"))
    train_docs, val_docs = split_documents(docs, 0.1, seed=3)
    for split, expected in (("train", train_docs), ("val", val_docs)):
        shards = TokenShards(out, split, tokenizer_vocab_size=tok.vocab_size)
        assert shards.num_tokens == meta["splits"][split]["tokens"]
        # seq_len=1 windows overlap by one token, so their inputs plus the last target
        # are the whole stream.
        batches = list(eval_batches(shards, batch_size=7, seq_len=1))
        stream = torch.cat([x[:, 0] for x, _ in batches]).tolist() + [int(batches[-1][1][-1])]
        assert stream == stream_of(shards)
        # Split the stream back into documents: BOS text EOS each.
        decoded, start = [], 0
        for i, t in enumerate(stream):
            if t == tok.eos_id:
                assert stream[start] == tok.bos_id
                decoded.append(tok.decode(stream[start + 1:i]))
                start = i + 1
        assert decoded == expected
        assert shards.bytes_per_token == pytest.approx(
            sum(len(d.encode()) for d in expected) / shards.num_tokens)


def test_batch_loader_windows_and_epochs(prepared):
    out, _ = prepared
    shards = TokenShards(out, "train")
    stream = np.asarray(stream_of(shards))
    T, B = 16, 4
    loader = BatchLoader(shards, batch_size=B, seq_len=T, seed=0)
    windows = {tuple(stream[k * T:k * T + T + 1]): k for k in range(loader.num_windows)}
    assert len(windows) == loader.num_windows  # rows identify their window uniquely
    epochs = []
    for epoch in range(2):
        seen = []
        for _ in range(loader.steps_per_epoch):
            x, y = next(loader)
            assert x.shape == y.shape == (B, T) and x.dtype == torch.long
            assert torch.equal(x[:, 1:], y[:, :-1])
            full = torch.cat([x, y[:, -1:]], dim=1).numpy()
            seen += [windows[tuple(row)] for row in full]  # KeyError: not a window
        assert loader.state_dict()["epoch"] == epoch
        # One epoch visits distinct windows, all but a leftover that doesn't fill a batch.
        assert len(set(seen)) == len(seen) == loader.steps_per_epoch * B
        assert loader.num_windows - len(seen) < B
        epochs.append(seen)
    assert sorted(epochs[0]) != epochs[0]  # shuffled
    assert epochs[0] != epochs[1]  # and reshuffled each epoch


def test_batch_loader_resume_is_exact(prepared):
    out, _ = prepared
    shards = TokenShards(out, "train")
    a = BatchLoader(shards, batch_size=3, seq_len=8, seed=7)
    for _ in range(2 * a.steps_per_epoch - 2):  # near the end of the second epoch
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON checkpoint
    assert all(type(v) is int for v in state.values()) and state["epoch"] == 1
    expected = [next(a) for _ in range(5)]  # crosses into the next epoch
    b = BatchLoader(shards, batch_size=3, seq_len=8, seed=7)
    assert not torch.equal(next(b)[0], expected[0][0])
    b.load_state_dict(state)
    for (x, y), (ex, ey) in zip((next(b) for _ in range(5)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(DataError, match="seed"):
        BatchLoader(shards, batch_size=3, seq_len=8, seed=8).load_state_dict(state)


def test_batch_loader_ranks_partition_the_global_batch(prepared):
    out, _ = prepared
    shards = TokenShards(out, "train")
    single = BatchLoader(shards, batch_size=4, seq_len=8, seed=1)
    ranks = [BatchLoader(shards, 2, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = next(single)
        assert torch.equal(x, torch.cat([next(r)[0] for r in ranks]))
    with pytest.raises(DataError, match="fewer than one step"):
        BatchLoader(shards, batch_size=10_000, seq_len=8, seed=0)


def test_eval_batches_in_order_and_capped(prepared):
    out, _ = prepared
    shards = TokenShards(out, "val")
    stream = stream_of(shards)
    batches = list(eval_batches(shards, batch_size=2, seq_len=4))
    rows = torch.cat([x for x, _ in batches]).tolist()
    assert rows == [stream[k * 4:k * 4 + 4] for k in range((len(stream) - 1) // 4)]
    assert len(list(eval_batches(shards, batch_size=2, seq_len=4, max_batches=1))) == 1
    r0 = list(eval_batches(shards, batch_size=2, seq_len=4, rank=0, world_size=2))
    r1 = list(eval_batches(shards, batch_size=2, seq_len=4, rank=1, world_size=2))
    assert len(r0) + len(r1) == len(batches)
    assert torch.equal(r1[0][0], batches[1][0])


def corrupt_copy(prepared, tmp_path, edit) -> str:
    data = bytearray((prepared[0] / "train.bin").read_bytes())
    path = tmp_path / "train.bin"
    path.write_bytes(bytes(edit(data)))
    return str(path)


def test_truncated_shard_is_a_clear_error(prepared, tmp_path):
    path = corrupt_copy(prepared, tmp_path, lambda d: d[:-3])
    with pytest.raises(DataError, match=r"train\.bin is truncated: header says \d+ uint16"):
        TokenShards(path)
    path = corrupt_copy(prepared, tmp_path, lambda d: d[:10])
    with pytest.raises(DataError, match="shorter than the 32-byte header"):
        TokenShards(path)
    path = corrupt_copy(prepared, tmp_path, lambda d: d + b"\0\0")
    with pytest.raises(DataError, match="trailing bytes"):
        TokenShards(path)


def test_wrong_magic_version_or_missing_shard(prepared, tmp_path):
    path = corrupt_copy(prepared, tmp_path, lambda d: b"NOTATOKS" + d[8:])
    with pytest.raises(DataError, match="not a nanoseek token shard: magic bytes"):
        TokenShards(path)
    path = corrupt_copy(prepared, tmp_path, lambda d: d[:8] + b"\x09\0\0\0" + d[12:])
    with pytest.raises(DataError, match="format version 9"):
        TokenShards(path)
    with pytest.raises(DataError, match="no token shard"):
        TokenShards(tmp_path / "nope.bin")


def test_vocab_mismatch_is_a_clear_error(prepared, tmp_path):
    out, _ = prepared
    vocab = TokenShards(out).vocab_size
    with pytest.raises(DataError, match=f"tokenizer mismatch.*{vocab}-token.*128815"):
        TokenShards(out, tokenizer_vocab_size=load_deepseek_v3().vocab_size)
    with pytest.raises(DataError, match="vocab mismatch"):
        TokenShards(out, model_vocab_size=vocab - 1)
    TokenShards(out, model_vocab_size=vocab + 100)  # a padded embedding is fine
    # A meta.json from another run next to the shard is caught too.
    path = corrupt_copy(prepared, tmp_path, lambda d: d)
    meta = json.loads((out / "meta.json").read_text("utf-8"))
    meta["splits"]["train"]["tokens"] += 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not describe"):
        TokenShards(path)


def test_shard_writer_is_atomic_and_checks_ids(tmp_path):
    path = tmp_path / "x.bin"
    with ShardWriter(path, vocab_size=100_000) as w:
        w.write([1, 99_999])
    assert TokenShards(path).tokens.dtype == np.uint32
    assert stream_of(TokenShards(path)) == [1, 99_999]
    before = path.read_bytes()
    with pytest.raises(DataError, match="out of range"):
        with ShardWriter(path, vocab_size=10) as w:
            w.write([3, 10])
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    assert before[:8] == MAGIC and len(before) == HEADER.size + 2 * 4


# ---------------------------------------------------------------- the prepare stage


def test_prepare_outputs(prepared, capsys):
    out, docs = prepared
    meta = json.loads((out / "meta.json").read_text("utf-8"))
    assert meta["corpus"]["docs"] == len(docs) and meta["corpus"]["skipped"] == 1
    assert meta["splits"]["val"]["docs"] == 6 and meta["seq_len"] == 16
    assert meta["tokenizer"]["sha256"] == Tokenizer.from_dir(out / "tokenizer").fingerprint()
    assert {p.name for p in out.iterdir()} == {"tokenizer", "train.bin", "val.bin",
                                               "meta.json"}


def test_prepare_fim_and_deepseek_v3(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"content": d}) for d in DOCS * 4))
    out = tmp_path / "out"
    prepare.main([str(src), "--out", str(out), "--tokenizer", "deepseek-v3",
                  "--text-field", "content", "--fim-rate", "0.5", "--seq-len", "32"])
    assert "tokens" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text("utf-8"))
    assert meta["vocab_size"] == 128815 and meta["tokenizer"]["name"] == "deepseek-v3"
    assert 0 < meta["splits"]["train"]["fim_docs"] < meta["splits"]["train"]["docs"]
    train = TokenShards(out, "train", tokenizer_vocab_size=128815)
    assert train.tokens.dtype == np.uint32
    tok = Tokenizer.from_dir(out / "tokenizer")
    stream = stream_of(train)
    assert stream.count(tok.fim_begin_id) == meta["splits"]["train"]["fim_docs"]
    assert stream.count(tok.bos_id) == meta["splits"]["train"]["docs"]
    assert len(list(eval_batches(TokenShards(out, "val"), 4, 32))) > 0


def test_prepare_embedded_stdlib_corpus(tmp_path, capsys):
    out = tmp_path / "out"
    prepare.main(["--out", str(out), "--max-bytes", "300000", "--seq-len", "64",
                  "--vocab-size", "1024", "--val-fraction", "0.05"])
    printed = capsys.readouterr().out
    assert "bytes/token" in printed
    meta = json.loads((out / "meta.json").read_text("utf-8"))
    assert meta["corpus"]["sources"][0].startswith("stdlib:")
    total = meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]
    assert 300_000 <= total < 600_000
    train = TokenShards(out)
    assert train.vocab_size == 1024 and 2 < train.bytes_per_token < 6
    assert train.bits_per_byte(1.0) == pytest.approx(1 / (np.log(2) * train.bytes_per_token))
    x, y = next(BatchLoader(train, batch_size=4, seq_len=64, seed=0))
    assert int(x.max()) < 1024


@pytest.mark.parametrize("argv, message", [
    (["/no/such/path"], "no such file or directory: /no/such/path"),
    (["{empty}"], "no documents found in"),
    (["{corpus}", "--tokenizer", "{empty}"], "no tokenizer.json in"),  # before reading the corpus
    (["{corpus}", "--seq-len", "100000"], "less than one window"),
])
def test_prepare_bad_inputs_exit_with_message(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    subs = {"{empty}": str(tmp_path / "empty"), "{corpus}": str(corpus)}
    # A small BPE keeps the cases fast; --vocab-size goes only with the bpe tokenizer.
    extra = [] if "--tokenizer" in argv else ["--vocab-size", "300"]
    argv = [subs.get(a, a) for a in argv] + ["--out", str(tmp_path / "out")] + extra
    try:
        code = prepare.main(argv)
    except SystemExit as e:  # a check made while parsing the flags
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "required: --out"),
    (["--out", "x", "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["--out", "x", "--fim-rate", "-0.1"], "--fim-rate must be between 0 and 1"),
    (["--out", "x", "--tokenizer", "deepseek-v3", "--vocab-size", "10"], "only applies"),
    (["--out", "x", "--max-bytes", "0"], "--max-bytes must be >= 1"),
])
def test_prepare_bad_flags_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
