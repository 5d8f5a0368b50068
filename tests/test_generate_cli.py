"""`nanoseek generate` end to end on a tiny random checkpoint with a tiny BPE tokenizer."""

import io
import json
import subprocess
import sys

import pytest
import torch

from nanoseek.data import train_bpe
from nanoseek.model import Transformer, preset
from nanoseek.stages import generate


# tiny models: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "model"
    tok = train_bpe([f"hello world {i}, the quick brown fox <think> jumps" for i in range(100)], vocab_size=320)
    torch.manual_seed(0)
    Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(path)
    tok.save(path)
    return path


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = generate.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prompt_streams_a_completion(model_dir, capsys):
    code, out, err = run(["--model", model_dir, "--prompt", "hello", "--max-new-tokens", 8, "--seed", 0], capsys)
    assert code == 0 and out.endswith("\n") and "tokens in" in err
    code2, out2, _ = run(["--model", model_dir, "--prompt", "hello", "--max-new-tokens", 8, "--seed", 0], capsys)
    assert out2 == out  # seeded
    code, out, err = run(["--model", model_dir, "--prompt", "hello", "--max-new-tokens", 8, "--temperature", 0,
                          "--speculative", "mtp", "--no-chat"], capsys)
    assert code == 0 and "MTP acceptance" in err


def test_input_file_writes_jsonl(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n\nthe quick brown fox\nhéllo\n", encoding="utf-8")
    out_file = tmp_path / "out.jsonl"
    code, _, err = run(["--model", model_dir, "--input-file", prompts, "--output", out_file, "--max-new-tokens", 6,
                        "--temperature", 0, "--batch-size", 2], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["hello world", "the quick brown fox", "héllo"]
    for r in rows:
        assert set(r) == {"prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason"}
        assert 1 <= r["completion_tokens"] <= 6 and r["prompt_tokens"] > 3
        assert r["finish_reason"] in ("stop", "length")
    # the same prompt alone gives the same greedy completion as in the batch
    code, out, _ = run(["--model", model_dir, "--prompt", "héllo", "--max-new-tokens", 6, "--temperature", 0],
                       capsys)
    assert out[:-1] == rows[2]["completion"]


def test_interactive_keeps_history_and_obeys_commands(model_dir, capsys, monkeypatch):
    code, out, err = run(["--model", model_dir, "--interactive", "--max-new-tokens", 5, "--temperature", 0], capsys,
                         stdin="hello\nagain\n/clear\nhello\n/exit\nnever read\n", monkeypatch=monkeypatch)
    assert code == 0 and "/clear" in err
    turns = out.split(">>> ")
    assert len(turns) == 6  # 4 messages + /exit, after the first prompt marker
    assert "(conversation cleared)" in turns[3]
    assert turns[1] == turns[4]  # after /clear, the same question gets the same greedy answer


def test_cli_entry_point_interactive_through_stdin(model_dir):
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "generate", "--model", str(model_dir), "--interactive",
                           "--max-new-tokens", "4"], input="hi\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>> ") == 2


def test_clear_errors(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    Transformer(preset("tiny", max_position_embeddings=64)).save_pretrained(bare)
    code, _, err = run(["--model", bare, "--prompt", "hi"], capsys)
    assert code == 2 and "no tokenizer.json" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    code, _, err = run(["--model", model_dir, "--input-file", empty], capsys)
    assert code == 2 and "has no prompts" in err
    code, _, err = run(["--model", model_dir, "--input-file", tmp_path / "missing.txt"], capsys)
    assert code == 2 and "cannot read" in err
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run(["--model", model_dir, "--input-file", binary], capsys)
    assert code == 2 and "cannot read" in err
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "hello world " * 200 + "\n")
    code, _, err = run(["--model", model_dir, "--input-file", long], capsys)
    assert code == 2 and "line 2" in err and "context is 128 tokens" in err
    code, _, err = run(["--model", model_dir, "--prompt", "hello world " * 200], capsys)
    assert code == 2 and "context" in err
    code, _, err = run(["--model", tmp_path / "nowhere", "--tokenizer", model_dir, "--prompt", "hi"], capsys)
    assert code == 2 and "nowhere" in err
