"""FP8 checkpoints: `nanoseek convert` both ways (streaming, atomic, named errors), FP8-resident
inference, and transformers reading what we write."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.cli import main as cli
from nanoseek.inference import Engine
from nanoseek.model import Transformer, preset
from nanoseek.quant.convert import ConvertError, fp8_to_bf16, to_fp8
from nanoseek.quant.fp8 import QUANTIZATION_CONFIG, stored_in_fp8
from nanoseek.quant.inference import FP8InferenceExperts, FP8InferenceLinear, model_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
# ragged: 160 hidden, 136 q-LoRA, 72+16 = 88 kv_a rows, 300 dense FFN, 136 expert FFN
RAGGED = dict(vocab_size=96, num_hidden_layers=2, hidden_size=160, intermediate_size=300, moe_intermediate_size=136,
              q_lora_rank=136, kv_lora_rank=72)
# every dimension a multiple of 128 or within one block: what transformers' FP8 loader can read
ALIGNED = dict(vocab_size=96, num_hidden_layers=2, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
               q_lora_rank=128, kv_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
               num_attention_heads=2, num_nextn_predict_layers=0)


def read_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: (h.get_tensor(k), f.name) for k in h.keys()})
    return out


def reference_dequant(q, s, block=128):
    """Independent dequantisation: an explicit loop over 128x128 blocks."""
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A sharded bf16 checkpoint with ragged dims, a tokenizer-like file, a generation config; and its FP8."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **RAGGED)).to(torch.bfloat16)
    model.save_pretrained(root / "bf16", max_shard_size=300_000)
    (root / "bf16" / "tokenizer.json").write_text('{"fake": true}')
    (root / "bf16" / "generation_config.json").write_text('{"do_sample": false}')
    to_fp8(root / "bf16", root / "fp8")
    return root


def test_to_fp8_quantises_exactly_the_v3_fp8_tensors(ragged):
    src, out = read_dir(ragged / "bf16"), read_dir(ragged / "fp8")
    index = json.loads((ragged / "fp8" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and set(index["weight_map"]) == set(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t, _ in out.values())
    fp8_names = {n for n in src if stored_in_fp8(n)}
    assert {n for n, (t, _) in out.items() if t.dtype == torch.float8_e4m3fn} == fp8_names
    assert "model.layers.2.eh_proj.weight" in src and "model.layers.2.eh_proj.weight" not in fp8_names
    assert any(src[n][0].shape[1] > 128 and src[n][0].shape[1] % 128 for n in fp8_names)  # ragged blocks
    for name, (t, shard) in src.items():
        if name not in fp8_names:
            assert torch.equal(out[name][0], t)  # the rest copied as it is
            continue
        q, s = out[name][0], out[name + "_scale_inv"][0]
        assert out[name + "_scale_inv"][1] == out[name][1]  # the scale sits beside its weight
        assert s.dtype == torch.float32 and s.shape == (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
        w = t.float()
        bound = torch.maximum(w.abs() / 16, s.max() * 2.0**-10)  # E4M3: 3 mantissa bits
        assert ((reference_dequant(q, s) - w).abs() <= bound).all(), name
    config = json.loads((ragged / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == QUANTIZATION_CONFIG
    assert (ragged / "fp8" / "tokenizer.json").read_text() == '{"fake": true}'
    assert (ragged / "fp8" / "generation_config.json").exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fp8_to_bf16_equals_independent_block_dequantisation(ragged, tmp_path, dtype):
    assert cli(["convert", "fp8-to-bf16", str(ragged / "fp8"), str(tmp_path / "out"), "--dtype", dtype]) == 0
    fp8, out = read_dir(ragged / "fp8"), read_dir(tmp_path / "out")
    assert not any(n.endswith("_scale_inv") for n in out)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out) and all(index["weight_map"][n] == out[n][1] for n in out)
    for name, (t, _) in out.items():
        if fp8[name][0].dtype == torch.float8_e4m3fn:
            ref = reference_dequant(fp8[name][0], fp8[name + "_scale_inv"][0]).to(getattr(torch, dtype))
            assert torch.equal(t, ref), name
        else:
            assert torch.equal(t, fp8[name][0].to(t.dtype))
            assert t.dtype == (torch.float32 if dtype == "float32" else fp8[name][0].dtype)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == dtype
    if dtype == "float32":  # our loader: the fp32 output and the FP8 source are the same model
        ids = torch.randint(0, 96, (2, 10))
        with torch.no_grad():
            assert torch.equal(Transformer.from_pretrained(tmp_path / "out")(ids),
                               Transformer.from_pretrained(ragged / "fp8")(ids))


def test_fp8_resident_inference_equals_the_dequantised_model(ragged):
    dequantised = Transformer.from_pretrained(ragged / "fp8")
    resident = Transformer.from_pretrained(ragged / "fp8", dtype="fp8")
    assert isinstance(resident.layers[1].mlp.experts, FP8InferenceExperts)
    assert isinstance(resident.layers[0].self_attn.kv_a_proj_with_mqa, FP8InferenceLinear)
    assert resident.layers[0].self_attn.kv_a_proj_with_mqa.weight_fp8.dtype == torch.float8_e4m3fn
    assert type(resident.mtp[0].eh_proj) is torch.nn.Linear and type(resident.lm_head) is torch.nn.Linear
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        assert torch.allclose(resident(ids), dequantised(ids), rtol=1e-5, atol=1e-5)
    prompts = [[1, 5, 9, 2], [7, 3]]
    want = Engine(dequantised, max_batch_size=2, max_seq_len=64).generate(prompts, max_new_tokens=12)
    assert Engine(resident, max_batch_size=2, max_seq_len=64).generate(prompts, max_new_tokens=12) == want
    # the FP8 layers take 1 byte per weight (+ one fp32 per 128x128 block) where fp32 takes 4
    fp8_bytes = sum(model_bytes(m) for m in resident.modules() if isinstance(m, (FP8InferenceLinear, FP8InferenceExperts)))
    fp8_params = sum(m.weight_fp8.numel() for m in resident.modules() if isinstance(m, FP8InferenceLinear))
    fp8_params += sum(m.gate_proj.numel() * 2 + m.down_proj.numel() for m in resident.modules()
                      if isinstance(m, FP8InferenceExperts))
    assert fp8_params <= fp8_bytes < 1.1 * fp8_params
    assert model_bytes(resident) < 0.5 * model_bytes(dequantised)
    with pytest.raises(Exception, match="FP8-resident"):
        resident.save_pretrained(ragged / "nope")


def test_transformers_reads_the_bf16_output_and_an_aligned_fp8_output(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    Transformer(preset("tiny", **ALIGNED)).save_pretrained(tmp_path / "src")
    to_fp8(tmp_path / "src", tmp_path / "fp8")
    fp8_to_bf16(tmp_path / "fp8", tmp_path / "f32", dtype=torch.float32)
    ids = torch.randint(0, 96, (2, 16))
    ours = Transformer.from_pretrained(tmp_path / "fp8")  # dequantised exactly
    with torch.no_grad():
        want = ours(ids)
        for d in ("f32", "fp8"):
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval()
            assert torch.allclose(hf(ids).logits.float(), want, rtol=1e-4, atol=1e-4), d


def test_bad_inputs_give_named_errors_and_write_nothing(ragged, tmp_path, capsys):
    def run(*argv):
        code = cli(["convert", *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
        return err

    assert "no float8_e4m3fn tensors" in run("fp8-to-bf16", ragged / "bf16", tmp_path / "out")
    assert "already FP8" in run("to-fp8", ragged / "fp8", tmp_path / "out")
    (tmp_path / "exists").mkdir()
    assert "already exists" in run("to-fp8", ragged / "bf16", tmp_path / "exists")

    def broken(edit):
        d = tmp_path / "broken"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(ragged / "fp8", d)
        index = json.loads((d / "model.safetensors.index.json").read_text())
        name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
        shard = d / index["weight_map"][name]
        tensors = {k: t for k, (t, f) in read_dir(d).items() if f == shard.name}
        edit(tensors, index, name)
        save_file(tensors, str(shard))
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        return d

    def drop(tensors, index, name):
        del tensors[name], index["weight_map"][name]

    def reshape(tensors, index, name):
        tensors[name] = torch.ones(3, 3)

    assert "has no model.layers.1.self_attn.o_proj.weight_scale_inv" in run("fp8-to-bf16", broken(drop), tmp_path / "out")
    assert "o_proj.weight_scale_inv has shape (3, 3)" in run("fp8-to-bf16", broken(reshape), tmp_path / "out")
    # found only while writing (a non-finite weight): the partial output is removed
    src = tmp_path / "nan"
    shutil.copytree(ragged / "bf16", src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    last = sorted(index["weight_map"].values())[-1]
    tensors = {k: t for k, (t, f) in read_dir(src).items() if f == last}
    victim = next(n for n in sorted(tensors) if stored_in_fp8(n))
    tensors[victim][0, 0] = float("nan")
    save_file(tensors, str(src / last))
    assert "inf or NaN" in run("to-fp8", src, tmp_path / "out")


def test_conversion_memory_is_bounded_by_the_largest_tensor(tmp_path):
    # 2 shards of 12 tensors of 4 MB: a shard is 12x the largest tensor, the model 24x. Streaming
    # tensor by tensor peaks at 4-5x here (source, temporaries, result, and what the allocator keeps
    # after freeing them); the bound is 8x, below what holding one shard would cost.
    big = 1024 * 1024 * 4
    src = tmp_path / "src"
    src.mkdir()
    weight_map = {}
    for s in range(2):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        shard = {f"model.layers.{s}.mlp.experts.{e}.up_proj.weight": torch.randn(1024, 1024) for e in range(12)}
        save_file(shard, str(src / fname))
        weight_map.update(dict.fromkeys(shard, fname))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text("{}")
    code = """
import sys, torch
from nanoseek.quant.convert import fp8_to_bf16, to_fp8

def status(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

torch.set_num_threads(1)
torch.ones(1) @ torch.ones(1)  # torch's own first-use allocations belong to the baseline
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
to_fp8(sys.argv[1], sys.argv[2])
fp8_to_bf16(sys.argv[2], sys.argv[3], dtype=torch.float32)
print(status("VmHWM") - before)
"""
    out = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "fp8"), str(tmp_path / "f32")],
                         capture_output=True, text=True)
    if out.returncode and "clear_refs" in out.stderr:
        pytest.skip("cannot reset the peak RSS here (/proc/self/clear_refs)")
    assert out.returncode == 0, out.stderr
    peak = int(out.stdout.split()[-1])
    assert peak < 8 * big, f"peak {peak / 2**20:.0f} MiB over baseline for {big / 2**20:.0f} MiB tensors"
    with safe_open(str(tmp_path / "f32" / "model-00002-of-00002.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.1.up_proj.weight").shape == (1024, 1024)


def test_generate_dtype_fp8_gives_the_dequantised_models_greedy_text(tmp_path, capsys):
    from nanoseek.data import train_bpe
    from nanoseek.stages import generate

    tok = train_bpe([f"hello world {i}, the quick brown fox" for i in range(50)], vocab_size=300)
    torch.manual_seed(0)
    Transformer(preset("tiny", vocab_size=tok.vocab_size, num_hidden_layers=2)).save_pretrained(tmp_path / "bf")
    tok.save(tmp_path / "bf")
    assert cli(["convert", "to-fp8", str(tmp_path / "bf"), str(tmp_path / "fp8")]) == 0  # tokenizer copied
    capsys.readouterr()
    outs = []
    for dtype in ([], ["--dtype", "fp8"]):
        argv = ["--model", tmp_path / "fp8", "--prompt", "hello", "--max-new-tokens", 12, "--temperature", 0, "--no-chat"]
        assert generate.main([str(a) for a in argv + dtype]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()
