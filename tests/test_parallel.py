"""Scale-out training: every layout gives the one-process run's losses, gradients and weights.

Each multi-process test spawns its own gloo ranks (tests/dist_worker.py, with the environment torchrun
would set), waits with a timeout and kills what is left. One launch of 2 ranks runs FSDP2, EP=2,
1F1B and DualPipeV in turn (a new DeviceMesh each); one launch of 4 runs EP=2 x FSDP=2. The
one-process reference runs in the test process itself.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_worker import MODEL, run as reference_run
from nanoseek.model import preset
from nanoseek.parallel import Dist, LayoutError, check_layout
from nanoseek.parallel.expert import rank_limit

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
COMMON = {"steps": 2, "batch": 8, "micro": 2, "seq": 12}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, cfg: dict | list, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run `n` ranks of the worker (cfg: its JSON) or of `python ARGV...` (cfg: a list), with the
    environment torchrun sets; always reaps them (kills the stragglers on timeout or failure)."""
    return reap(spawn(n, cfg), timeout)


def spawn(n: int, cfg: dict | list) -> list[subprocess.Popen]:
    """Start the `n` ranks of `launch` (stdout and stderr piped, as text)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1"}
    argv = [str(WORKER), json.dumps(cfg)] if isinstance(cfg, dict) else cfg
    return [subprocess.Popen([sys.executable, *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]


def reap(procs: list[subprocess.Popen], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Wait for every rank, `timeout` seconds in all (a hang fails the test); always kills the stragglers."""
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def load(out: Path, name: str, rank: int) -> dict:
    meta = json.loads((out / f"{name}.rank{rank}.json").read_text())
    t = load_file(str(out / f"{name}.rank{rank}.safetensors"))
    meta["params"] = {k[7:]: v for k, v in t.items() if k.startswith("params/")}
    meta["grads"] = {k[6:]: v for k, v in t.items() if k.startswith("grads/")}
    return meta


@pytest.fixture(scope="module")
def reference():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_run({**COMMON, "layout": {}}, Dist())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference3():
    """One process, one step further: what a resumed run's third step must give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_run({**COMMON, "steps": 3, "layout": {}}, Dist())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    runs = [{"name": "fsdp2", "layout": {"dp_shard": 2}},
            {"name": "ep2", "layout": {"ep": 2, "dp_shard": 1}, "save": str(out / "ckpt")},
            {"name": "1f1b", "layout": {"pp": 2, "dp_shard": 1}, "schedule": "1f1b"},
            {"name": "dualpipev", "layout": {"pp": 2, "dp_shard": 1}, "schedule": "dualpipev"}]
    procs = launch(2, {**COMMON, "out": str(out), "runs": runs})
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, two_ranks):
    out = tmp_path_factory.mktemp("four")
    runs = [{"name": "ep2_fsdp2", "layout": {"ep": 2, "dp_shard": 2}},
            {"name": "resumed", "layout": {"ep": 2, "dp_shard": 2}, "resume": str(two_ranks / "ckpt"), "steps": 3}]
    procs = launch(4, {**COMMON, "out": str(out), "runs": runs})
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    return out


def assert_same_run(ref: dict, got: dict):
    """Losses (CE, MTP, grad norm) per step, last-step gradients and final weights, to fp32 tolerance;
    the balancing biases exactly (integer loads, the same sign decisions). A resumed run has only
    the last steps' losses."""
    n = len(got["losses"])
    assert sum(got["losses"], []) == pytest.approx(sum(ref["losses"][-n:], []), rel=1e-5, abs=1e-6)
    assert got["params"].keys() == ref["params"].keys() and got["grads"].keys() == ref["grads"].keys()
    for k, v in ref["grads"].items():
        torch.testing.assert_close(got["grads"][k], v, rtol=1e-4, atol=1e-4 * v.abs().max().item() + 1e-8, msg=k)
    for k, v in ref["params"].items():
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(got["params"][k], v), k
        else:
            torch.testing.assert_close(got["params"][k], v, rtol=0, atol=2e-4, msg=k)


@pytest.mark.parametrize("name", ["fsdp2", "ep2", "1f1b", "dualpipev"])
def test_two_rank_layouts_match_one_process(reference, two_ranks, name):
    biases = [v for k, v in reference["params"].items() if k.endswith("e_score_correction_bias")]
    assert biases and all(b.abs().sum() > 0 for b in biases)  # the bias update ran
    for rank in range(2):
        assert_same_run(reference, load(two_ranks, name, rank))


def test_ep2_x_fsdp2_matches_one_process(reference, four_ranks):
    for rank in range(4):
        assert_same_run(reference, load(four_ranks, "ep2_fsdp2", rank))


def test_device_limited_routing_reaches_at_most_m_ranks(two_ranks, four_ranks):
    # 2 groups of 4 experts, topk_group 1: with the groups laid on the 2 EP ranks a token's two experts
    # share one rank. An expert-to-rank mapping that split groups (e.g. round-robin) would reach 2.
    m = rank_limit(preset("tiny", **MODEL), ep=2)
    assert m == 1
    assert load(two_ranks, "ep2", 0)["max_ranks"] == m and load(four_ranks, "ep2_fsdp2", 3)["max_ranks"] == m


def test_rank_limit_follows_the_group_routing():
    v3 = preset("deepseek-v3")  # 256 experts in 8 groups, 4 groups per token, 8 experts per token
    assert rank_limit(v3, 8) == 4 and rank_limit(v3, 64) == 8 and rank_limit(v3, 2) == 2 and rank_limit(v3, 32) == 8
    assert rank_limit(preset("deepseek-v2-lite"), 8) == 6  # greedy: one rank per routed expert at most


def test_bad_layout_is_a_clear_error_on_every_rank(tmp_path):
    procs = launch(2, {**COMMON, "out": str(tmp_path), "runs": [{"name": "bad", "layout": {"ep": 2, "dp_shard": 2}}]},
                   timeout=120)
    for rank, p in enumerate(procs):
        assert p.returncode == 2, p.stderr[-2000:]
        assert f"[rank {rank}] dist_worker: error: --dp-shard 2 x --ep 2 x --pp 1 = 4 ranks, but the world size is 2" \
            in p.stderr
        assert "Traceback" not in p.stderr


def test_check_layout_names_what_is_wrong():
    args = preset("tiny", **MODEL)
    assert check_layout(4, None, 2, 1, args).dp_shard == 2
    with pytest.raises(LayoutError, match="--ep 3 does not divide n_routed_experts 8"):
        check_layout(3, 1, 3, 1, args)
    with pytest.raises(LayoutError, match="world size 4 is not divisible by --ep 1 x --pp 3"):
        check_layout(4, None, 1, 3, args)
    with pytest.raises(LayoutError, match="--batch-size 6 must be a multiple of --micro-batch 2 x 2"):
        check_layout(2, 2, 1, 1, args, micro_batch=2, batch_size=6)
    with pytest.raises(LayoutError, match="--pp 8 stages need at least as many layers"):
        check_layout(8, 1, 1, 8, args)


def test_checkpoint_by_2_ranks_resumes_on_4_ranks(reference3, four_ranks):
    # written by EP=2 (expert slices) after 2 steps, read by EP=2 x FSDP=2, one more step
    for rank in range(4):
        got = load(four_ranks, "resumed", rank)
        assert len(got["losses"]) == 1
        assert_same_run(reference3, got)


def test_checkpoint_by_2_ranks_resumes_in_one_process(reference3, two_ranks):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = reference_run({**COMMON, "steps": 3, "layout": {}, "resume": str(two_ranks / "ckpt")}, Dist())
    finally:
        torch.set_num_threads(threads)
    assert_same_run(reference3, got)


def test_sharded_checkpoint_exports_to_hf_layout_that_transformers_loads(two_ranks, tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanoseek.model import Transformer
    from nanoseek.parallel.checkpoint import export_hf

    model = export_hf(two_ranks / "ckpt", tmp_path / "hf")
    trained = load(two_ranks, "ep2", 0)["params"]
    for k, v in model.state_dict().items():  # the weights the 2 ranks trained, exactly
        assert torch.equal(v, trained[k]), k
    ids = torch.randint(0, MODEL["vocab_size"], (2, 12))
    with torch.no_grad():
        ours = Transformer.from_pretrained(tmp_path / "hf")(ids)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_sharded_checkpoint_metadata_is_not_an_arbitrary_pickle(two_ranks, tmp_path):
    import pickle
    import shutil

    from nanoseek.parallel.checkpoint import load_sharded

    bad = tmp_path / "bad"
    shutil.copytree(two_ranks / "ckpt", bad)
    (bad / "dcp" / ".metadata").write_bytes(pickle.dumps(print))  # would run builtins.print on an open load
    with pytest.raises(ValueError, match="builtins.print, which is not allowed"):
        load_sharded(bad, torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """Data, the flags of a tiny 4-step `nanoseek train` run, and that run in one process (tmp/one)."""
    from nanoseek.stages import prepare
    from nanoseek.stages import train as train_stage

    tmp = tmp_path_factory.mktemp("train")
    data = tmp / "data"
    assert prepare.main(["--out", str(data), "--max-bytes", "120000", "--vocab-size", "300", "--seq-len", "16",
                         "--val-fraction", "0.1"]) == 0
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                 topk_group=1, num_nextn_predict_layers=1, initializer_range=0.05)
    flags = ["--data", str(data), *[f"--set={k}={json.dumps(v)}" for k, v in small.items()], "--batch-size", "4",
             "--batch-start", "4", "--micro-batch", "1", "--eval-batches", "2", "--samples", "0", "--quiet",
             "--warmup-steps", "2", "--lr", "1e-2", "--steps", "4", "--eval-every", "2"]
    assert one_thread(train_stage.main, ["--out", str(tmp / "one"), *flags]) == 0
    return tmp, flags


def one_thread(fn, *args):
    """Run in this process with one thread, as each rank does (same reduction order in the kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def test_torchrun_train_is_the_one_process_run_and_resumes_in_one_process(train_run):
    """`nanoseek train` on 2 ranks with EP=2 (what torchrun launches), stopped at step 2, resumed in one
    process from its sharded checkpoint, and the reverse: the same 4 losses as one process all along.
    Rank 0 alone prints and logs."""
    from nanoseek.stages import train as train_stage
    from nanoseek.model import Transformer
    from nanoseek.parallel.checkpoint import is_sharded
    from nanoseek.train.metrics import read_jsonl
    from nanoseek.train.state import latest_checkpoint

    tmp_path, flags = train_run
    procs = launch(2, ["-m", "nanoseek", "train", "--out", str(tmp_path / "two"), *flags, "--ep", "2", "--stop-at", "2"])
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    assert "stopped (--stop-at) at step 2" in procs[0].stdout and procs[1].stdout == ""  # rank 0 prints
    assert (tmp_path / "two" / "checkpoints" / "step-000002" / "dcp" / ".metadata").is_file()
    assert one_thread(train_stage.main, ["--out", str(tmp_path / "two"), "--resume", "--quiet"]) == 0
    assert one_thread(train_stage.main, ["--out", str(tmp_path / "mixed"), *flags, "--stop-at", "2"]) == 0
    # and the other way: a one-process (HF layout) checkpoint resumed on 2 ranks, its AdamW moments sharded
    procs = launch(2, ["-m", "nanoseek", "train", "--out", str(tmp_path / "mixed"), "--resume", "--ep", "2"])
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    final = latest_checkpoint(tmp_path / "mixed" / "checkpoints")  # sharded, and exported in the HF layout
    assert is_sharded(final) and Transformer.from_pretrained(final).args.n_routed_experts == 4
    one = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"]
    for run in ("two", "mixed"):
        other = [r for r in read_jsonl(tmp_path / run / "metrics.jsonl") if r["kind"] == "train"]
        assert [r["step"] for r in other] == [1, 2, 3, 4]  # one line per step: rank 1 wrote none
        assert_same_logged_run(other, one)


def test_torchrun_train_pipeline_is_the_one_process_run_across_layouts(train_run):
    """`nanoseek train --pp 2` (1F1B, one layer per stage): the same losses, gradient norms, loads and
    validations (evaluated forward-only through the stages) as one process; stopped at step 2 and
    resumed in one process, and a one-process checkpoint resumed with --pp 2 to the end (final
    evaluation through the stages, HF export), both give the uninterrupted run."""
    from nanoseek.stages import train as train_stage
    from nanoseek.model import Transformer
    from nanoseek.train.metrics import read_jsonl
    from nanoseek.train.state import latest_checkpoint

    tmp_path, flags = train_run
    procs = launch(2, ["-m", "nanoseek", "train", "--out", str(tmp_path / "pp"), *flags, "--pp", "2", "--stop-at", "2"])
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    assert "stopped (--stop-at) at step 2" in procs[0].stdout and procs[1].stdout == ""
    assert one_thread(train_stage.main, ["--out", str(tmp_path / "pp"), "--resume", "--quiet"]) == 0
    assert one_thread(train_stage.main, ["--out", str(tmp_path / "to_pp"), *flags, "--stop-at", "2"]) == 0
    procs = launch(2, ["-m", "nanoseek", "train", "--out", str(tmp_path / "to_pp"), "--resume", "--pp", "2"])
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    assert Transformer.from_pretrained(latest_checkpoint(tmp_path / "to_pp" / "checkpoints")).args.num_hidden_layers == 2
    one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    for run in ("pp", "to_pp"):
        other = read_jsonl(tmp_path / run / "metrics.jsonl")
        assert [(r["kind"], r["step"]) for r in other] == [(r["kind"], r["step"]) for r in one]
        assert_same_logged_run([r for r in other if r["kind"] == "train"], [r for r in one if r["kind"] == "train"])
        for a, b in zip(other, one):
            if a["kind"] == "val":  # evaluation through the stages: loss and the main layers' loads
                assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
                assert a["val_maxvio"] == pytest.approx(b["val_maxvio"])


def assert_same_logged_run(two, one):
    for a, b in zip(two, one):
        assert a["tokens"] == b["tokens"] and sum(a["load"], []) == pytest.approx(sum(b["load"], []))  # same routing
        assert (a["loss"], a["mtp_loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["mtp_loss"], b["grad_norm"]),
                                                                           rel=1e-5)


def test_torchrun_sft_is_the_one_process_run_and_resumes_in_one_process(tmp_path):
    """`nanoseek sft` on 2 ranks with EP=2: each step's rows dealt round-robin (the last step has one
    row, so rank 1 runs a stand-in micro-batch), stopped at step 2 and resumed in one process: the
    one-process losses, token counts, loads and validations. Rank 0 alone prints and logs."""
    from nanoseek.data import train_bpe
    from nanoseek.rl.tasks import arithmetic, worked_solutions
    from nanoseek.stages import sft as sft_stage
    from nanoseek.train.metrics import read_jsonl

    rows = worked_solutions(arithmetic(40, seed=0, digits=2, ops="+"))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_bpe([json.dumps(r) for r in rows], vocab_size=400).save(tmp_path / "tok")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=8, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                 topk_group=2, num_nextn_predict_layers=1, initializer_range=0.05)
    flags = ["--init-preset", "tiny", "--tokenizer", str(tmp_path / "tok"), "--data", str(tmp_path / "chat.jsonl"),
             *[f"--set={k}={json.dumps(v)}" for k, v in small.items()], "--seq-len", "192", "--batch-size", "4",
             "--micro-batch", "1", "--lr", "1e-2", "--eval-every", "2", "--samples", "0", "--quiet",
             "--epochs", "0.93"]  # 13 packed rows: steps of 4, 4, 4 and 1 rows
    assert one_thread(sft_stage.main, ["--out", str(tmp_path / "one"), *flags]) == 0
    procs = launch(2, ["-m", "nanoseek", "sft", "--out", str(tmp_path / "two"), *flags, "--ep", "2", "--stop-at", "2"])
    assert all(p.returncode == 0 for p in procs), "\n".join(p.stderr[-3000:] for p in procs)
    assert "stopped (--stop-at) at step 2" in procs[0].stdout and procs[1].stdout == ""
    assert one_thread(sft_stage.main, ["--out", str(tmp_path / "two"), "--resume"]) == 0
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]
    assert [r["loss_tokens"] for r in one if r["kind"] == "train"][-1] < 192  # the one-row last step
    for a, b in zip(two, one):
        if a["kind"] == "val":
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        else:
            assert (a["loss_tokens"], a["data_tokens"]) == (b["loss_tokens"], b["data_tokens"])
            assert sum(a["load"], []) == pytest.approx(sum(b["load"], []))
            assert (a["loss"], a["mtp_loss"], a["grad_norm"]) == pytest.approx(
                (b["loss"], b["mtp_loss"], b["grad_norm"]), rel=1e-5)
