"""Nothing lost, nothing silent: `nanoseek train` under signals, concurrent use, resumes with other
flags, torn and damaged files, and bad model fields / flag values — driven as a user types them.

Each test names the bug it would catch."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nanoseek.stages import init as init_stage
from nanoseek.stages import prepare
from nanoseek.stages import train as train_stage
from nanoseek.train.metrics import read_jsonl
from nanoseek.train.state import latest_checkpoint

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
             num_nextn_predict_layers=1, initializer_range=0.05)
SETS = [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
FAST = ["--batch-size", "2", "--eval-batches", "1", "--samples", "0", "--quiet", "--warmup-steps", "2",
        "--eval-every", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare.main(["--out", str(out), "--max-bytes", "200000", "--vocab-size", "300", "--seq-len", "32",
                  "--val-fraction", "0.1"])
    return out


def train(data, out, *flags):
    return train_stage.main(["--data", str(data), "--out", str(out), *SETS, *FAST, *flags])


def spawn(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nanoseek", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def steps_logged(out):
    return [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def wait_for(cond, timeout=300.0):
    t0 = time.time()
    while not cond():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


# --- interrupts save ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_completed_step_and_resume_continues(data, tmp_path, sig, code):
    """Bug: Ctrl-C / SIGTERM prints a traceback and, with the default --save-every 0, loses the run."""
    out = tmp_path / "run"
    proc = spawn("train", "--data", str(data), "--out", str(out), *SETS, *FAST, "--steps", "100000")
    try:
        wait_for(lambda: len(steps_logged(out)) >= 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err and "--resume" in err
    ckpt = latest_checkpoint(out / "checkpoints")
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    assert state["step"] == max(steps_logged(out)) >= 3  # the checkpoint is the last step the log shows
    # a plain --resume continues from there
    assert train_stage.main(["--out", str(out), "--resume", "--stop-at", str(state["step"] + 2)]) == 0
    assert steps_logged(out)[-1] == state["step"] + 2


def test_second_signal_abandons_the_step_but_keeps_the_last_completed_one(data, tmp_path):
    """Bug: a second Ctrl-C kills the process mid-step with nothing saved, or saves a half-applied step."""
    out = tmp_path / "run"
    # big micro-batches make a step long enough to land both signals inside it
    proc = spawn("train", "--data", str(data), "--out", str(out), *SETS, *FAST, "--steps", "100000",
                 "--batch-size", "64", "--micro-batch", "8", "--batch-start", "64")
    try:
        wait_for(lambda: len(steps_logged(out)) >= 1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    ckpt = latest_checkpoint(out / "checkpoints")
    state = json.loads((ckpt / "trainer_state" / "state.json").read_text())
    assert state["step"] == max(steps_logged(out))
    # the data position is the one after the last completed step: 64 windows per step
    assert state["loader"]["offset"] == 64 * state["step"] or state["loader"]["epoch"] > 0


def test_a_signal_while_the_process_tears_down_exits_quietly(tmp_path):
    """Bug (seen in CI): a second Ctrl-C that lands after the stage returned, while the interpreter ran
    torch's atexit hooks, printed 'Exception ignored in atexit callback' and a traceback."""
    stage = tmp_path / "slow_exit_stage.py"
    # a stage that returns 130 (as after a first Ctrl-C) and leaves a slow atexit hook, as torch does
    stage.write_text("import atexit, sys, time\n"
                     "def teardown():\n"
                     "    time.sleep(30)\n"
                     "def main(argv):\n"
                     "    atexit.register(teardown)\n"
                     "    print('returned', flush=True)\n"
                     "    return 130\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from nanoseek import cli\n"
            "cli.STAGES['slow'] = ('slow_exit_stage', 'test'); sys.argv[1:] = ['slow']; cli.run()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "returned"
        time.sleep(0.5)  # inside the atexit hook
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err



# --- resume keeps what the run kept -------------------------------------------------------------------
def test_resume_keeps_retention_and_refuses_flags_that_change_the_numbers(data, tmp_path, capsys):
    """Bugs: --resume with default flags deleted checkpoints --keep-last had kept; a typed --lr on
    --resume was silently ignored."""
    out = tmp_path / "run"
    assert train(data, out, "--steps", "8", "--keep-last", "4", "--save-every", "1", "--stop-at", "4") == 0
    assert train_stage.main(["--out", str(out), "--resume", "--stop-at", "6"]) == 0
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-000003", "step-000004", "step-000005", "step-000006"]
    capsys.readouterr()
    assert train_stage.main(["--out", str(out), "--resume", "--lr", "0.5", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lr 0.5" in err and "--seed 3" in err
    # flags that cannot change the numbers are honoured
    assert train_stage.main(["--out", str(out), "--resume", "--keep-last", "1", "--stop-at", "7"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-000007"]


def test_max_minutes_run_resumes_with_plain_resume(data, tmp_path):
    """Bug: a run started with --max-minutes alone could not be resumed without a budget flag."""
    out = tmp_path / "run"
    assert train(data, out, "--max-minutes", "0.3", "--stop-at", "2") == 0
    total = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state" / "state.json").read_text())
    assert train_stage.main(["--out", str(out), "--resume", "--stop-at", "3"]) == 0
    state = json.loads((latest_checkpoint(out / "checkpoints") / "trainer_state" / "state.json").read_text())
    assert state["step"] == 3 and state["total_tokens"] == total["total_tokens"]


# --- one writer per run directory ---------------------------------------------------------------------
def test_second_trainer_on_the_same_run_dir_refuses(data, tmp_path):
    """Bug: two trainers on one --out interleave metrics and overwrite each other's checkpoints."""
    out = tmp_path / "run"
    first = spawn("train", "--data", str(data), "--out", str(out), *SETS, *FAST, "--steps", "100000")
    try:
        wait_for(lambda: len(steps_logged(out)) >= 1)
        second = subprocess.run([sys.executable, "-m", "nanoseek", "train", "--data", str(data), "--out", str(out),
                                 *SETS, *FAST, "--steps", "3"], capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr and "in use" in second.stderr
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=300)
    finally:
        first.kill()
    # the lock went with its holder: resuming works now
    assert train_stage.main(["--out", str(out), "--resume", "--stop-at", str(max(steps_logged(out)) + 1)]) == 0


def test_stale_lock_of_a_crashed_run_is_taken_over(data, tmp_path, capsys):
    """Bug: a lock file left by a killed process blocks the run directory forever."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 999999, "command": "nanoseek train ..."}))
    assert train(data, out, "--steps", "1") == 0
    assert "did not exit cleanly" in capsys.readouterr().err


# --- torn and damaged files ---------------------------------------------------------------------------
def test_torn_metrics_line_does_not_stop_resume(data, tmp_path):
    """Bug: a half-written last line in metrics.jsonl (killed process) made --resume fail."""
    out = tmp_path / "run"
    assert train(data, out, "--steps", "6", "--stop-at", "2") == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 3, "lo')
    assert train_stage.main(["--out", str(out), "--resume"]) == 0
    assert steps_logged(out) == list(range(1, 7))


def test_damaged_trainer_state_names_the_intact_checkpoint(data, tmp_path, capsys):
    """Bug: a damaged trainer state gave a JSONDecodeError traceback and no way forward."""
    out = tmp_path / "run"
    assert train(data, out, "--steps", "6", "--save-every", "1", "--keep-last", "3", "--stop-at", "3") == 0
    (out / "checkpoints" / "step-000003" / "trainer_state" / "state.json").write_text('{"step": 3, ')
    capsys.readouterr()
    assert train_stage.main(["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "step-000003 is damaged" in err and "step-000002" in err and err.count("\n") == 1


# --- one clear line for bad model fields and flag values ----------------------------------------------
BAD_SETS = [
    ('n_routed_experts="8"', "n_routed_experts must be an integer"),
    ("hidden_size=128.0", "hidden_size must be an integer"),
    ("hidden_size=null", "hidden_size must be an integer"),
    ("n_shared_experts=-1", "n_shared_experts must be in [0"),
    ("vocab_size=100000000000000000000", "vocab_size must be in [1"),
    ("rope_scaling=yarn", "rope_scaling must be an object or null"),
    ('rope_scaling={"type":"yarn","factor":"4","original_max_position_embeddings":16}', "rope_scaling.factor"),
    ("norm_topk_prob=1", "norm_topk_prob must be true or false"),
    ("rms_norm_eps=0", "rms_norm_eps must be > 0"),
    ("eos_token_id=99999", "eos_token_id=99999 is outside the vocabulary"),
    ("torch_dtype=fp8", "torch_dtype must be"),
]


@pytest.mark.parametrize("override, message", BAD_SETS)
def test_bad_set_is_one_line_exit_2(tmp_path, capsys, override, message):
    """Bug: a wrong type or range in --set crashed deep in the model with a traceback."""
    assert init_stage.main(["--preset", "tiny", "--out", str(tmp_path / "m"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().count("\n") == 0
    assert not (tmp_path / "m").exists()


def test_bad_set_through_the_real_cli_has_no_traceback(tmp_path):
    """Bug: the same, seen by a user in a shell (exit code and stderr of the real process)."""
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "init", "--preset", "tiny", "--out", str(tmp_path / "m"),
                           "--set", "n_shared_experts=-1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "nanoseek init: error: n_shared_experts must be in [0, 2147483647], got -1"


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "128", "hidden_size must be an integer"),
    ("rope_scaling", "yarn", "rope_scaling must be an object or null"),
    ("rope_theta", "x", "rope_theta must be a finite number"),
    ("num_nextn_predict_layers", -1, "num_nextn_predict_layers must be in [0"),
])
def test_bad_config_json_field_is_named(tmp_path, field, value, message):
    """Bug: a string in config.json where an int belongs crashed with a TypeError in the model."""
    from nanoseek.model import ConfigError, Transformer

    assert init_stage.main(["--preset", "tiny", "--out", str(tmp_path / "m"), *SETS]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        Transformer.from_pretrained(tmp_path / "m")
    assert message in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("flag, value", [
    ("--keep-last", "-1"), ("--warmup-steps", "-5"), ("--weight-decay", "-0.1"), ("--grad-clip", "-1"),
    ("--save-every", "-2"), ("--seq-len", "0"), ("--lr", "0"), ("--seed", str(10**30)), ("--batch-size", "0"),
    ("--beta2", "1.5"), ("--steps", "ten"), ("--max-minutes", "nan"),
])
def test_bad_train_numbers_name_the_flag(data, tmp_path, capsys, flag, value):
    """Bug: meaningless values (negative keep-last, zero lr, a seed that overflows) were accepted or
    silently replaced by a default."""
    with pytest.raises(SystemExit) as e:
        train(data, tmp_path / "run", "--steps", "2", flag, value)
    assert e.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_seq_len_beyond_the_model_positions_is_refused(data, tmp_path, capsys):
    """Bug: training past max_position_embeddings silently used positions the model never defined."""
    assert train(data, tmp_path / "run", "--steps", "2", "--set", "max_position_embeddings=16") == 2
    assert "exceeds the model's max_position_embeddings 16" in capsys.readouterr().err


@pytest.mark.parametrize("damaged", ["meta.json", "tokenizer/tokenizer_config.json"])
def test_invalid_json_in_dataset_files_names_the_file(data, tmp_path, capsys, damaged):
    """Bug: a damaged meta.json / tokenizer_config.json gave a bare JSONDecodeError message with no file."""
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / damaged).write_text('{"seq_len": 3')
    assert train(copy, tmp_path / "run", "--steps", "1") == 2
    err = capsys.readouterr().err
    assert f"{copy / damaged}: not valid JSON" in err and err.count("\n") == 1


def test_checkpoint_never_takes_weights_from_the_tokenizer_dir(tmp_path):
    """Bug: save_checkpoint(tokenizer_dir=<a model directory>) copied that directory's config and
    weights over the ones just saved, so the checkpoint silently held the old model."""
    import torch

    from nanoseek.model import Transformer, preset
    from nanoseek.train.state import save_checkpoint

    args = preset("tiny", **SMALL, vocab_size=64)
    old, new = Transformer(args), Transformer(args)
    old.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "tokenizer.json").write_text("{}")
    opt = torch.optim.AdamW(new.parameters())
    ckpt = save_checkpoint(tmp_path / "ckpts", 1, new, opt, {"step": 1}, tokenizer_dir=tmp_path / "old")
    loaded = Transformer.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), new.state_dict().values()))
    assert (ckpt / "tokenizer.json").exists()
