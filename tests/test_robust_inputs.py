"""Issue 15 part B: bad input and a hostile environment through the CLI, as a user types it.

Each test names the bug it catches. Subprocesses run `python -m nanoseek ...` with this checkout
on PYTHONPATH; everything uses tiny random models and tokenizers built here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.data import train_bpe
from nanoseek.device import DeviceError, resolve_device
from nanoseek.inference import Engine, RequestFailed, SamplingParams
from nanoseek.model import Transformer, preset

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def cli(*argv, stdin=None, timeout=120, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanoseek", *map(str, argv)], capture_output=True,
                          text=True, input=stdin, timeout=timeout, env=env, **kw)


def one_line_error(r, *needles):
    """Exit 2, no traceback, the last stderr line names what is wrong."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("robust") / "model"
    tok = train_bpe([f"hello world {i}, the quick brown fox jumps" for i in range(60)], vocab_size=300)
    torch.manual_seed(0)
    Transformer(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=128)).save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    """A training run's layout: RUN/checkpoints/step-000003 + the `latest` pointer."""
    import shutil
    run = tmp_path_factory.mktemp("robust") / "run"
    shutil.copytree(model_dir, run / "checkpoints" / "step-000003")
    shutil.copytree(model_dir, run / "checkpoints" / "step-000001")
    (run / "checkpoints" / "latest").write_text("step-000003\n")
    return run


# --- model paths and devices -----------------------------------------------------------------
def test_resolve_model_dir_accepts_the_paths_people_pass(model_dir, run_dir, tmp_path):
    # Catches: --model RUN / RUN/checkpoints / the `latest` pointer rejected, or resolved to an older step.
    step = run_dir / "checkpoints" / "step-000003"
    assert resolve_model_dir(model_dir) == model_dir
    for p in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "latest"):
        assert resolve_model_dir(p) == step
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for bad, says in ((tmp_path / "nope", "no such file"), (model_dir.parent, "no config.json"),
                      (tmp_path / "empty", "no 'latest' checkpoint"),
                      (tmp_path / "empty" / "checkpoints", "no 'latest' checkpoint")):
        with pytest.raises(CheckpointError, match=says) as e:
            resolve_model_dir(bad)
        assert str(bad) in str(e.value) and "pass a model directory" in str(e.value)
    (tmp_path / "latest").write_text("step-000009\n")  # a pointer to a checkpoint that is gone
    with pytest.raises(CheckpointError, match="step-000009"):
        resolve_model_dir(tmp_path / "latest")


def test_resolve_device():
    # Catches: `--device cuda` on a machine without CUDA silently running on the CPU, or a raw torch error.
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(DeviceError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="cuda:3"):
            resolve_device("cuda:3")


def test_generate_takes_a_run_directory(run_dir):
    # Catches: generate failing on `--model RUN` (no config.json there) instead of using the latest checkpoint.
    r = cli("generate", "--model", run_dir, "--prompt", "hello", "--max-new-tokens", 3, "--no-chat",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]


# --- the engine: request validation and failures inside step() --------------------------------
def tiny_engine(**kw):
    torch.manual_seed(0)
    model = Transformer(preset("tiny", max_position_embeddings=64)).eval()
    return Engine(model, max_batch_size=2, max_seq_len=32, **kw)


@pytest.mark.parametrize("field,value,says", [
    ("max_new_tokens", 2.0, "max_new_tokens"), ("max_new_tokens", True, "max_new_tokens"),
    ("temperature", float("nan"), "temperature"), ("temperature", "0.5", "temperature"),
    ("temperature", -1, "temperature"), ("top_p", float("inf"), "top_p"), ("top_k", 1.5, "top_k"),
    ("top_k", -1, "top_k"), ("min_p", 1.0, "min_p"), ("seed", 2**64, "seed"), ("seed", -1, "seed"),
    ("seed", 1.0, "seed"), ("stop", [""], "stop"), ("stop", [3], "stop"),
    ("stop_token_ids", [1.0], "stop_token_ids"), ("stop_token_ids", [10**9], "stop_token_ids"),
    ("stop_token_ids", "12", "stop_token_ids"), ("ignore_eos", "yes", "ignore_eos"),
    ("logprobs", 10**6, "vocabulary size"), ("logprobs", -1, "logprobs"), ("logprobs", 2.0, "logprobs"),
])
def test_add_request_validates_every_sampling_field(field, value, says):
    # Catches: a bad field accepted at add_request and blowing up (or silently misbehaving) in step().
    engine = tiny_engine()
    with pytest.raises(ValueError, match=says):
        engine.add_request([1, 2, 3], SamplingParams(**{"max_new_tokens": 4, field: value}))
    assert engine.free_slots == 2 and not engine.step()


@pytest.mark.parametrize("prompt,says", [
    ([1, 2.0, 3], "integers"), ([1, 2.7], "integers"), ([True, 2], "integers"), ("abc", "list"),
    (torch.tensor([1.0, 2.0]), "integer tensor"), ([-1], "vocabulary"), ([], "empty"),
])
def test_add_request_token_ids_are_integers_in_the_vocabulary(prompt, says):
    # Catches: float ids truncated to ints (`int(2.7)` == 2) instead of refused.
    with pytest.raises(ValueError, match=says):
        tiny_engine().add_request(prompt, SamplingParams(max_new_tokens=2))


def test_engine_stays_usable_after_a_failed_request(monkeypatch):
    # Catches: an exception inside step() leaving a stuck slot so that every later step() fails.
    engine = tiny_engine()
    expect = engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=6, ignore_eos=True)
    engine.add_request(torch.tensor([1, 2, 3]), SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert len(engine.step()) == 1  # prefilled, first token out
    real = engine.model.run

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "run", broken)  # the decode forward fails
    events = engine.step()
    assert [(e.finish_reason, e.finished, e.token_id) for e in events] == [("error", True, -1)]
    assert "RuntimeError: boom" in events[0].error
    assert engine.free_slots == 2 and engine.num_active == 0
    monkeypatch.setattr(engine.model, "run", real)
    assert engine.generate([[1, 2, 3], [4, 5]], max_new_tokens=6, ignore_eos=True) == expect

    # A prefill that fails fails its own group only; the running request goes on undisturbed.
    a = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=6, ignore_eos=True))
    got = [e.token_id for e in engine.step()]
    real_prefill = engine._prefill_group
    monkeypatch.setattr(engine, "_prefill_group", lambda *x: (_ for _ in ()).throw(ValueError("bad prompt")))
    b = engine.add_request([4, 5], SamplingParams(max_new_tokens=6))
    events = engine.step()
    assert {e.request_id: e.finish_reason for e in events} == {a: None, b: "error"}
    monkeypatch.setattr(engine, "_prefill_group", real_prefill)
    got += [e.token_id for e in events if e.request_id == a]
    while engine.num_active:
        got += [e.token_id for e in engine.step()]
    assert got == expect[0] and engine.free_slots == 2
    # generate() reports a failed request as an exception and leaves the engine idle.
    monkeypatch.setattr(engine.model, "run", broken)
    with pytest.raises(RequestFailed, match="boom"):
        engine.generate([[1, 2]], max_new_tokens=3)
    assert engine.free_slots == 2
