"""Model-level behaviour: config parsing, naive vs absorbed attention, MTP, MoE routing pieces."""

import json

import pytest
import torch

from nanoseek.model import ConfigError, ModelArgs, Transformer, preset
from nanoseek.model.moe import Experts, Gate

# The released DeepSeek-V3 config.json (official spelling), verbatim keys.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
# DeepSeek-V2-Lite: no q-LoRA, softmax gate, greedy routing.
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_official_configs_parse():
    v3 = ModelArgs.from_config(V3_CONFIG)
    assert (v3.hidden_size, v3.n_routed_experts, v3.num_nextn_predict_layers) == (7168, 256, 1)
    assert v3.quantization_config["weight_block_size"] == [128, 128]
    # mscale = 0.1 ln 40 + 1 ≈ 1.3689; softmax scale = mscale² / sqrt(192)
    assert v3.softmax_scale == pytest.approx((0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2 / 192**0.5)
    v2 = ModelArgs.from_config(V2_LITE_CONFIG)
    assert v2.q_lora_rank is None and v2.scoring_func == "softmax" and v2.num_nextn_predict_layers == 0
    # round trip through our own spelling
    assert ModelArgs.from_config(v3.to_config()) == v3
    assert ModelArgs.from_config(v2.to_config()) == v2


def test_transformers_style_config_parses_the_same():
    cfg = dict(V3_CONFIG)
    scaling, theta = cfg.pop("rope_scaling"), cfg.pop("rope_theta")
    cfg["rope_parameters"] = {**{k: v for k, v in scaling.items() if k != "type"}, "rope_type": "yarn",
                              "rope_theta": theta}
    cfg["num_mtp_layers"] = cfg.pop("num_nextn_predict_layers")
    assert ModelArgs.from_config(cfg) == ModelArgs.from_config(V3_CONFIG)


@pytest.mark.parametrize("change, words", [
    ({"hidden_sizes": 12}, "unknown config.json keys"),
    ({"model_type": "llama"}, "model_type"),
    ({"num_mtp_layers": 2}, "contradicts"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 40,
                          "original_max_position_embeddings": 4096}}, "contradicts"),
    ({"n_group": 3}, "divisible"),
    ({"topk_method": "random"}, "topk_method"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"qk_head_dim": 100}, "contradicts"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
])
def test_bad_configs_raise_named_errors(change, words):
    with pytest.raises(ConfigError, match=words):
        ModelArgs.from_config({**V3_CONFIG, **change})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        ModelArgs.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        ModelArgs.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("q_lora", [None, 32])
def test_naive_and_absorbed_attention_agree(q_lora):
    args = preset("tiny", q_lora_rank=q_lora, num_hidden_layers=2, vocab_size=101,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8,
                                "mscale": 1.0, "mscale_all_dim": 1.0})
    model = Transformer(args).eval()
    ids = torch.randint(0, args.vocab_size, (2, 24))
    with torch.no_grad():
        naive = model.run(ids, absorbed=False).logits
        absorbed = model.run(ids, absorbed=True).logits
        # and through a latent cache, decoding one token at a time
        S = 32
        cache = [torch.zeros(2, S, args.kv_lora_rank + args.qk_rope_head_dim) for _ in range(args.num_hidden_layers)]
        steps = [model.run(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache).logits
                 for t in range(ids.shape[1])]
    assert (naive - absorbed).abs().max() < 1e-4
    assert (naive - torch.cat(steps, dim=1)).abs().max() < 1e-4


def test_mtp_logits_shapes_and_targets_alignment():
    args = preset("tiny", num_nextn_predict_layers=2, vocab_size=64, num_hidden_layers=2)
    model = Transformer(args)
    ids = torch.randint(0, 64, (3, 10))
    out = model.run(ids, mtp=True)
    assert [tuple(l.shape) for l in out.mtp_logits] == [(3, 9, 64), (3, 8, 64)]
    # routing entries: main MoE layers then the two MTP layers (all MoE in tiny after layer 0)
    assert len(out.routing) == 1 + 2
    # MTP depth 1 at position i sees token i+1: changing the last token changes only the last MTP row
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 64
    out2 = model.run(ids2, mtp=True)
    d = (out.mtp_logits[0] - out2.mtp_logits[0]).abs().amax(dim=(0, 2))
    assert d[:-1].max() < 1e-5 and d[-1] > 1e-3


def test_gate_routing_rules():
    args = preset("tiny", n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2,
                  routed_scaling_factor=2.0)
    gate = Gate(args)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(64, args.hidden_size)
    w, idx, scores = gate(x)
    groups = idx // 2  # 4 groups of 2 experts, topk_group=1: both choices in one group
    assert (groups[:, 0] == groups[:, 1]).all()
    assert torch.allclose(w.sum(-1), torch.full((64,), 2.0))  # renormalised then scaled
    # the bias steers choice but not the weights
    gate.e_score_correction_bias[:] = torch.tensor([10.0, 10.0] + [0.0] * 6)
    w2, idx2, _ = gate(x)
    assert (idx2.sort(-1).values == torch.tensor([0, 1])).all()
    assert torch.allclose(w2, scores.gather(1, idx2) / scores.gather(1, idx2).sum(-1, keepdim=True) * 2.0)


def test_grouped_experts_match_per_expert_loop():
    args = preset("tiny", n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=3)
    experts = Experts(args)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(20, args.hidden_size)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(20)])
    w = torch.rand(20, 3)
    ref = torch.zeros_like(x)
    I = args.moe_intermediate_size
    for t in range(20):
        for j in range(3):
            e = idx[t, j]
            g, u = experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:]
            ref[t] += w[t, j] * (experts.down_proj[e] @ (torch.nn.functional.silu(g @ x[t]) * (u @ x[t])))
    assert torch.allclose(experts(x, idx, w), ref, atol=1e-5)
    # both many-token paths: sorted by expert through the grouped GEMM, and (small CPU batches) every expert densely
    assert torch.allclose(experts._grouped(x, idx, w), ref, atol=1e-5)
    assert torch.allclose(experts._all_experts(x, idx, w), ref, atol=1e-5)


def test_experts_take_the_dense_path_only_while_its_extra_work_is_small(monkeypatch):
    """On CPU a forward without gradients runs every routed expert densely up to `moe.dense_tokens` tokens
    (extra FLOPs under DENSE_EXTRA_FLOPS), the grouped GEMM past it and whenever gradients are on; the
    dense function's gradients are the grouped ones too (the unchosen experts' outputs are weighted by
    exact zeros, so their weights get exactly zero gradient)."""
    from nanoseek.model import moe

    args = preset("tiny", n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=3)
    experts = Experts(args)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    limit = moe.dense_tokens(6, 3, args.hidden_size, args.moe_intermediate_size)
    assert limit == int(moe.DENSE_EXTRA_FLOPS // (3 * 6 * args.hidden_size * args.moe_intermediate_size))
    taken = []
    for path in ("_grouped", "_all_experts"):
        real = getattr(Experts, path)
        monkeypatch.setattr(Experts, path, lambda self, *a, p=path, f=real: taken.append(p) or f(self, *a))
    for n in (limit, limit + 1):
        with torch.no_grad():
            experts(torch.randn(n, args.hidden_size), torch.zeros(n, 3, dtype=torch.long), torch.rand(n, 3))
    experts(torch.randn(limit, args.hidden_size), torch.zeros(limit, 3, dtype=torch.long), torch.rand(limit, 3))
    assert taken == ["_all_experts", "_grouped", "_grouped"]
    monkeypatch.undo()
    x = torch.randn(20, args.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:3] for _ in range(20)])  # expert 5 never chosen
    w = torch.rand(20, 3, requires_grad=True)
    params, grad = [x, w, experts.gate_up_proj, experts.down_proj], torch.randn(20, args.hidden_size)
    want = torch.autograd.grad(experts._grouped(x, idx, w), params, grad)
    got = torch.autograd.grad(experts._all_experts(x, idx, w), params, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[2][5].abs().sum() == 0 and got[3][5].abs().sum() == 0


def test_compiled_experts_match_eager_values_and_gradients():
    """Compiled, the routed experts reorder tokens by gathers both ways (`_Permute`) instead of the
    eager gather + index_add: same outputs, and the same gradients for x, the gate weights and the experts;
    so does the dense path. Bug it catches: a permutation's backward applied with the wrong index (rows
    of another token)."""
    args = preset("tiny", n_routed_experts=6, n_group=1, topk_group=1, num_experts_per_tok=3)
    experts = Experts(args)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    x = torch.randn(20, args.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(20)])
    w = torch.rand(20, 3, requires_grad=True)
    grad = torch.randn(20, args.hidden_size)
    params = [x, w, experts.gate_up_proj, experts.down_proj]
    for path in (experts._grouped, experts._all_experts):
        eager = path(x, idx, w)
        expected = torch.autograd.grad(eager, params, grad)
        compiled = torch.compile(path, fullgraph=True)(x, idx, w)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        for got, want in zip(torch.autograd.grad(compiled, params, grad), expected):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def test_mtp_modules_follow_the_spec_formula():
    """SPEC §1, written out here: depth k at position i computes
    h^k_i = Block(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])) with h^0 the main model's final
    (normed) hidden state, and its logits are lm_head(shared_head.norm(h^k_i)). Every MTP weight is
    random (norm gains too), so swapping enorm/hnorm or the concatenation order, feeding Emb(t_{i+k-1}),
    chaining depth 2 from h^0 instead of h^1, or skipping shared_head.norm all change the logits."""
    from nanoseek.model.transformer import Block

    args = preset("tiny", num_nextn_predict_layers=2, vocab_size=64, num_hidden_layers=2)
    model = Transformer(args).eval()
    for name, p in model.mtp.named_parameters():
        p.copy_(torch.randn_like(p) * (0.3 if name.endswith("norm.weight") else 0.05)
                + (1.0 if name.endswith("norm.weight") else 0.0))
    B, T = 2, 11
    ids = torch.randint(0, 64, (B, T))
    out = model.run(ids, mtp=True)
    cos, sin = model.rope(torch.arange(T).expand(B, T))
    eps = args.rms_norm_eps
    prev = out.hidden  # h^0: the main model's final normed hidden state
    for k, module in enumerate(model.mtp, start=1):
        emb = model.embed_tokens.weight[ids[:, k:]]  # Emb(t_{i+k}) for i = 0 .. T-k-1
        merged = torch.cat([rms(emb, module.enorm.weight, eps),
                            rms(prev[:, : T - k], module.hnorm.weight, eps)], dim=-1) @ module.eh_proj.weight.T
        prev, _ = Block.forward(module, merged, cos[:, : T - k], sin[:, : T - k])
        logits = rms(prev, module.shared_head.norm.weight, eps) @ model.lm_head.weight.T
        torch.testing.assert_close(out.mtp_logits[k - 1], logits, atol=1e-5, rtol=1e-5)
