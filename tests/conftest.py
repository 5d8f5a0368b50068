import os
import tempfile

import pytest
import torch

# Two cores: keep intra-op threads at the core count and make runs reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Eager is the reference path: engines (and the servers and CLIs tests start) compile only when a
# test asks (compile=True, or tests/test_engine_speed.py, which unsets this to test the default).
os.environ.setdefault("NANOSEEK_COMPILE", "0")
# Compiled artefacts of this run, shared by every test and the processes they start, kept out of
# the user's ~/.cache/nanoseek (compiling is what makes compile tests slow on 2 cores).
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanoseek-test-inductor-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them on a busy machine.
    Opt in per module: pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
