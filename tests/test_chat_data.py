"""Chat data for SFT: encode_chat's loss mask on both tokenizers, JSONL errors naming the line,
padding-free packing (positions restart, no attention across conversations) and its loss."""

import json

import pytest
import torch

from nanoseek.data import DataError, load_deepseek_v3, train_bpe
from nanoseek.data.chat import encode_chat, pack, pack_rows, read_chat_jsonl
from nanoseek.data.tokenizer import ASSISTANT, EOS, USER
from nanoseek.model import Transformer, preset
from nanoseek.train.loss import sft_loss

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, first_k_dense_replace=1,
            q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=2,
            num_nextn_predict_layers=1, initializer_range=0.05)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42", "reasoning_content": "an earlier thought, dropped by the template"},
    {"role": "user", "content": "And 7 × 6? 中文"},
    {"role": "assistant", "content": "Also 42.", "reasoning_content": "7 times 6 is 42."},
]


@pytest.fixture(scope="module", params=["bpe", "deepseek-v3"])
def tokenizer(request):
    if request.param == "bpe":
        texts = [json.dumps(CONVERSATION, ensure_ascii=False), "the quick brown fox 1234 " * 20]
        return train_bpe(texts * 5, vocab_size=400)
    return load_deepseek_v3()


def masked_runs(ids, mask):
    """The maximal runs of consecutive loss tokens, as id lists."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_encode_chat_masks_exactly_the_assistant_turns(tokenizer):
    ids, mask = encode_chat(tokenizer, CONVERSATION)
    assert len(ids) == len(mask)
    text = tokenizer.decode(ids)
    # the ids are the tokenization of the template's rendering (+ the last turn's reasoning)
    head = tokenizer.apply_chat_template(CONVERSATION[:4], add_generation_prompt=True)
    assert text == head + "<think>\n7 times 6 is 42.\n</think>\n\nAlso 42." + EOS
    assert ids == tokenizer.encode(text)
    assert "earlier thought" not in text  # past reasoning is never fed back (the template's rule)
    runs = [tokenizer.decode(r) for r in masked_runs(ids, mask)]
    assert runs == ["42" + EOS, "<think>\n7 times 6 is 42.\n</think>\n\nAlso 42." + EOS]
    unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert unmasked.count(ASSISTANT) == 2 and unmasked.count(USER) == 2 and "You are terse." in unmasked
    assert not mask[0]  # BOS


def test_encode_chat_single_turn_and_inline_reasoning(tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think>yo"}]
    ids, mask = encode_chat(tokenizer, msgs)
    assert [tokenizer.decode(r) for r in masked_runs(ids, mask)] == ["<think>x</think>yo" + EOS]
    # a trailing user turn teaches nothing and is left out
    ids2, _ = encode_chat(tokenizer, msgs + [{"role": "user", "content": "more"}])
    assert ids2 == ids


@pytest.mark.parametrize("messages, error", [
    ([], "non-empty"),
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
    ([{"content": "hi"}], "has no role"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content must be a string"),
    ([{"role": "user", "content": "q", "reasoning_content": "r"}, {"role": "assistant", "content": "x"}],
     "only assistant turns"),
])
def test_encode_chat_rejects_bad_conversations(messages, error):
    tok = load_deepseek_v3()
    with pytest.raises(DataError, match=error):
        encode_chat(tok, messages)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_chat_jsonl_names_file_and_line(tmp_path):
    tok = load_deepseek_v3()
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "a b c"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, "{not json", "", good, long, {"messages": [{"role": "user",
                                                                                               "content": "q"}]}])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: invalid JSON"):
        read_chat_jsonl(path, tok, max_len=32)
    convs, skipped = read_chat_jsonl(path, tok, max_len=32, skip_bad=True)
    assert len(convs) == 2
    assert skipped.lines == {"invalid": [2, 6], "longer than 32 tokens": [5]}
    assert "chat.jsonl: skipped 2 row(s), invalid: lines 2, 6" in skipped.summary()
    with pytest.raises(DataError, match=r"chat\.jsonl:5: conversation of \d+ tokens is longer"):
        read_chat_jsonl(path, tok, max_len=32, too_long="error", skip_bad=True)
    # truncating keeps the row only if a loss token survives: here the answer is cut off
    convs, skipped = read_chat_jsonl(path, tok, max_len=32, too_long="truncate", skip_bad=True)
    assert len(convs) == 2 and skipped.lines["longer than 32 tokens"] == [5]
    convs, skipped = read_chat_jsonl(path, tok, max_len=60, too_long="truncate", skip_bad=True)
    assert len(convs) == 3 and skipped.truncated == [] and max(len(c[0]) for c in convs) <= 60
    with pytest.raises(DataError, match="cannot read"):
        read_chat_jsonl(tmp_path / "missing.jsonl", tok, 32)


def test_pack_restarts_positions_and_keeps_order():
    convs = [([1] * n, [True] * n) for n in (5, 3, 7, 2)]
    assert pack_rows([5, 3, 7, 2], 8) == [[0, 1, 3], [2]]
    b = pack(convs, 8)
    assert b.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    assert b.doc_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 2, -1]
    assert b.loss_mask[0].tolist() == [True] * 7 + [False]
    with pytest.raises(ValueError, match="more than seq_len"):
        pack_rows([10], 8)


def test_packed_loss_is_the_sum_of_conversation_losses():
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **TINY, vocab_size=64))
    gen = torch.Generator().manual_seed(1)
    convs = []
    for n in (9, 6, 11, 5):
        ids = torch.randint(3, 64, (n,), generator=gen).tolist()
        mask = [i >= n // 2 for i in range(n)]
        convs.append((ids, mask))
    packed = pack(convs, 32)
    assert packed.inputs.shape[0] == 1  # all four in one row
    whole = sft_loss(model, packed, mtp_lambda=0.1)
    ce = 0.0
    for c in convs:
        one = sft_loss(model, pack([c], len(c[0]) - 1), mtp_lambda=0.1)
        ce += one.ce_sum.item()
    assert whole.ce_sum.item() == pytest.approx(ce, rel=1e-5)
    assert whole.tokens == sum(sum(m[1:]) for _, m in convs)
    # without the document mask, later conversations would see earlier ones: a different loss
    out = model.run(packed.inputs, positions=packed.positions)
    keep = packed.loss_mask
    leaky = torch.nn.functional.cross_entropy(out.logits[keep], packed.targets[keep], reduction="sum").item()
    assert abs(leaky - ce) > 1e-3


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    """Bug: a UTF-8 BOM (what many Windows editors write) made the first row 'invalid JSON'."""
    tok = load_deepseek_v3()
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(good) + "\n").encode() * 2)
    convs, skipped = read_chat_jsonl(path, tok, max_len=32)
    assert len(convs) == 2 and not skipped.lines
