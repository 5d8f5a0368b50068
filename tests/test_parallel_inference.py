"""Sharded inference (nanoseek/parallel/inference.py): 2 gloo ranks give the one-process model's logits.

One launch of 2 ranks (tests/dist_infer_worker.py, spawned with the environment torchrun sets, reaped
on timeout) loads five checkpoints per rank straight from their HF-layout files and runs the
engine's calls on each (naive prefill of a mixed-length batch into the latent cache, absorbed
decode steps, the MTP heads, cached MTP steps, and the Engine itself, greedy with MTP speculation);
then loads broken checkpoints, which must fail on both ranks with one message, and exits through the
CLI error path on the last one. The one-process reference is `nanoseek.checkpoint.load` + the same
calls, in the test process.
"""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dist_infer_worker import drive
from nanoseek.checkpoint import load, quantize_fp8
from nanoseek.model import Transformer, preset
from nanoseek.parallel.inference import resident_bytes, span
from test_parallel import launch

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, initializer_range=0.1,
             torch_dtype="float32")
# V3 (2 MTP modules, 8 experts in 2 groups), V2-Lite style (no q-LoRA, softmax + group-limited greedy
# routing, attention biases: only rank 0 may add o_proj's), V3.2 with a top-k below the prompt length.
MODELS = {
    "v3": dict(num_nextn_predict_layers=2),
    "v2": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="group_limited_greedy", scoring_func="softmax",
               n_group=4, topk_group=2, attention_bias=True, num_nextn_predict_layers=0, routed_scaling_factor=1.0,
               intermediate_size=45),  # an FFN split 23 + 22
    "v32": dict(model_type="deepseek_v32", index_n_heads=2, index_head_dim=16, index_topk=4,
                num_nextn_predict_layers=1),
}
CUT_BLOCK = [24, 24]  # not a divisor of the per-rank slices: the slices start and end inside blocks
KEPT_BLOCK = [8, 8]  # divides every per-rank slice: dtype="fp8" keeps the blocks whole


def write_fp8(src, dst, block):
    """src's tensors with every 2-D projection FP8 in `block` blocks, each scale in the shard after
    its weight's (as size-cut real checkpoints have them)."""
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    shards = [{}, {}, {}]
    for i, (name, t) in enumerate(sorted(tensors.items())):
        if t.dim() == 2 and ("self_attn" in name or "_proj" in name) and "eh_proj" not in name:
            t, scale = quantize_fp8(t, tuple(block))
            shards[(i + 1) % 3][name + "_scale_inv"] = scale
        shards[i % 3][name] = t
    dst.mkdir()
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        save_file(shard, str(dst / f"model-{i:05d}-of-00003.safetensors"))
        weight_map.update({n: f"model-{i:05d}-of-00003.safetensors" for n in shard})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": block}
    (dst / "config.json").write_text(json.dumps(config))


def broken(src, dst, config=None, drop=None, truncate=False):
    shutil.copytree(src, dst)
    if config:
        (dst / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()), **config}))
    if drop:
        with safe_open(str(dst / "model.safetensors"), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
        save_file(tensors, str(dst / "model.safetensors"))
    if truncate:
        shard = dst / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    dirs = {}
    for i, (name, kw) in enumerate(MODELS.items()):
        torch.manual_seed(i)
        model = Transformer(preset("tiny", **{**SMALL, **kw}))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith(".bias"):  # biases start at zero: give them values a double add would show
                    p.normal_(0.0, 0.5)
        model.save_pretrained(root / name, max_shard_size=1 << 30)
        dirs[name] = root / name
    write_fp8(dirs["v3"], root / "fp8", CUT_BLOCK)
    write_fp8(dirs["v3"], root / "fp8res", KEPT_BLOCK)
    dirs["fp8"], dirs["fp8res"] = root / "fp8", root / "fp8res"
    bad = {
        # expert 7 lives on rank 1 only: rank 0 never reads it, yet must stop with rank 1's message
        "missing_expert": broken(dirs["v2"], root / "missing", drop="model.layers.2.mlp.experts.7.down_proj.weight"),
        "experts": broken(dirs["v2"], root / "experts", config={"n_routed_experts": 3, "n_group": 1, "topk_group": 1}),
        "heads": broken(dirs["v2"], root / "heads", config={"num_attention_heads": 3}),
        "fp8_blocks": dirs["fp8"],  # loaded with dtype="fp8": the slices would cut blocks
    }
    truncated = broken(dirs["v2"], root / "truncated", truncate=True)
    out = root / "out"
    out.mkdir()
    cases = [{"name": n, "dir": str(d), "dtype": "fp8" if n == "fp8res" else None} for n, d in dirs.items()]
    cases.append({"name": "v3_shard_model", "dir": str(dirs["v3"]), "shard_model": True})
    cfg = {"out": str(out), "cases": cases,
           "bad": [{"name": n, "dir": str(d), "dtype": "fp8" if n == "fp8_blocks" else None} for n, d in bad.items()],
           "exit_on": str(truncated)}
    procs = launch(2, [str(__import__("dist_infer_worker").__file__), json.dumps(cfg)], timeout=300)
    return dirs, out, procs


def results(out, name, rank):
    return load_file(str(out / f"{name}.rank{rank}.safetensors")), json.loads((out / f"{name}.rank{rank}.json").read_text())


@pytest.mark.parametrize("name", ["v3", "v2", "v32", "fp8", "fp8res"])
def test_two_ranks_give_the_one_process_logits(run, name):
    # Bugs caught: a head, expert or vocab slice read from the wrong rows or columns; a missing or
    # doubled all-reduce (partial or doubled sums); o_proj's bias added on both ranks; FP8 slices
    # dequantised with the wrong blocks' scales; FP8-resident experts or slices cut from the wrong
    # blocks; the cache or MTP path bypassing the sharded modules.
    dirs, out, procs = run
    assert procs[0].returncode == 2 and procs[1].returncode == 2, "\n".join(p.stderr[-3000:] for p in procs)
    reference = drive(load(dirs[name], dtype="fp8" if name == "fp8res" else None))
    got = [results(out, name, r)[0] for r in range(2)]
    assert got[0].keys() == reference.keys()
    assert {"prefill", "decode2"} <= reference.keys() and (name == "v2" or "mtp_step" in reference)
    for key, want in reference.items():
        assert torch.equal(got[0][key], got[1][key]), f"{key}: ranks disagree"
        torch.testing.assert_close(got[0][key], want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=key)


@pytest.mark.parametrize("name", ["v3", "v2"])
def test_each_rank_holds_half_the_experts_and_its_share(run, name):
    # Bug caught: a rank that allocates or reads the whole model (all experts, full heads or vocab).
    dirs, out, _ = run
    full = load(dirs[name])
    a = full.args
    itemsize, R = 4, 2
    state = full.state_dict()
    experts = sum(t.numel() for k, t in state.items() if ".mlp.experts." in k)
    heads = sum(t.numel() for k, t in state.items()
                if k.endswith(("q_proj.weight", "q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")))
    ffn = [k for k, t in state.items() if k.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
           and ".experts." not in k]
    vocab = ("embed_tokens.weight", "lm_head.weight")
    replicated = sum(t.numel() for k, t in state.items()) - experts - heads \
        - sum(state[k].numel() for k in ffn) - sum(state[k].numel() for k in vocab)
    replicated += full.inv_freq.numel()
    for rank in range(R):
        start, stop = span(a.vocab_size, rank, R)
        ffn_rank = 0
        for k in ffn:  # gate/up [inter, hidden] split by rows, down [hidden, inter] by columns
            inter = state[k].shape[1 if k.endswith("down_proj.weight") else 0]
            lo, hi = span(inter, rank, R)
            ffn_rank += (hi - lo) * state[k].numel() // inter
        want = replicated + experts // R + heads // R + 2 * (stop - start) * a.hidden_size + ffn_rank
        assert results(out, name, rank)[1]["resident_bytes"] == want * itemsize
    assert resident_bytes(full) == (sum(t.numel() for t in state.values()) + full.inv_freq.numel()) * itemsize
    assert results(out, name, 0)[1]["resident_bytes"] < resident_bytes(full) - experts * itemsize // 2


def test_shard_model_cuts_a_loaded_model_like_load_sharded(run):
    # Bug caught: the two paths (slices read from files, slices cut from tensors) disagreeing on a slice.
    _, out, _ = run
    for rank in range(2):
        cut, read = results(out, "v3_shard_model", rank), results(out, "v3", rank)
        assert cut[1] == read[1]
        for key, t in read[0].items():
            assert torch.equal(cut[0][key], t), key


def test_fp8_resident_ranks_keep_fp8(run):
    # Bug caught: dtype="fp8" under sharding dequantising on load (4 bytes a weight instead of 1).
    _, out, _ = run
    for rank in range(2):
        fp8, fp32 = results(out, "fp8res", rank)[1]["resident_bytes"], results(out, "fp8", rank)[1]["resident_bytes"]
        assert fp8 < 0.6 * fp32


def test_a_bad_checkpoint_stops_every_rank_with_one_line(run):
    # Bugs caught: the rank without the missing tensor carrying on (then hanging in the first
    # collective); a per-rank message that differs; a traceback instead of one line; exit code != 2.
    _, out, procs = run
    messages = [json.loads((out / f"bad.rank{r}.json").read_text()) for r in range(2)]
    assert messages[0] == messages[1]
    got = messages[0]
    assert got["missing_expert"].startswith("rank 1: ") and "experts.7.down_proj" in got["missing_expert"]
    assert "n_routed_experts=3 is not divisible by the 2 ranks" in got["experts"]
    assert "num_attention_heads=3 is not divisible by the 2 ranks" in got["heads"]
    assert "keeps 24x24 FP8 blocks whole" in got["fp8_blocks"]
    for p in procs:
        assert p.returncode == 2
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert "rank 0: " in lines[0] and "truncated/model.safetensors: cannot read safetensors file" in lines[0]
