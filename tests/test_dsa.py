"""DeepSeek Sparse Attention (deepseek_v32): parity with transformers' DeepseekV32ForCausalLM in both
directions (fp32, contexts shorter and longer than index_topk), sparse == dense when index_topk covers
the context, deterministic top-k ties, config round trips, and cached sparse decoding == the
uncached sparse forward (absorbed gather path, naive masked path, FP8 keys)."""

import json

import pytest
import torch

from nanoseek.model import ModelArgs, Transformer
from nanoseek.model.indexer import dequantize_keys, quantize_keys, set_fp8_keys, set_sparse, topk_mask

BASE = dict(
    model_type="deepseek_v32", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
    num_attention_heads=3, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
    moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
    first_k_dense_replace=1, q_lora_rank=20, initializer_range=0.15, max_position_embeddings=256,
    index_n_heads=8, index_head_dim=16, index_topk=8,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {
    "topk_below_context_yarn_mtp": dict(rope_scaling=YARN, num_nextn_predict_layers=1),
    "topk_above_context": dict(index_topk=64, num_nextn_predict_layers=0),
}
SEQ = 40


def make_model(case, seed=0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**BASE, **CASES[case]})).eval()
    with torch.no_grad():  # norms and biases away from their init so a misplaced one shows
        for name, p in model.named_parameters():
            if "k_norm" in name or name.endswith("e_score_correction_bias"):
                p.normal_(0.3, 0.3)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_saves_transformers_loads(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model(case)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(1))
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        set_sparse(model, False)
        dense = model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    if model.args.index_topk < SEQ:  # the selection really matters past index_topk ...
        assert (ours - dense)[:, BASE["index_topk"]:].abs().max().item() > 1e-2
    else:  # ... and with index_topk >= context sparse is dense
        assert (ours - dense).abs().max().item() <= 1e-5
    assert (ours - dense)[:, : BASE["index_topk"]].abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore:.*holds no MTP tensors")
def test_transformers_saves_nanoseek_loads(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    args = ModelArgs(**{**BASE, **CASES[case]})
    torch.manual_seed(2)
    hf = transformers.DeepseekV32ForCausalLM(transformers.DeepseekV32Config.from_dict(args.to_config())).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "k_norm" in name:
                p.normal_(0.3, 0.3)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and "mlp_layer_types" in config  # transformers' own spelling
    ids = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.args.index_topk == args.index_topk and ours.args.dsa
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_checkpoint_names_are_the_released_ones(tmp_path):
    make_model("topk_above_context").save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    for tail in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
        assert f"model.layers.2.self_attn.indexer.{tail}" in names


def test_config_round_trip_and_family_checks():
    args = ModelArgs(**{**BASE, **CASES["topk_below_context_yarn_mtp"]})
    config = args.to_config()
    assert config["architectures"] == ["DeepseekV32ForCausalLM"] and config["index_topk"] == 8
    assert ModelArgs.from_config(json.loads(json.dumps(config))) == args
    v3 = ModelArgs(**{**BASE, "model_type": "deepseek_v3"}).to_config()
    assert not any(k.startswith("index_") for k in v3)  # V3 configs stay as they were
    from nanoseek.model.args import ConfigError

    with pytest.raises(ConfigError, match="index_"):
        ModelArgs.from_config({**v3, "index_topk": 8})
    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelArgs(**{**BASE, "q_lora_rank": None})
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        ModelArgs.from_config({**config, "mlp_layer_types": ["sparse"] * 3})


def test_topk_ties_go_to_the_most_recent_tokens():
    scores = torch.tensor([[[0.5, 0.0, 0.0, 0.9, 0.0, 0.0, -1.0]]])
    mask = torch.ones(1, 1, 7, dtype=torch.bool)
    # 0.9 and 0.5 are above the 4th score (0.0); two of the four zeros are kept: the last two
    assert topk_mask(scores, mask, 4).int().tolist() == [[[1, 0, 0, 1, 1, 1, 0]]]
    mask[..., 5:] = False  # masked tokens are never kept, even when fewer than k remain
    assert topk_mask(scores, mask, 4).int().tolist() == [[[1, 0, 1, 1, 1, 0, 0]]]
    assert topk_mask(scores, mask, 6).int().tolist() == [[[1, 1, 1, 1, 1, 0, 0]]]


def test_fp8_keys_round_trip():
    keys = torch.randn(2, 5, 16) * torch.logspace(-2, 1, 16)
    packed = quantize_keys(keys)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 5, 20)  # 16 fp8 bytes + one fp32 scale
    from nanoseek.model.indexer import hadamard

    back = dequantize_keys(packed, 16) @ hadamard(16, "cpu", torch.float32)  # undo the rotation
    assert ((back - keys).norm(dim=-1) / keys.norm(dim=-1)).max() < 0.08


@pytest.mark.parametrize("fp8", [False, True])
def test_cached_sparse_decode_equals_uncached_forward(fp8):
    model = make_model("topk_below_context_yarn_mtp")
    set_fp8_keys(model, fp8)
    args = model.args
    ids = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(4))
    width = args.kv_lora_rank + args.qk_rope_head_dim + (5 if fp8 else args.index_head_dim)  # fp8: 20 bytes
    with torch.no_grad():
        full = model(ids)
        for absorbed in (True, False):
            cache = [torch.zeros(2, 64, width) for _ in range(args.num_hidden_layers)]
            pos = torch.arange(SEQ).expand(2, SEQ)
            out = model.run(ids[:, :12], positions=pos[:, :12], cache=cache, kv_len=12, absorbed=False).logits
            steps = [out]
            for t in range(12, SEQ):  # kv_len 64 > k: absorbed decode gathers the k selected rows
                steps.append(model.run(ids[:, t:t + 1], positions=pos[:, t:t + 1], cache=cache, kv_len=64,
                                       absorbed=absorbed).logits)
            assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-4


# --- the engine on a deepseek_v32 checkpoint ----------------------------------------------------
def tiny_v32(**overrides) -> Transformer:
    from nanoseek.model import preset

    torch.manual_seed(0)
    model = Transformer(preset("tiny-v32", max_position_embeddings=256, index_topk=8, num_hidden_layers=2,
                               **overrides)).eval()
    H = model.args.hidden_size
    with torch.no_grad():  # a near-bigram model whose MTP module mostly passes the next embedding on:
        model.embed_tokens.weight.mul_(3.0)  # its drafts get accepted often (as in test_inference)
        for module in model.mtp:
            module.eh_proj.weight[:, :H] = torch.eye(H)
    return model


PROMPTS = [[5, 17, 99], list(range(40, 60)), [7], [3, 1000, 2000, 3000, 12]]


@torch.no_grad()
def greedy_reference(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.usefixtures("one_thread")
def test_engine_sparse_decode_batching_and_speculative():
    from nanoseek.inference import Engine

    model = tiny_v32()
    want = [greedy_reference(model, p, 14) for p in PROMPTS]
    for absorbed in (True, False):  # 2 slots for 4 prompts: requests join and leave mid-run
        engine = Engine(model, max_batch_size=2, max_seq_len=48, absorbed=absorbed, prefill_chunk=16)
        assert engine.generate(PROMPTS, max_new_tokens=14, ignore_eos=True) == want
    engine = Engine(model, max_batch_size=2, max_seq_len=48)
    assert engine.generate(PROMPTS, max_new_tokens=14, ignore_eos=True, speculative="mtp") == want
    assert engine.stats["acceptance_rate"] > 0
    # the cache row holds exactly [c_KV ; k_R ; indexer key]: fp32 here, 4 bytes a value
    args = model.args
    assert engine.cache_bytes_per_token == 2 * (32 + 16 + 32) * 4
    fp8 = Engine(model, max_batch_size=2, max_seq_len=48, fp8_index_keys=True)
    assert fp8.cache_bytes_per_token == 2 * ((32 + 16) * 4 + 32 + 4)  # 32 FP8 bytes + one fp32 scale
    assert fp8.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)[0] == want[0][:4]
    assert args.dsa
