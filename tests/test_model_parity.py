"""Parity with transformers (the independent peer) in both directions, fp32, tiny random configs.

Together the configs cover: q-LoRA on/off, sigmoid and softmax gates, n_group > 1, every
topk_method, norm_topk_prob on/off, YaRN active (sequence longer than the original context),
several dense layers, an MTP module in the checkpoint, and both RoPE layouts (interleaved pairs, the
checkpoints' default, and rope_interleave=False halves).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek.model import ModelArgs, Transformer

BASE = dict(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3,
    kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, moe_intermediate_size=24,
    n_routed_experts=8, num_experts_per_tok=3, initializer_range=0.15, rms_norm_eps=1e-6,
    max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

V3_CASES = {
    "v3_qlora_groups_yarn_2dense": dict(q_lora_rank=20, n_group=4, topk_group=2, norm_topk_prob=True,
                                        first_k_dense_replace=2, n_shared_experts=1, routed_scaling_factor=2.5,
                                        rope_scaling=YARN),
    "v3_noqlora_nonorm_mtp": dict(q_lora_rank=None, n_group=1, topk_group=1, norm_topk_prob=False,
                                  first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=1.5,
                                  num_nextn_predict_layers=1),
    "v3_yarn_mscale_differs": dict(q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True,
                                   first_k_dense_replace=0, n_shared_experts=1, routed_scaling_factor=1.0,
                                   rope_scaling=dict(YARN, factor=8.0, mscale=0.9, mscale_all_dim=0.7)),
    # the half-split (rotate_half) RoPE layout that transformers selects with rope_interleave=False
    "v3_rope_halves": dict(q_lora_rank=20, n_group=2, topk_group=1, norm_topk_prob=True, first_k_dense_replace=1,
                           n_shared_experts=1, routed_scaling_factor=2.5, rope_interleave=False),
}
V2_CASES = {
    "v2_lite_greedy": dict(model_type="deepseek_v2", q_lora_rank=None, topk_method="greedy", scoring_func="softmax",
                           n_group=1, topk_group=1, norm_topk_prob=False, first_k_dense_replace=1,
                           n_shared_experts=2, routed_scaling_factor=1.0, num_nextn_predict_layers=0),
    "v2_group_limited_yarn": dict(model_type="deepseek_v2", q_lora_rank=20, topk_method="group_limited_greedy",
                                  scoring_func="softmax", n_group=4, topk_group=2, norm_topk_prob=False,
                                  first_k_dense_replace=2, n_shared_experts=1, routed_scaling_factor=16.0,
                                  num_nextn_predict_layers=0, rope_scaling=dict(YARN, mscale=0.707,
                                                                                mscale_all_dim=0.707)),
}
CASES = {**V3_CASES, **V2_CASES}
SEQ = 48  # > original_max_position_embeddings (16): YaRN's interpolated frequencies matter


def hf_class(model_type):
    return transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM


def make_args(case) -> ModelArgs:
    return ModelArgs(**{**BASE, **CASES[case]})


def hf_logits(path, ids):
    cls = hf_class(json.loads((path / "config.json").read_text())["model_type"])
    model = cls.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def randomize_biases(model: Transformer):
    for layer in model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.normal_(0, 0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_nanoseek_saves_transformers_loads(case, tmp_path):
    args = make_args(case)
    model = Transformer(args).eval()
    randomize_biases(model)
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, args.vocab_size, (2, SEQ))
    with torch.no_grad():
        ours = model(ids)
    theirs = hf_logits(tmp_path, ids)
    assert ours.shape == theirs.shape == (2, SEQ, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore:.*holds no MTP tensors")  # transformers drops MTP modules on save
def test_transformers_saves_nanoseek_loads(case, tmp_path):
    args = make_args(case)
    config = args.to_config()
    cls = hf_class(args.model_type)
    hf_config = cls.config_class.from_dict(config)
    torch.manual_seed(1)
    hf = cls(hf_config).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.05)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, args.vocab_size, (2, SEQ))
    with torch.no_grad():
        theirs = hf(ids).logits
    ours_model = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        ours = ours_model(ids)
    assert (ours - theirs).abs().max().item() <= 1e-4
    # the routing really is non-trivial: the gates pick different experts for different tokens
    out = ours_model.run(ids)
    assert len({tuple(r) for r in out.routing[0].indices.sort(-1).values.tolist()}) > 3


def test_transformers_reads_official_style_config(tmp_path):
    """Official DeepSeek spelling (rope_scaling + rope_theta, num_nextn_predict_layers) in transformers too."""
    args = make_args("v3_qlora_groups_yarn_2dense")
    Transformer(args).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in config
    hf_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf_config.rope_parameters["factor"] == 4.0
