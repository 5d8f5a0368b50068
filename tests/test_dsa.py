"""DeepSeek Sparse Attention (deepseek_v32): parity with transformers' DeepseekV32ForCausalLM in both
directions (fp32, contexts shorter and longer than index_topk), sparse == dense when index_topk covers
the context, deterministic top-k ties, config round trips, and cached sparse decoding == the
uncached sparse forward (absorbed gather path, naive masked path, FP8 keys)."""

import json
import math

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


# --- training the indexer ---------------------------------------------------------------------------
def small_trainable():
    from nanoseek.model import preset

    torch.manual_seed(0)
    return Transformer(preset("tiny-v32", index_topk=8, num_hidden_layers=2, num_nextn_predict_layers=0,
                              initializer_range=0.1, hidden_size=64, vocab_size=256))


@pytest.mark.usefixtures("one_thread")
def test_dsa_warmup_lowers_the_indexer_kl():
    from nanoseek.train.dsa import IndexerLoss, freeze_all_but_indexers

    model = small_trainable()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".indexer." not in n}
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
    hooks = IndexerLoss(model)
    opt = torch.optim.AdamW(freeze_all_but_indexers(model), lr=1e-2)
    set_sparse(model, False)  # warm-up: dense attention, the main model frozen
    kls, kept = [], []
    for _ in range(8):
        with torch.no_grad():
            model.run(ids, logits=False)
        stats = hooks.pop()
        opt.zero_grad()
        stats.kl.backward()
        opt.step()
        kls.append(stats.kl.item())
        kept.append(stats.kept_mass)
    assert kls[-1] < 0.5 * kls[0] and kept[-1] > kept[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_sparse_stage_keeps_the_two_losses_on_their_own_graphs():
    from nanoseek.train.dsa import IndexerLoss

    model = small_trainable()
    hooks = IndexerLoss(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(6))
    logits = model(ids)  # sparse: 24 tokens > index_topk 8
    kl = hooks.pop().kl
    indexer = [p for n, p in model.named_parameters() if ".indexer." in n]
    main = [p for n, p in model.named_parameters() if ".indexer." not in n]
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert all(g is None for g in torch.autograd.grad(lm, indexer, allow_unused=True, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(kl, main, allow_unused=True, retain_graph=True))
    assert any(g is not None and g.abs().sum() > 0 for g in torch.autograd.grad(kl, indexer, allow_unused=True))


def test_extended_context_config_loads_in_transformers_with_matching_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanoseek.model.rope import extend_context

    model = make_model("topk_above_context")
    args = model.args.replace(max_position_embeddings=16, num_nextn_predict_layers=0)
    extended = extend_context(args, 64)  # 4x: positions 16..63 are past the original context
    assert extended.rope_scaling["factor"] == 4.0 and extended.rope_scaling["original_max_position_embeddings"] == 16
    assert extend_context(extended, 128).rope_scaling["original_max_position_embeddings"] == 16  # a 2nd stage
    with pytest.raises(ValueError, match="must exceed"):
        extend_context(extended, 32)
    longer = Transformer(extended).eval()
    longer.load_state_dict(model.state_dict(), strict=False)  # the same weights, the new rope
    longer.save_pretrained(tmp_path)
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    ids = torch.randint(0, 97, (1, 60), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = longer(ids), hf(ids).logits
        assert (ours - theirs).abs().max().item() <= 1e-4
        assert (ours - model(ids)).abs().max().item() > 1e-3  # the new rope really changed something


# --- passkey retrieval ------------------------------------------------------------------------------
def test_passkey_generator_and_scorer():
    from nanoseek.eval.passkey import NEEDLE, QUESTION, make_case, make_cases, score, summarize

    encode = lambda s: list(s.encode())  # noqa: E731  (one token per byte: lengths are easy to check)
    case = make_case(encode, 2000, 0.25, "48213")
    assert 1900 < case.tokens <= 2000 and case.prompt.endswith(QUESTION)
    assert case.prompt.count("48213") == 2 and NEEDLE.format(key="48213") in case.prompt
    at = case.prompt.index("The pass key is 48213")
    assert 0.2 < at / len(case.prompt) < 0.3  # the needle sits at the asked depth
    cases = make_cases(encode, 1000, 5, seed=3)
    assert [c.depth for c in cases] == [0, 0.25, 0.5, 0.75, 1] and len({c.key for c in cases}) == 5
    assert cases[0].prompt.index("The pass key") < 200 and cases[-1].prompt.rindex("pass key is") > 800
    assert score(" 48213. Remember", "48213") and score("48213", "48213")
    assert not score(" 4821", "48213") and not score(" 482135", "48213") and not score(" none", "48213")
    assert not score(" 11 then 48213", "48213")  # the first number counts
    s = summarize(cases, [f" {c.key}." if c.depth > 0.5 else " 0" for c in cases])
    assert s["accuracy"] == 0.4 and s["accuracy_by_depth"]["0.8-1.0"] == 1.0 and s["accuracy_by_depth"]["0.0-0.2"] == 0
    with pytest.raises(ValueError, match="too short"):
        make_case(encode, 50, 0.5, "12345")


def test_eval_passkey_cli(tmp_path, capsys):
    from nanoseek.data import train_bpe
    from nanoseek.model import preset
    from nanoseek.stages import eval as eval_stage

    tok = train_bpe(["The grass is green. The pass key is 12345. What is the pass key?"] * 20, vocab_size=300)
    torch.manual_seed(0)
    Transformer(preset("tiny-v32", vocab_size=300, num_hidden_layers=2, index_topk=32,
                       max_position_embeddings=256)).save_pretrained(tmp_path / "m")
    tok.save(tmp_path / "m")
    assert eval_stage.main(["--model", str(tmp_path / "m"), "--task", "passkey", "--context", "200", "--n", "3",
                            "--batch-size", "3", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "m" / "eval-passkey-200" / "summary.json").read_text())
    assert summary["cases"] == 3 and 0 <= summary["accuracy"] <= 1 and summary["prompt_tokens"][1] <= 192
    assert "passkey @ 200 tokens" in capsys.readouterr().out
    assert eval_stage.main(["--model", str(tmp_path / "m"), "--task", "passkey", "--context", "512"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_bench_dsa_smoke(tmp_path, capsys):
    """`nanoseek bench dsa` end to end at small sizes (figures are produced, not checked)."""
    pytest.importorskip("transformers")
    from nanoseek.bench import dsa

    out = tmp_path / "rows.jsonl"
    assert dsa.main(["--contexts", "96", "--steps", "2", "--repeats", "1", "--hf-context", "48", "--fp8-context", "96",
                     "--set", "index_topk=32", "--set", "num_hidden_layers=2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["context"] == 96 and rows[1]["transformers_ms"][0] > 0
    assert rows[-1]["cache_bytes"] == {"dense_v3": 2 * 48 * 4, "v32": 2 * 80 * 4, "v32_fp8_keys": 2 * (48 * 4 + 36)}
    assert 0 <= rows[-1]["topk_overlap"] <= 1
    assert "FP8 indexer keys" in capsys.readouterr().out


# --- the training stages end to end -------------------------------------------------------------------
def test_train_stages_dsa_warmup_sparse_and_context_extension(tmp_path):
    from nanoseek.checkpoint import resolve_model_dir
    from nanoseek.stages import prepare
    from nanoseek.stages import train as train_stage
    from nanoseek.train.metrics import read_jsonl

    data = tmp_path / "data"
    prepare.main(["--out", str(data), "--max-bytes", "150000", "--vocab-size", "320", "--seq-len", "32",
                  "--val-fraction", "0.1"])
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
                 kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, moe_intermediate_size=16,
                 n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2, num_nextn_predict_layers=1,
                 max_position_embeddings=32, initializer_range=0.1)
    fast = ["--batch-size", "4", "--batch-start", "4", "--eval-batches", "1", "--samples", "0", "--quiet",
            "--warmup-steps", "2", "--eval-every", "0"]

    def train(out, *flags):
        return train_stage.main(["--data", str(data), "--out", str(tmp_path / out), *fast, *flags])

    assert train("v3", *[f"--set={k}={json.dumps(v)}" for k, v in small.items()], "--steps", "3") == 0
    base = Transformer.from_pretrained(resolve_model_dir(tmp_path / "v3"))
    # V3.2 stage 1 from a V3 checkpoint: fresh indexers, everything else frozen, dense attention
    assert train("warm", "--resume-from", str(tmp_path / "v3"), "--dsa-warmup", "--steps", "6", "--lr", "1e-2",
                 "--set", "index_topk=8", "--set", "index_n_heads=2", "--set", "index_head_dim=8") == 0
    warm = Transformer.from_pretrained(resolve_model_dir(tmp_path / "warm"))
    assert warm.args.dsa and warm.args.index_topk == 8
    assert torch.equal(warm.layers[1].self_attn.kv_b_proj.weight, base.layers[1].self_attn.kv_b_proj.weight)
    s = json.loads((tmp_path / "warm" / "summary.json").read_text())
    assert s["stage"] == "dsa-warmup" and s["final_indexer_kl"] < s["initial_indexer_kl"]
    # stage 2: sparse (32-token windows, top-8), the LM loss and the indexer KL each on their own graph
    assert train("sparse", "--resume-from", str(tmp_path / "warm"), "--steps", "3", "--lr", "1e-3") == 0
    recs = [r for r in read_jsonl(tmp_path / "sparse" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(0 < r["kept_mass"] <= 1 and r["indexer_kl"] >= 0 and math.isfinite(r["loss"]) for r in recs)
    # YaRN context extension: 32 -> 64 positions, trained on 64-token windows
    assert train("long", "--resume-from", str(tmp_path / "v3"), "--extend-context", "64", "--steps", "2") == 0
    config = json.loads((resolve_model_dir(tmp_path / "long") / "config.json").read_text())
    assert config["max_position_embeddings"] == 64
    assert config["rope_scaling"] == {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    with pytest.raises(SystemExit) as e:  # nothing to extend
        train("bad", "--extend-context", "64", "--steps", "1")
    assert e.value.code == 2


def test_server_on_a_v32_checkpoint():
    """The OpenAI-compatible server on a deepseek_v32 model: a completion past index_topk tokens
    equals uncached greedy decoding."""
    pytest.importorskip("openai")
    from serving import serve

    from nanoseek.data import train_bpe

    tok = train_bpe(["the quick brown fox jumps over the lazy dog " * 4] * 10, vocab_size=300)
    model = tiny_v32(vocab_size=300)
    prompt = "the quick brown fox jumps over the lazy dog " * 3
    ids = tok.encode(prompt, add_bos=True)
    assert len(ids) > model.args.index_topk  # the prompt and every step attend sparsely
    with serve(model, tok, slots=2, context=128) as live:
        r = live.client().completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    want = greedy_reference(model, ids, 8)
    assert r.choices[0].text == tok.decode(want[: r.usage.completion_tokens], skip_special_tokens=True)
