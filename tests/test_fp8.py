"""FP8: tile/block quantisation, the FP8 linear and experts for training (nanoseek/quant/).

Tolerances come from E4M3's precision. A normal E4M3 value carries 3 mantissa bits, so rounding to
nearest moves it by at most u = 2^-4 of its magnitude; below the smallest normal (2^-6 · scale)
the spacing is 2^-9 · scale, so the absolute error is at most 2^-10 · scale. Hence the round-trip
bound |x - deq(q(x))| <= max(u·|x|, 2^-10 · scale).

For a GEMM whose two operands are quantised independently, each product x_k·w_k carries a relative
error ε_x + ε_w; with rounding errors spread evenly over ±half a step, the rms relative error of
one quantised value is about u/√3 · (mean of 2^e/|x| over a binade, ≈ 0.72·2) ≈ 0.04 at most, so a
product's is ≤ √2 · 0.04 ≈ 0.06. Summed over K terms of random sign, signal and error both grow as
√K, so the output's relative (Frobenius) error stays near that 0.06 for each GEMM, whatever K.
The tests allow 0.1 (room for sampling noise), and also require the error to be above 0.005, so
a layer that silently skips quantisation fails.
"""

import json

import pytest
import torch

from nanoseek.model import Transformer, preset
from nanoseek.model.moe import Experts
from nanoseek.quant.fp8 import (E4M3, E4M3_MAX, dequantize_blocks, dequantize_tiles, quantize_blocks,
                                quantize_tiles, stored_in_fp8)
from nanoseek.quant.training import FP8Experts, FP8Linear, fp8_linear, fp8_modules, to_fp8_training

pytestmark = pytest.mark.usefixtures("one_thread")
U = 2.0**-4
REL_TOL, REL_FLOOR = 0.1, 0.005


def _data(*shape):
    """Values over several orders of magnitude, so tiles get different scales."""
    return torch.randn(*shape) * torch.logspace(-3, 2, shape[-1])[torch.randperm(shape[-1])]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- the vocabulary --------------------------------------------------------------------------------
@pytest.mark.parametrize("pow2", [False, True])
def test_tiles_round_trip_within_e4m3_bound_on_ragged_shapes(pow2):
    x = _data(7, 300)  # 300 = 2 full tiles + a ragged one of 44
    q, s = quantize_tiles(x, pow2=pow2)
    assert q.dtype == E4M3 and q.shape == x.shape and s.shape == (7, 3) and s.dtype == torch.float32
    back = dequantize_tiles(q, s)
    bound = torch.maximum(U * x.abs(), 2.0**-10 * s.repeat_interleave(128, 1)[:, :300])
    assert ((back - x).abs() <= bound * (1 + 1e-6)).all()
    tiles = torch.nn.functional.pad(x, (0, 84)).unflatten(1, (3, 128)).abs().amax(-1)
    assert (s >= tiles / E4M3_MAX * (1 - 1e-6)).all()  # the largest element fits
    if pow2:
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))
        assert (s < 2 * tiles / E4M3_MAX).all()  # rounded up by less than one binade
    else:
        assert torch.allclose(s, tiles / E4M3_MAX)  # online max-abs: the max maps to 448


def test_tiles_along_another_dim():
    x = _data(300, 5)
    q, s = quantize_tiles(x, dim=0)
    assert s.shape == (3, 5)
    ref_q, ref_s = quantize_tiles(x.t().contiguous())
    assert torch.equal(s, ref_s.t()) and torch.equal(q.float(), ref_q.float().t())
    assert torch.equal(dequantize_tiles(q, s, dim=0), dequantize_tiles(ref_q, ref_s).t())


@pytest.mark.parametrize("pow2", [False, True])
def test_blocks_round_trip_ragged_and_batched(pow2):
    w = _data(3, 200, 300)  # experts x [200, 300]: ragged in both dims
    q, s = quantize_blocks(w, pow2=pow2)
    assert q.shape == w.shape and s.shape == (3, 2, 3)
    back = dequantize_blocks(q, s)
    full = s.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)[:, :, :300]
    assert ((back - w).abs() <= torch.maximum(U * w.abs(), 2.0**-10 * full) * (1 + 1e-6)).all()
    # each block scaled by its own max: the last (ragged) block of expert 2
    assert s[2, 1, 2].item() >= w[2, 128:, 256:].abs().max().item() / E4M3_MAX * (1 - 1e-6)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_blocks(q[0], s[0, :1])


def test_zero_tiny_inf_nan_tiles_are_handled_never_a_nan_scale():
    x = torch.randn(6, 256)
    x[0, :128] = 0  # zero tile
    x[1, :128] = 1e-42  # subnormal fp32: amax/448 would underflow to 0
    x[2, 5] = float("inf")
    x[3, 7] = float("nan")
    x[4, :128] = float("nan")  # nothing finite in the tile
    x[5, 200] = -float("inf")
    q, s = quantize_tiles(x)
    assert torch.isfinite(s).all() and (s > 0).all()
    back = dequantize_tiles(q, s)
    assert s[0, 0] == 1 and (back[0, :128] == 0).all()
    assert torch.isfinite(back[1]).all() and s[1, 0] >= torch.finfo(torch.float32).tiny
    # non-finite elements come out NaN; the rest of their tile keeps the precision of its finite max
    for r, c in [(2, 5), (3, 7), (5, 200)]:
        assert back[r, c].isnan()
        tile = slice(0, 128) if c < 128 else slice(128, 256)
        finite = torch.isfinite(x[r, tile])
        assert s[r, c // 128] == pytest.approx(x[r, tile][finite].abs().max().item() / E4M3_MAX)
        err = (back[r, tile] - x[r, tile])[finite].abs()
        assert (err <= torch.maximum(U * x[r, tile][finite].abs(), 2.0**-10 * s[r, c // 128])).all()
    assert s[4, 0] == 1 and back[4, :128].isnan().all()
    big = torch.full((2, 128), 3e38)  # near fp32's max: no overflow to inf in the scale
    qb, sb = quantize_blocks(big)
    assert torch.isfinite(sb).all() and torch.allclose(dequantize_blocks(qb, sb), big, rtol=U)


def test_v3_fp8_tensor_names():
    assert stored_in_fp8("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert stored_in_fp8("model.layers.3.mlp.experts.17.down_proj.weight")
    assert stored_in_fp8("model.layers.61.mlp.shared_experts.up_proj.weight")
    for name in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.3.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.61.eh_proj.weight",
                 "model.layers.61.shared_head.head.weight", "model.layers.0.self_attn.kv_a_layernorm.weight",
                 "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.q_a_proj.weight_scale_inv"]:
        assert not stored_in_fp8(name), name


# --- FP8 linear --------------------------------------------------------------------------------------
def _loop_quant(t, rows_block, cols_block):
    """An independent quantise->dequantise, one block at a time (1 x 128 tiles: rows_block=1)."""
    out = torch.empty_like(t)
    for i in range(0, t.shape[0], rows_block):
        for j in range(0, t.shape[1], cols_block):
            b = t[i : i + rows_block, j : j + cols_block]
            s = b.abs().max() / 448 if b.abs().max() > 0 else torch.tensor(1.0)
            out[i : i + rows_block, j : j + cols_block] = (b / s).to(E4M3).float() * s
    return out


def test_fp8_linear_is_exactly_the_tiled_emulation_of_all_three_gemms():
    x = _data(150, 200).requires_grad_()  # 150 tokens, 200 in, 260 out: ragged everywhere
    w = (torch.randn(260, 200) * 0.05).requires_grad_()
    dy = _data(150, 260)
    y = fp8_linear(x, w)
    y.backward(dy)
    w_hat = _loop_quant(w.detach(), 128, 128)
    x_hat = _loop_quant(x.detach(), 1, 128)  # Fprop: x tiled along in_features
    assert torch.allclose(y, x_hat @ w_hat.T, rtol=1e-5, atol=1e-5)
    # Dgrad: dy tiled along out_features, the same weight blocks
    assert torch.allclose(x.grad, _loop_quant(dy, 1, 128) @ w_hat, rtol=1e-5, atol=1e-5)
    # Wgrad: dy^T and x^T tiled along the tokens; x re-tiled from its cached FP8 forward copy
    dw = _loop_quant(dy.t().contiguous(), 1, 128) @ _loop_quant(x_hat.t().contiguous(), 1, 128).T
    assert torch.allclose(w.grad, dw, rtol=1e-5, atol=1e-4)


def test_fp8_linear_tracks_fp32_within_e4m3_tolerance():
    lin = torch.nn.Linear(384, 256, bias=True)
    ref = torch.nn.Linear(384, 256, bias=True)
    ref.load_state_dict(lin.state_dict())
    lin.__class__ = FP8Linear
    x = torch.randn(4, 64, 384, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    dy = torch.randn(4, 64, 256)
    lin(x).backward(dy)
    ref(x_ref).backward(dy)
    for got, want in [(lin(x).detach(), ref(x_ref).detach()), (x.grad, x_ref.grad), (lin.weight.grad, ref.weight.grad)]:
        assert REL_FLOOR < _rel(got, want) < REL_TOL
    assert torch.allclose(lin.bias.grad, ref.bias.grad)  # the bias is not quantised


def test_fp8_experts_track_fp32_and_tile_each_expert_group_separately():
    args = preset("tiny", hidden_size=192, moe_intermediate_size=160, n_routed_experts=4, num_experts_per_tok=2)
    ref = Experts(args)
    torch.nn.init.normal_(ref.gate_up_proj, std=0.05)
    torch.nn.init.normal_(ref.down_proj, std=0.05)
    fp8 = Experts(args)
    fp8.load_state_dict(ref.state_dict())
    fp8.__class__ = FP8Experts
    x = torch.randn(300, 192)
    indices = torch.stack([torch.randperm(4)[:2] for _ in range(300)])
    weights = torch.rand(300, 2)
    indices[:, 0][indices[:, 0] == 3] = 0  # uneven groups
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = fp8(xa, indices, weights), ref(xb, indices, weights)
    dy = torch.randn_like(out)
    out.backward(dy)
    want.backward(dy)
    for got, exp in [(out, want), (xa.grad, xb.grad), (fp8.gate_up_proj.grad, ref.gate_up_proj.grad),
                     (fp8.down_proj.grad, ref.down_proj.grad)]:
        assert REL_FLOOR < _rel(got.detach(), exp) < REL_TOL
    # expert e's weight gradient is an FP8 linear's over its own tokens alone: no tile straddles groups
    e = 1
    rows, slot = (indices == e).nonzero(as_tuple=True)
    w = fp8.gate_up_proj.detach()[e].clone().requires_grad_()
    h = fp8_linear(x[rows], w)
    g = torch.autograd.grad(h, w, _expert_dh(fp8, x, indices, weights, dy, e, rows, slot))[0]
    assert torch.allclose(g, fp8.gate_up_proj.grad[e], rtol=1e-4, atol=1e-5)


def _expert_dh(experts, x, indices, weights, dy, e, rows, slot):
    """d loss / d (x[rows] @ gate_up[e]^T) through silu-gating, down_proj and the routing weight."""
    h = fp8_linear(x[rows], experts.gate_up_proj.detach()[e]).requires_grad_()
    gate, up = h.chunk(2, dim=-1)
    out = fp8_linear(torch.nn.functional.silu(gate) * up, experts.down_proj.detach()[e])
    out = out * weights[rows, slot, None]
    return torch.autograd.grad(out, h, dy[rows])[0]


def test_to_fp8_training_swaps_the_right_layers_and_keeps_the_state_dict():
    args = preset("tiny", num_hidden_layers=2, vocab_size=256)
    model = Transformer(args)
    keys = list(model.state_dict())
    ref = Transformer(args)
    ref.load_state_dict(model.state_dict())
    to_fp8_training(model)
    to_fp8_training(model)  # idempotent
    assert list(model.state_dict()) == keys
    assert type(model.lm_head) is torch.nn.Linear and type(model.embed_tokens) is torch.nn.Embedding
    assert type(model.mtp[0].eh_proj) is torch.nn.Linear
    assert isinstance(model.layers[0].self_attn.kv_a_proj_with_mqa, FP8Linear)
    assert isinstance(model.layers[1].mlp.experts, FP8Experts)
    assert isinstance(model.mtp[0].mlp.shared_experts.down_proj, FP8Linear)
    linears = sum(type(m) is torch.nn.Linear for m in ref.modules())
    experts = sum(type(m) is Experts for m in ref.modules())
    assert fp8_modules(model) == linears - 1 - len(ref.mtp) + experts  # all but lm_head and eh_proj
    ids = torch.randint(0, 256, (2, 48))
    out, want = model(ids), ref(ids)
    assert REL_FLOOR / 10 < _rel(out.detach(), want.detach()) < REL_TOL


# --- nanoseek train --precision fp8 ------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nanoseek.stages import prepare

    out = tmp_path_factory.mktemp("data")
    prepare.main(["--out", str(out), "--max-bytes", "300000", "--vocab-size", "384", "--seq-len", "32",
                  "--val-fraction", "0.1"])
    return out


def _train(data, out, *flags):
    from nanoseek.stages import train

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                 n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, num_nextn_predict_layers=1)
    sets = [f"--set={k}={v}" for k, v in small.items()]
    argv = ["--data", str(data), "--out", str(out), *sets, "--batch-size", "4", "--batch-start", "4", "--quiet",
            "--eval-batches", "2", "--samples", "0", "--warmup-steps", "5", "--lr", "1e-2", "--eval-every", "0", *flags]
    assert train.main(argv) == 0
    from nanoseek.train.metrics import read_jsonl

    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]


def test_fp8_training_tracks_fp32_and_checkpoints_stay_hf(data, tmp_path):
    ref = _train(data, tmp_path / "fp32", "--steps", "30")
    fp8 = _train(data, tmp_path / "fp8", "--steps", "30", "--precision", "fp8", "--adam-moments", "bf16")
    assert all(r["precision"] == "fp8" for r in fp8) and all(r["precision"] == "fp32" for r in ref)
    a, b = [r["loss"] for r in ref], [r["loss"] for r in fp8]
    assert a[-1] < a[0] - 1.0 and b[-1] < b[0] - 1.0  # both learn
    assert a[:1] != b[:1] or a[1] != b[1]  # FP8 really changed the numbers
    late = [abs(x - y) / x for x, y in zip(a[-10:], b[-10:])]
    assert sum(late) / len(late) < 0.02, late  # and they track the fp32 run
    summary = json.loads((tmp_path / "fp8" / "summary.json").read_text())
    assert summary["precision"] == "fp8" and summary["adam_moments"] == "bf16"
    ckpt = tmp_path / "fp8" / "checkpoints" / "latest"
    model = Transformer.from_pretrained(tmp_path / "fp8" / "checkpoints" / ckpt.read_text().strip())
    assert model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32  # ordinary HF layout


def test_fp8_training_resumes_bitwise(data, tmp_path):
    from nanoseek.stages import train

    flags = ["--steps", "8", "--precision", "fp8", "--adam-moments", "bf16"]
    full = _train(data, tmp_path / "full", *flags)
    _train(data, tmp_path / "split", *flags, "--stop-at", "4")
    assert train.main(["--out", str(tmp_path / "split"), "--resume", "--quiet"]) == 0
    from nanoseek.train.metrics import read_jsonl

    split = [r for r in read_jsonl(tmp_path / "split" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["loss"] for r in split] == [r["loss"] for r in full]


def test_sft_precision_fp8_learns(tmp_path):
    from nanoseek.data import train_bpe
    from nanoseek.rl.tasks import arithmetic, worked_solutions
    from nanoseek.stages import sft
    from nanoseek.train.metrics import read_jsonl

    rows = worked_solutions(arithmetic(30, seed=0, digits=2, ops="+"))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_bpe([json.dumps(r) for r in rows], vocab_size=400).save(tmp_path / "tok")
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=32,
                 n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    sets = [x for k, v in small.items() for x in ("--set", f"{k}={v}")]
    argv = ["--init-preset", "tiny", "--tokenizer", tmp_path / "tok", "--data", tmp_path / "chat.jsonl",
            "--out", tmp_path / "run", *sets, "--seq-len", "192", "--batch-size", "2", "--lr", "1e-2",
            "--eval-every", "0", "--samples", "0", "--quiet", "--epochs", "2", "--precision", "fp8",
            "--adam-moments", "bf16"]
    assert sft.main([str(x) for x in argv]) == 0
    assert all(r["precision"] == "fp8" for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "fp8" and summary["final_val_loss"] < summary["initial_val_loss"] - 0.5


def test_fp8_with_compile_is_refused_in_one_line(data, tmp_path, capsys):
    from nanoseek.stages import train

    code = train.main(["--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2", "--precision", "fp8",
                       "--compile", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--compile does not combine with --precision fp8" in err and "Traceback" not in err
