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
