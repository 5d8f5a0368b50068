"""Reward models: Bradley–Terry loss by hand, and score parity with transformers'
DeepseekV3ForSequenceClassification in both directions (fp32)."""

import json
import math

import pytest
import torch

from nanoseek.model import ModelArgs, Transformer
from nanoseek.rl.reward_model import RewardModel, bt_loss, last_token_index

transformers = pytest.importorskip("transformers")

ARGS = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=1, n_shared_experts=1, max_position_embeddings=64, initializer_range=0.2,
            bos_token_id=0, eos_token_id=1, pad_token_id=2, num_nextn_predict_layers=1)


def test_bt_loss_hand_computed():
    c, r = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.5, -1.0])
    # -log σ(d) = log(1 + e^-d) for d = 1, -0.5, 0
    want = (math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5)) + math.log(2)) / 3
    assert bt_loss(c, r).item() == pytest.approx(want, rel=1e-6)
    m = torch.tensor([1.0, 0.0, 2.0])  # margins: d = 0, -0.5, -2
    want_m = (math.log(2) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(2))) / 3
    assert bt_loss(c, r, m).item() == pytest.approx(want_m, rel=1e-6)


def test_last_token_index_right_left_and_no_pad():
    ids = torch.tensor([[5, 6, 7, 2, 2], [2, 2, 5, 6, 7], [5, 6, 7, 8, 9]])
    assert last_token_index(ids, 2).tolist() == [2, 4, 4]
    assert last_token_index(ids, None).tolist() == [4, 4, 4]


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 61, (3, 9), generator=g)
    ids[0, 6:] = 2  # right padding: the reward is read at position 5
    ids[1, 8:] = 2
    return ids


def hf_scores(path, ids):
    model = transformers.DeepseekV3ForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, attention_mask=(ids != 2).long()).logits.squeeze(-1)


def test_ours_saved_transformers_loads_same_scores(tmp_path):
    rm = RewardModel(Transformer(ModelArgs(**ARGS))).eval()
    assert len(rm.model.mtp) == 0
    rm.save_pretrained(tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForSequenceClassification"] and len(cfg["id2label"]) == 1
    ids = batch()
    with torch.no_grad():
        ours = rm(ids)
    theirs = hf_scores(tmp_path / "rm", ids)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)
    # and it loads back into nanoseek unchanged
    again = RewardModel.from_pretrained(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(again(ids), ours)
    # padding changes nothing: the first row alone, unpadded
    with torch.no_grad():
        assert torch.allclose(rm(ids[:1, :6]), ours[:1], atol=1e-5)


def test_transformers_saved_we_load_same_scores(tmp_path):
    cfg_args = {k: v for k, v in ARGS.items() if k != "num_nextn_predict_layers"}
    config = transformers.DeepseekV3Config(**cfg_args, num_labels=1)
    torch.manual_seed(3)
    hf = transformers.DeepseekV3ForSequenceClassification(config).eval()
    with torch.no_grad():
        hf.score.weight.normal_(0, 0.5)
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    ids = batch()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=(ids != 2).long()).logits.squeeze(-1)
        ours = RewardModel.from_pretrained(tmp_path / "hf")(ids)
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)


def test_base_checkpoint_gets_a_new_head(tmp_path):
    Transformer(ModelArgs(**ARGS)).save_pretrained(tmp_path / "base")
    rm = RewardModel.from_pretrained(tmp_path / "base")
    assert rm.score.weight.shape == (1, 32) and rm.score.weight.abs().sum() > 0
    assert not rm.model.lm_head.weight.requires_grad


def test_packed_equals_padded_and_transformers_values_and_gradients(tmp_path):
    """Padding-free packing (documents end to end, attention per document, last tokens scored) gives
    the padded batch's rewards and gradients; catches attention leaking across packed sequences,
    positions not restarting, or the wrong position scored."""
    torch.manual_seed(0)
    rm = RewardModel(Transformer(ModelArgs(**ARGS)))
    rm.save_pretrained(tmp_path / "rm")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 61, (n,), generator=g).tolist() for n in (7, 3, 12, 1, 9)]
    ids = torch.full((len(seqs), 12), 2)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    packed = rm.packed(seqs)
    (packed * torch.arange(1.0, 6.0)).sum().backward()
    grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    rm.zero_grad()
    padded = rm(ids)
    (padded * torch.arange(1.0, 6.0)).sum().backward()
    assert torch.allclose(packed, padded, atol=1e-5), (packed, padded)
    assert torch.allclose(packed, hf_scores(tmp_path / "rm", ids), atol=1e-4)
    assert grads.keys() == {n for n, p in rm.named_parameters() if p.grad is not None}
    for n, p in rm.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, atol=1e-5), n
    # equal lengths (one bucket, no gathers) and a single sequence agree too
    with torch.no_grad():
        same = [s[:3] for s in seqs if len(s) >= 3]
        assert torch.allclose(rm.packed(same), rm(torch.tensor(same)), atol=1e-5)
        assert torch.allclose(rm.packed(seqs[2:3]), padded[2:3], atol=1e-5)
    # the dense form of the spans (absorbed path) agrees too
    with torch.no_grad():
        flat = torch.tensor([t for s in seqs for t in s])[None]
        ends = torch.tensor([len(s) for s in seqs]).cumsum(0)
        h = rm.model.run(flat, logits=False, doc_lens=[len(s) for s in seqs], keep=ends - 1, absorbed=True).hidden[0]
        assert torch.allclose(rm.score(h).squeeze(-1), padded.detach(), atol=1e-5)


def test_packed_sparse_attention_model():
    """A DSA (deepseek_v32) reward model: short packs go through Spans, long ones (past index_topk) take
    the padded batch; both equal scoring each sequence alone."""
    from nanoseek.model import preset

    torch.manual_seed(0)
    args = preset("tiny-v32", vocab_size=61, hidden_size=32, num_hidden_layers=2, num_nextn_predict_layers=0,
                  pad_token_id=2, bos_token_id=0, eos_token_id=1, index_topk=16)
    rm = RewardModel(Transformer(args)).eval()
    g = torch.Generator().manual_seed(1)
    for lengths in ((5, 3, 6), (30, 5, 20)):
        seqs = [torch.randint(3, 61, (n,), generator=g).tolist() for n in lengths]
        with torch.no_grad():
            alone = torch.cat([rm(torch.tensor([s])) for s in seqs])
            assert torch.allclose(rm.packed(seqs), alone, atol=1e-5)
