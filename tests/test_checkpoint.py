"""Checkpoint I/O: sharding, MTP tensors, FP8 block-quantised weights, atomic saves, named errors."""

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.checkpoint import CheckpointError, dequantize_fp8, quantize_fp8
from nanoseek.model import ModelArgs, Transformer, preset


def tiny(**kw) -> ModelArgs:
    return preset("tiny", **{"vocab_size": 80, "num_hidden_layers": 2, **kw})


def read_all(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny()).eval()
    model.save_pretrained(tmp_path / "m")
    return model, tmp_path / "m"


def test_roundtrip_sharded_with_index(tmp_path):
    model = Transformer(tiny()).eval()
    model.save_pretrained(tmp_path / "m", max_shard_size=200_000)
    files = sorted(os.listdir(tmp_path / "m"))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    loaded = Transformer.from_pretrained(tmp_path / "m")
    ids = torch.randint(0, 80, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
        assert torch.equal(model.run(ids, mtp=True).mtp_logits[0], loaded.run(ids, mtp=True).mtp_logits[0])


def test_mtp_tensors_use_checkpoint_layout(saved):
    model, path = saved
    names = read_all(path / "model.safetensors")
    N = model.args.num_hidden_layers
    for tail in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                 "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{N}.{tail}" in names


def test_checkpoint_without_mtp_tensors_loads_without_mtp(saved, tmp_path):
    _, path = saved
    tensors = {k: v for k, v in read_all(path / "model.safetensors").items() if not k.startswith("model.layers.2.")}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.warns(UserWarning, match="no MTP tensors"):
        model = Transformer.from_pretrained(path)
    assert len(model.mtp) == 0


def reference_dequant(q, s, block=128):
    """Independent dequantisation: an explicit loop over 128x128 blocks."""
    out = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def quantise_like_deepseek(tensors):
    """FP8 the 2-D projection weights (not embeddings, head, router or norms), adding their scale_inv."""
    out = {}
    for name, t in tensors.items():
        skip = t.dim() != 2 or "embed_tokens" in name or "lm_head" in name or "shared_head.head" in name \
            or name.endswith("mlp.gate.weight") or "norm" in name
        if skip:
            out[name] = t
        else:
            out[name], out[name + "_scale_inv"] = quantize_fp8(t)
    return out


def write_fp8(path, shards, config_from):
    """Write shards (a list of name -> tensor dicts) as an FP8 checkpoint, with an index if more than one."""
    os.makedirs(path)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname))
            weight_map.update({name: fname for name in shard})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads(config_from.read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))


def test_fp8_scales_in_another_shard_load_through_the_index(saved, tmp_path):
    # Real DeepSeek checkpoints are sharded by size, so a weight_scale_inv can land in the next shard.
    # Bug caught: the loader looking for a weight's scale only in the weight's own file.
    _, path = saved
    quantised = quantise_like_deepseek(read_all(path / "model.safetensors"))
    weights = sorted(n for n in quantised if not n.endswith("_scale_inv"))
    shards = [{}, {}, {}]
    for i, name in enumerate(weights):
        shards[i % 3][name] = quantised[name]
        if name + "_scale_inv" in quantised:  # every scale in the shard after its weight's
            shards[(i + 1) % 3][name + "_scale_inv"] = quantised[name + "_scale_inv"]
    assert sum(n.endswith("_scale_inv") for n in quantised) > 20
    write_fp8(tmp_path / "one", [quantised], path / "config.json")
    write_fp8(tmp_path / "split", shards, path / "config.json")
    expected = Transformer.from_pretrained(tmp_path / "one").state_dict()
    loaded = Transformer.from_pretrained(tmp_path / "split").state_dict()
    assert expected.keys() == loaded.keys()
    for name in expected:
        assert torch.equal(expected[name], loaded[name]), name
    # a scale that neither the weight's shard nor the index holds is still named
    index = json.loads((tmp_path / "split" / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.self_attn.o_proj.weight_scale_inv"]
    (tmp_path / "split" / "model.safetensors.index.json").write_text(json.dumps(index))
    for i, shard in enumerate(shards, start=1):
        if shard.pop("model.layers.1.self_attn.o_proj.weight_scale_inv", None) is not None:
            save_file(shard, str(tmp_path / "split" / f"model-{i:05d}-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight_scale_inv"):
        Transformer.from_pretrained(tmp_path / "split")


def test_fp8_block_quantised_checkpoint_loads(tmp_path):
    # dims not divisible by 128 (ragged edge blocks) and larger than one block
    args = tiny(hidden_size=160, intermediate_size=300, moe_intermediate_size=136, q_lora_rank=136,
                kv_lora_rank=72, vocab_size=130)
    model = Transformer(args).eval()
    model.save_pretrained(tmp_path / "bf")
    tensors = read_all(tmp_path / "bf" / "model.safetensors")
    quantised = quantise_like_deepseek(tensors)
    reference = {}
    for name, t in tensors.items():
        if name + "_scale_inv" not in quantised:
            continue
        q, s = quantised[name], quantised[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
        reference[name] = reference_dequant(q, s)
        assert torch.equal(dequantize_fp8(q, s), reference[name])
        # e4m3 keeps ~2 significant bits: quantisation error stays within a few percent of the block max
        assert (reference[name] - t).abs().max() <= 0.07 * t.abs().max()
    assert any(t.shape[0] % 128 and t.shape[0] > 128 for t in reference.values())
    write_fp8(tmp_path / "fp8", [quantised], tmp_path / "bf" / "config.json")
    loaded = Transformer.from_pretrained(tmp_path / "fp8")
    # expected: the bf checkpoint with every quantised weight replaced by its reference dequantisation
    for name, t in reference.items():
        tensors[name] = t
    save_file(tensors, str(tmp_path / "bf" / "model.safetensors"))
    expected = Transformer.from_pretrained(tmp_path / "bf")
    ids = torch.randint(0, args.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected(ids))
        rel = (loaded(ids) - model(ids)).norm() / model(ids).norm()
    assert rel < 0.1
    # saving writes dequantised weights and drops quantization_config
    loaded.save_pretrained(tmp_path / "again")
    assert "quantization_config" not in json.loads((tmp_path / "again" / "config.json").read_text())


def _rewrite(path, fn):
    tensors = read_all(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*model\.layers\.1\.self_attn\.o_proj\.weight"):
        Transformer.from_pretrained(path)


def test_unexpected_tensor_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.extra"):
        Transformer.from_pretrained(path)


def test_expert_past_config_is_unexpected(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match="experts.8.up_proj"):
        Transformer.from_pretrained(path)


def test_shape_mismatch_is_named(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.1.mlp.experts.3.down_proj.weight": torch.zeros(5, 5)}))
    with pytest.raises(CheckpointError, match=r"experts\.3\.down_proj\.weight' has shape \(5, 5\)"):
        Transformer.from_pretrained(path)


def test_truncated_file_is_named(saved):
    _, path = saved
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(path)


def test_corrupt_header_is_named(saved):
    _, path = saved
    f = path / "model.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(path)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Transformer.from_pretrained(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="not a directory"):
        Transformer.from_pretrained(tmp_path / "nothing-here")


def test_config_without_weights(saved):
    _, path = saved
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Transformer.from_pretrained(path)


def test_index_naming_a_missing_shard(saved):
    _, path = saved
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Transformer.from_pretrained(path)


def test_fp8_weight_without_scale(saved):
    _, path = saved
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight":
                                       t["model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match="o_proj.weight_scale_inv"):
        Transformer.from_pretrained(path)


def test_save_is_atomic_and_keeps_tokenizer_files(saved, monkeypatch):
    model, path = saved
    (path / "tokenizer.json").write_text("{}")
    before = (path / "model.safetensors").read_bytes()

    import nanoseek.checkpoint as ckpt

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    monkeypatch.undo()
    model.save_pretrained(path)
    assert (path / "tokenizer.json").read_text() == "{}"
    assert (path / "model.safetensors").read_bytes() != before
