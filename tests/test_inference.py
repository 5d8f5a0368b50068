"""The inference engine on tiny random models: cached decoding against the full forward, absorbed
against naive, continuous batching, seeds, MTP speculative decoding (greedy identity, MTP cache
upkeep, the sampling distribution), stop conditions, text streaming and chat helpers."""

import itertools
import json
import math
import random

import pytest
import torch

from nanoseek.data import train_bpe
from nanoseek.inference import Engine, ReasoningParser, SamplingParams, chat_prompt, split_reasoning
from nanoseek.inference import speculative as spec
from nanoseek.inference.sampling import RandomStream, draw, probabilities, uniforms
from nanoseek.inference.text import TextStream
from nanoseek.model import Transformer, preset


# tiny models: one intra-op thread (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


PROMPTS = [[5, 17, 99], [0] + list(range(40, 50)), [0] + list(range(60, 69)), [7], [3, 1000, 2000, 3000, 12]]


def tiny(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny", max_position_embeddings=256, **overrides)).eval()


def agreeable(depth: int, seed: int = 0, **overrides) -> Transformer:
    """A tiny model whose MTP modules often agree with it: a large embedding makes the main model
    nearly a bigram model, and each MTP module's eh_proj mostly passes the next token's embedding
    through (its random hidden-state half stays, so drafts do depend on the carried hidden states).
    Its attention values and output are scaled up so that what the MTP layers read from their caches
    visibly moves the draft logits (at init scale a stale cache row changes them by ~1e-6)."""
    model = tiny(seed, num_nextn_predict_layers=depth, **overrides)
    H = model.args.hidden_size
    with torch.no_grad():
        model.embed_tokens.weight.mul_(3.0)
        for module in model.mtp:
            module.eh_proj.weight[:, :H] = torch.eye(H)
            module.eh_proj.weight[:, H:] *= 0.5
            module.self_attn.kv_b_proj.weight.mul_(5.0)
            module.self_attn.o_proj.weight.mul_(5.0)
    return model


@torch.no_grad()
def reference(model, prompt, n, temperature=0.0):
    """Uncached greedy decoding with the full forward: (tokens, log-softmax rows [n, V])."""
    ids, logps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        logps.append(logits.log_softmax(-1))
        ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(logps)


def run_all(engine, prompts, params):
    """Drive add_request/step until done; returns per prompt the list of its StepEvents."""
    events = {}
    order = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.num_active:
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return [events[r] for r in order]


# --- cached decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("absorbed", [True, False])
def test_cached_decode_matches_full_forward(absorbed):
    """Mixed prompt lengths in one batch (padded prefill groups and a lone one): greedy tokens equal
    the uncached forward's and the logits (as log-softmax, top 8) agree at every step."""
    model = tiny()
    engine = Engine(model, max_batch_size=5, max_seq_len=64, absorbed=absorbed)
    n = 12
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=8) for _ in PROMPTS]
    for prompt, events in zip(PROMPTS, run_all(engine, PROMPTS, params)):
        tokens, logps = reference(model, prompt, n)
        assert [ev.token_id for ev in events] == tokens
        for step, ev in enumerate(events):
            ids = [t for t, _ in ev.top_logprobs]
            got = torch.tensor([lp for _, lp in ev.top_logprobs])
            assert ids == logps[step].topk(8).indices.tolist()
            torch.testing.assert_close(got, logps[step][ids], atol=2e-5, rtol=1e-5)
            assert ev.logprob == pytest.approx(float(logps[step][tokens[step]]), abs=2e-5)
        assert events[-1].finish_reason == "length" and not any(ev.finished for ev in events[:-1])


def test_absorbed_equals_naive_decode():
    model = tiny(1)
    outs = {}
    for absorbed in (True, False):
        engine = Engine(model, max_batch_size=4, max_seq_len=64, absorbed=absorbed)
        params = [SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=4) for _ in PROMPTS[:4]]
        outs[absorbed] = run_all(engine, PROMPTS[:4], params)
    for a, b in zip(outs[True], outs[False]):
        assert [e.token_id for e in a] == [e.token_id for e in b]
        for ea, eb in zip(a, b):
            assert ea.logprob == pytest.approx(eb.logprob, abs=1e-5)


def test_continuous_batching_join_finish_cancel():
    """Requests of different lengths finish at different steps (rows are compacted), new ones join
    between steps, a cancelled one frees its slot at once: every survivor still equals its
    single-sequence reference."""
    model = tiny(2)
    engine = Engine(model, max_batch_size=3, max_seq_len=64)
    lengths = {0: 3, 1: 9, 2: 6, 3: 5, 4: 7}
    rid = {}
    for i in (0, 1, 2):
        rid[engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=lengths[i], ignore_eos=True))] = i
    assert engine.free_slots == 0 and engine.num_active == 3
    with pytest.raises(ValueError, match="no free slot"):
        engine.add_request([1, 2], SamplingParams(max_new_tokens=4))
    got: dict[int, list[int]] = {}
    finished = []
    steps = 0
    while engine.num_active:
        for ev in engine.step():
            got.setdefault(rid[ev.request_id], []).append(ev.token_id)
            if ev.finished:
                finished.append(rid[ev.request_id])
        steps += 1
        if steps == 2:  # cancel the middle row while it runs
            cancelled = next(r for r, i in rid.items() if i == 1)
            assert engine.cancel(cancelled) and not engine.cancel(cancelled)
            assert engine.free_slots == 1
            rid[engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=lengths[3], ignore_eos=True))] = 3
        if steps == 4:
            rid[engine.add_request(PROMPTS[4], SamplingParams(max_new_tokens=lengths[4], ignore_eos=True))] = 4
    assert 1 not in finished and sorted(finished) == [0, 2, 3, 4]
    for i in (0, 2, 3, 4):
        assert got[i] == reference(model, PROMPTS[i], lengths[i])[0], i
    assert engine.free_slots == 3 and engine.num_active == 0


def test_generate_more_prompts_than_slots_and_stream():
    model = tiny(3)
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    outs = engine.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)
    assert outs == [reference(model, p, 6)[0] for p in PROMPTS]
    stats = engine.stats
    assert stats["new_tokens"] == 30 and stats["tokens_per_s"] > 0
    events = list(engine.stream(PROMPTS[0], max_new_tokens=6, ignore_eos=True))
    assert [e.token_id for e in events] == outs[0]
    stream = engine.stream(PROMPTS[1], max_new_tokens=6, ignore_eos=True)
    next(stream)
    stream.close()  # stopping early cancels the request
    assert engine.num_active == 0


def test_cache_holds_only_the_latent_and_rope_key():
    model = tiny()
    args = model.args
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    want = args.num_hidden_layers * (args.kv_lora_rank + args.qk_rope_head_dim) * 4
    assert engine.cache_bytes_per_token == want == engine.stats["cache_bytes_per_token"]
    rows = engine.cache.max_batch * engine.cache.max_len
    assert engine.cache.nbytes == want * rows
    assert [tuple(kv.shape) for kv in engine.cache.layers] == \
        [(2, engine.cache.max_len, args.kv_lora_rank + args.qk_rope_head_dim)] * args.num_hidden_layers


# --- sampling --------------------------------------------------------------------------------
def test_truncations():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    p = lambda **kw: probabilities(logits, [SamplingParams(temperature=1.0, **kw)])[0]
    torch.testing.assert_close(p(), logits.softmax(-1)[0])
    torch.testing.assert_close(p(top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    torch.testing.assert_close(p(top_p=0.7), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))  # 0.5 < 0.7 <= 0.7
    torch.testing.assert_close(p(top_p=0.71), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    torch.testing.assert_close(p(min_p=0.35), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    torch.testing.assert_close(p(top_k=3, top_p=0.8), torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    hot = probabilities(logits, [SamplingParams(temperature=2.0)])[0]
    torch.testing.assert_close(hot, (logits / 2).softmax(-1)[0])


def test_draw_matches_probabilities():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    ids = draw(probs, torch.rand(20000, generator=g, dtype=torch.float64))
    freq = torch.bincount(ids, minlength=4) / 20000
    assert freq[1] == 0
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


def test_random_stream_is_its_generators_draws_one_by_one():
    """Bug: drawing a request's numbers a block at a time would change (or repeat) what a seed gives."""
    stream, g = RandomStream(11), torch.Generator().manual_seed(11)
    n = 2 * RandomStream.BLOCK + 5  # across block boundaries, through both ways of taking a number
    got = [stream.next() if i % 3 else float(stream.tensor("cpu")[0]) for i in range(n)]
    assert got == [float(torch.rand(1, generator=g, dtype=torch.float64)) for _ in range(n)]
    assert uniforms([RandomStream(3), RandomStream(4)], "cpu").tolist() == \
        [float(torch.rand(1, generator=torch.Generator().manual_seed(s), dtype=torch.float64)) for s in (3, 4)]


def test_seeds_reproduce_and_ignore_batch_neighbours():
    model = tiny(4)
    engine = Engine(model, max_batch_size=4, max_seq_len=64)
    sp = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], seed=7, **sp)[0]
    again = engine.generate([PROMPTS[0]], seed=7, **sp)[0]
    # the same request (seed 7) as the third of a batch: seed + index = 7
    crowd = engine.generate([PROMPTS[1], PROMPTS[2], PROMPTS[0], PROMPTS[3]], seed=5, **sp)[2]
    other = engine.generate([PROMPTS[0]], seed=8, **sp)[0]
    assert alone == again == crowd
    assert alone != other
    # seed=None follows torch's global RNG (with speculation fixed on or off: "auto" may switch
    # modes by timing for an unseeded request, which keeps its distribution but not its draws)
    torch.manual_seed(123)
    a = engine.generate([PROMPTS[0]], speculative=None, **sp)[0]
    torch.manual_seed(123)
    assert engine.generate([PROMPTS[0]], speculative=None, **sp)[0] == a


# --- MTP speculative decoding ----------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
def test_speculative_greedy_is_plain_greedy(depth):
    model = agreeable(depth)
    engine = Engine(model, max_batch_size=3, max_seq_len=96)
    lengths = [30, 12, 25, 40, 18]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=2) for n in lengths]
    plain = run_all(engine, PROMPTS[:3], params[:3])
    engine.set_speculative("mtp")
    fast = run_all(engine, PROMPTS[:3], params[:3])
    assert [[e.token_id for e in evs] for evs in fast] == [[e.token_id for e in evs] for evs in plain]
    for a, b in zip(fast, plain):  # logprobs of verified tokens equal plain decoding's
        assert [e.logprob for e in a] == pytest.approx([e.logprob for e in b], abs=1e-4)
        assert [[t for t, _ in e.top_logprobs] for e in a] == [[t for t, _ in e.top_logprobs] for e in b]
    stats = engine.stats
    assert 0.2 < stats["acceptance_rate"] < 1 and stats["tokens_per_row_step"] > 1.1
    # generate with more prompts than slots: requests join and leave mid-run
    outs = engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True, speculative="mtp")
    assert outs == engine.generate(PROMPTS, max_new_tokens=20, ignore_eos=True)


def check_drafts(monkeypatch, model) -> list[int]:
    """Make every draft be checked against the uncached MTP forward over the committed tokens (plus
    the earlier drafts): the draft logits to 1e-4 (so a stale MTP cache row shows even where the
    argmax survives it) and greedy drafts equal to its argmax. Returns the list that records the
    depth of each draft checked."""
    checked = []
    real_draft = spec.draft

    def checking_draft(mtp_step, prev, tokens, positions, newest, mtp_cache, reqs, **kw):
        seen = {}

        def step(k, *args, **kwargs):
            logits, h = mtp_step(k, *args, **kwargs)
            seen[k] = logits[:, -1].float()
            return logits, h

        drafts, qs = real_draft(step, prev, tokens, positions, newest, mtp_cache, reqs, **kw)
        for i, (req, d) in enumerate(zip(reqs, drafts.tolist())):
            seq = req.prompt + req.tokens
            M = len(seq) - 1
            for k in range(1, len(d) + 1):
                want = model.run(torch.tensor([seq + d[: k - 1]]), mtp=True).mtp_logits[k - 1][0, M - 1]
                torch.testing.assert_close(seen[k][i], want, atol=1e-4, rtol=1e-4)
                if req.params.greedy:
                    assert int(want.argmax()) == d[k - 1]
                checked.append(k)
        return drafts, qs

    monkeypatch.setattr(spec, "draft", checking_draft)
    return checked


def test_speculative_drafts_equal_uncached_mtp(monkeypatch):
    """The MTP caches are kept right across accepted and rejected drafts: every draft equals the
    argmax of the uncached MTP forward over the committed tokens (plus the earlier drafts)."""
    model = agreeable(2)
    engine = Engine(model, max_batch_size=2, max_seq_len=96, speculative="mtp")
    checked = check_drafts(monkeypatch, model)
    params = [SamplingParams(max_new_tokens=25, ignore_eos=True) for _ in range(2)]
    run_all(engine, [PROMPTS[1], PROMPTS[4]], params)
    assert engine.stats["accepted"] > 5 and len(checked) > 40


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_chunked_prefill_matches_full_forward(speculative, monkeypatch):
    """Prompts longer than prefill_chunk are prefilled in several chunks (each attending over the
    latents cached before it): greedy tokens and logprobs equal the uncached forward's, for long
    prompts (chunked alone, one ending exactly on a chunk boundary) next to short ones prefilled as
    a padded group. In speculative mode the MTP caches are filled chunk by chunk too: every draft
    must equal the uncached MTP forward's."""
    model = agreeable(2)
    checked = check_drafts(monkeypatch, model) if speculative else []
    engine = Engine(model, max_batch_size=4, max_seq_len=64, prefill_chunk=8, speculative=speculative)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (27, 16, 4, 3)]
    n = 10
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=4) for _ in prompts]
    for prompt, events in zip(prompts, run_all(engine, prompts, params)):
        tokens, logps = reference(model, prompt, n)
        assert [ev.token_id for ev in events] == tokens
        for step, ev in enumerate(events):
            assert ev.logprob == pytest.approx(float(logps[step][tokens[step]]), abs=2e-5)
            assert [t for t, _ in ev.top_logprobs] == logps[step].topk(4).indices.tolist()
    if speculative:
        assert engine.stats["accepted"] > 3 and len(checked) > 20


@pytest.mark.parametrize("layout", [
    dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32,
                       "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.7}),
    dict(rope_interleave=False),
], ids=["yarn", "rope_halves"])
def test_cached_engine_with_yarn_and_half_split_rope(layout):
    """The cached engine (chunked naive prefill, absorbed decode) against the uncached forward with
    YaRN active well past the original context of 16 (and mscale != mscale_all_dim, so the
    cos/sin scale is not 1), and with the half-split RoPE layout. The uncached forward of both
    is checked against transformers in test_model_parity.py."""
    model = tiny(7, **layout)
    engine = Engine(model, max_batch_size=2, max_seq_len=64, prefill_chunk=16)
    prompts = [list(range(100, 130)), [5, 17, 99]]
    n = 20
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True, logprobs=4) for _ in prompts]
    for prompt, events in zip(prompts, run_all(engine, prompts, params)):
        tokens, logps = reference(model, prompt, n)
        assert [ev.token_id for ev in events] == tokens
        for step, ev in enumerate(events):
            assert ev.logprob == pytest.approx(float(logps[step][tokens[step]]), abs=2e-5)


def _chi2_critical(dof: int, z: float = 3.09) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z = 3.09: p = 0.001)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@torch.no_grad()
def exact_last_two(model, prompt, sp, n, V) -> torch.Tensor:
    """The exact law of plain sampling's last two of n new tokens: [V, V], from every prefix."""
    prefixes = torch.tensor(list(itertools.product(range(V), repeat=n - 1)))  # t_1 .. t_{n-1}
    seqs = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    logits = model(seqs)[:, len(prompt) - 1 :]  # [N, n, V]: the law of t_{j+1} given t_1..t_j
    p = probabilities(logits.reshape(-1, V), [sp] * logits.shape[0] * n).view(-1, n, V)
    weight = torch.ones(len(prefixes))  # P(t_1 .. t_{n-1})
    for j in range(n - 1):
        weight = weight * p[:, j].gather(1, prefixes[:, j : j + 1]).squeeze(1)
    return torch.zeros(V, V).index_add_(0, prefixes[:, -1], weight[:, None] * p[:, -1])


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_speculative_sampling_keeps_the_distribution(depth, monkeypatch):
    """On an 8-token vocabulary, the joint law of the last two of depth + 2 sampled tokens equals
    plain sampling's, computed exactly from the model; a chi-square test at p = 0.001 with fixed
    seeds. The first speculative step makes tokens 2 .. depth + 2, so the pair is produced by draft
    acceptance, rejection + residual, and the bonus token drawn when every draft is kept (or by the
    next step): all three paths, each seen running."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=8, initializer_range=0.1, num_nextn_predict_layers=depth,
                               max_position_embeddings=32)).eval()
    sp = SamplingParams(temperature=0.9, top_k=6, max_new_tokens=depth + 2, ignore_eos=True)
    prompt = [3, 1, 4]
    V = 8
    exact = exact_last_two(model, prompt, sp, depth + 2, V).flatten()
    kept_lengths = []
    real_accept = spec.accept

    def counting_accept(logits, drafts, qs, reqs):
        out = real_accept(logits, drafts, qs, reqs)
        kept_lengths.extend(len(new) for new in out)
        return out

    monkeypatch.setattr(spec, "accept", counting_accept)
    engine = Engine(model, max_batch_size=64, max_seq_len=16, speculative="mtp")
    N = 2500
    outs = []
    for start in range(0, N, 64):
        n = min(64, N - start)
        params = [SamplingParams(**{**sp.__dict__, "seed": start + i}) for i in range(n)]
        outs += [[e.token_id for e in evs] for evs in run_all(engine, [prompt] * n, params)]
    assert 0.2 < engine.stats["acceptance_rate"] < 0.95  # both the accept and the reject paths ran
    bonus = sum(k == depth + 1 for k in kept_lengths)  # every draft kept, then the bonus token
    assert bonus > 0.1 * N, bonus
    pairs = torch.tensor([o[-2] * V + o[-1] for o in outs])
    counts = torch.bincount(pairs, minlength=V * V).double()
    expected = exact.double() * N
    assert counts[expected == 0].sum() == 0  # nothing outside the truncated support
    big = expected >= 5
    cells = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    chi2 = float(((cells - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    assert chi2 < _chi2_critical(len(cells) - 1), chi2


# --- stopping and text ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"the quick brown fox {i} jumps over the lazy dog; héllo wörld 你好 <think>" for i in range(200)]
    return train_bpe(texts, vocab_size=400)


def accepted_windows(monkeypatch, engine, prompt, n) -> tuple[list[int], set[int]]:
    """Greedy speculative decoding of one prompt, ignoring EOS: (tokens, indices of the tokens that
    were followed by another token of the same verify step), the places where a stop must cut an
    accepted window short."""
    windows = []
    real_accept = spec.accept

    def recording_accept(*args):
        out = real_accept(*args)
        windows.extend(out)
        return out

    monkeypatch.setattr(spec, "accept", recording_accept)
    tokens = engine.generate([prompt], max_new_tokens=n, ignore_eos=True, speculative="mtp")[0]
    monkeypatch.undo()
    inner, index = set(), 1  # token 0 comes from the prefill
    for w in windows:
        inner |= {index + j for j in range(len(w) - 1)}
        index += len(w)
    return tokens, {i for i in inner if i < len(tokens) - 1}


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_eos_max_new_tokens_and_stop_ids(speculative, monkeypatch):
    """EOS, a stop id and the length limit, each falling inside an accepted speculative window: the
    stop token is the last one returned, whether decoding is plain or speculative."""
    model = agreeable(2, seed=5)
    base, inner = accepted_windows(monkeypatch, Engine(model, max_batch_size=2, max_seq_len=64), PROMPTS[0], 30)
    assert base == reference(model, PROMPTS[0], 30)[0]
    at = next(i for i in sorted(inner) if base.index(base[i]) == i)  # a first occurrence mid-window
    stop = base[at]
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    assert engine.generate([PROMPTS[0]], max_new_tokens=30, ignore_eos=True, speculative=speculative)[0] == base
    out = engine.generate([PROMPTS[0]], max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop],
                          speculative=speculative)[0]
    assert out == base[: at + 1]
    events = list(engine.stream(PROMPTS[0], max_new_tokens=at + 1, ignore_eos=True, speculative=speculative))
    assert [e.token_id for e in events] == base[: at + 1] and events[-1].finish_reason == "length"
    assert not any(e.finished for e in events[:-1])
    model.args = model.args.replace(eos_token_id=stop)
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    events = list(engine.stream(PROMPTS[0], max_new_tokens=30, speculative=speculative))
    assert [e.token_id for e in events] == base[: at + 1]  # the EOS is the last token returned
    assert events[-1].finish_reason == "stop" and not any(e.finished for e in events[:-1])
    assert engine.generate([PROMPTS[0]], max_new_tokens=30, ignore_eos=True, speculative=speculative)[0] == base


def test_text_stream_holds_back_and_cuts_stop_strings(tokenizer):
    ids = tokenizer.encode("héllo wörld, the quick brown fox")
    # every token one at a time: the released text never runs ahead into a stop string
    s = TextStream(tokenizer, stop=["brown fox", "zzz"])
    pieces, stopped = [], False
    for t in ids:
        delta, stopped = s.push(t)
        pieces.append(delta)
        assert "brown fox" not in s.text
        if stopped:
            break
    assert stopped and "".join(pieces) == "héllo wörld, the quick "
    # a stop prefix that never completes is released at the end
    s = TextStream(tokenizer, stop=["quick brown cat"])
    text = "".join(s.push(t)[0] for t in ids[:-1])
    assert text == "héllo wörld, the " and s.flush() == "quick brown"
    s = TextStream(tokenizer, stop=["quick brown cat"])
    assert "".join(s.push(t)[0] for t in ids) == "héllo wörld, the quick brown fox"  # " fox" ends the match
    # multi-byte characters split across tokens come out whole
    s = TextStream(tokenizer)
    out = [s.push(t)[0] for t in tokenizer.encode("你好 wörld")]
    assert "".join(out) == "你好 wörld" and all("\ufffd" not in o for o in out)


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_engine_stop_strings_and_text_deltas(tokenizer, speculative, monkeypatch):
    """A stop string spanning several tokens, starting inside one of them and completed by a token
    that speculative decoding accepts mid-window: generation ends at that token, in both modes, and
    the text stops right before the stop string."""
    model = agreeable(2, seed=6, vocab_size=tokenizer.vocab_size)
    engine = Engine(model, max_batch_size=2, max_seq_len=64, tokenizer=tokenizer)
    prompt = tokenizer.encode("the quick", add_bos=True)
    ids, inner = accepted_windows(monkeypatch, engine, prompt, 30)
    full = list(engine.stream(prompt, max_new_tokens=30, ignore_eos=True, speculative=speculative))
    assert [e.token_id for e in full] == ids
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(e.text for e in full) == text

    def completes_at(stop):  # index of the token whose text completes the first occurrence of stop
        return next(n for n in range(len(ids) + 1) if stop in tokenizer.decode(ids[:n], skip_special_tokens=True)) - 1

    candidates = []
    for k in range(3, 28):
        prefix = tokenizer.decode(ids[: k - 2], skip_special_tokens=True)
        stop = text[len(prefix) - 2 : len(prefix) + 4]
        if len(prefix) > 6 and len(stop) == 6 and completes_at(stop) in inner:
            candidates.append(stop)
    stop = candidates[0]
    cut = text.index(stop)
    events = list(engine.stream(prompt, max_new_tokens=30, ignore_eos=True, stop=["\x00never", stop],
                                speculative=speculative))
    assert events[-1].finish_reason == "stop" and not any(e.finished for e in events[:-1])
    assert "".join(e.text for e in events) == text[:cut]
    n = len(events)  # generation ends at the token that completes the stop string
    assert n == completes_at(stop) + 1 and [e.token_id for e in events] == ids[:n]
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, max_batch_size=1, max_seq_len=32).add_request(prompt, SamplingParams(stop=["x"], max_new_tokens=4))


def test_request_errors():
    engine = Engine(tiny(), max_batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        engine.add_request(list(range(10)), SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request([10**6], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request([1], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Engine(tiny(), max_seq_len=10**6)
    with pytest.raises(ValueError, match="MTP"):
        Engine(tiny(num_nextn_predict_layers=0), max_seq_len=16, speculative="mtp")


# --- chat -------------------------------------------------------------------------------------
def test_chat_prompt_and_reasoning_split(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "<think>hmm</think>hello"}, {"role": "user", "content": "again"}]
    text = tokenizer.decode(chat_prompt(tokenizer, messages))
    assert text == ("<｜begin▁of▁sentence｜>be brief<｜User｜>hi<｜Assistant｜>hello<｜end▁of▁sentence｜>"
                    "<｜User｜>again<｜Assistant｜>")
    assert tokenizer.decode(chat_prompt(tokenizer, messages, think=True)).endswith("<｜Assistant｜><think>\n")
    assert split_reasoning("<think>\nlet me see\n</think>\n\n42") == ("let me see", "42")
    assert split_reasoning("let me see</think>42", in_reasoning=True) == ("let me see", "42")
    assert split_reasoning("let me see</think>42") == ("", "let me see</think>42")  # never opened: all answer
    assert split_reasoning("<think>still going") == ("still going", "")
    assert split_reasoning("still going", in_reasoning=True) == ("still going", "")
    assert split_reasoning("just an answer") == ("", "just an answer")



def test_compiled_decode_matches_eager():
    """The torch.compile'd decode step (static cache length, gathered experts) gives the eager tokens."""
    model = tiny(num_hidden_layers=2, num_nextn_predict_layers=0)
    prompts = [PROMPTS[0], PROMPTS[1]]
    eager = Engine(model, max_batch_size=2, max_seq_len=40)
    compiled = Engine(model, max_batch_size=2, max_seq_len=40, compile=True)
    compiled.steps.packages = {}  # torch.compile at batch 1 too (AOTInductor packages: test_engine_speed.py)
    want = eager.generate(prompts, max_new_tokens=8, ignore_eos=True)
    compiled.warmup()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled.generate(prompts, max_new_tokens=8, ignore_eos=True) == want
    assert compiled.generate(prompts[:1], max_new_tokens=8, ignore_eos=True) == want[:1]
    # warmup compiled the batch-1 and batch-2 graphs: no compiling during real requests
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs > 0


def test_compiled_speculative_decoding_matches_eager(monkeypatch):
    """Speculative decoding through torch.compile: greedy steps run draft + verify as one compiled
    graph ("speculative step"), sampled ones the compiled MTP draft step and verify forward. Both give
    the plain greedy tokens and logprobs (sampling at temperature 1e-6 is greedy in effect), and
    every draft equals the uncached MTP forward's (so a cache write lost inside a compiled graph
    shows, in the main cache or the MTP one). Batch 1 only: every graph compiled costs seconds."""
    model = agreeable(1, num_hidden_layers=1)  # one dense layer + the MTP layer: small graphs
    eager = Engine(model, max_batch_size=1, max_seq_len=40, compile=False)
    plain = list(eager.stream(PROMPTS[1], max_new_tokens=12, ignore_eos=True, logprobs=2, speculative=None))
    compiled = Engine(model, max_batch_size=1, max_seq_len=40, compile=True, speculative="mtp")
    compiled.steps.packages = {}  # torch.compile at batch 1 too (AOTInductor packages: test_engine_speed.py)
    calls = dict.fromkeys(compiled.steps.compiled, 0)  # "decode step" (verify), "MTP draft step", "speculative step"
    fused_checked = []
    for name, fn in list(compiled.steps.compiled.items()):
        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            out = _fn(*args, **kwargs)
            if _name == "speculative step":  # the fused graph's drafts, checked like check_drafts does
                for req, d in zip(compiled.running, out[0].tolist()):
                    seq = req.prompt + req.tokens
                    want = model.run(torch.tensor([seq]), mtp=True).mtp_logits[0][0, len(seq) - 2]
                    assert int(want.argmax()) == d[0]
                    fused_checked.append(1)
            return out

        compiled.steps.compiled[name] = counted
    checked = check_drafts(monkeypatch, model)
    for temperature in (0.0, 1e-6):
        events = list(compiled.stream(PROMPTS[1], max_new_tokens=12, ignore_eos=True, logprobs=2,
                                      temperature=temperature, seed=0, speculative="mtp"))
        assert [e.token_id for e in events] == [e.token_id for e in plain]
        assert [e.logprob for e in events] == pytest.approx([e.logprob for e in plain], abs=1e-4)
        assert compiled.stats["compiled"] and compiled.stats["accepted"] > 0
    assert len(calls) == 3 and all(calls.values())
    assert len(fused_checked) == calls["speculative step"] > 2
    assert len(checked) == calls["MTP draft step"] > 2


def test_bench_decode_smoke(tmp_path, capsys):
    """`nanoseek bench decode` end to end on a 2-layer model (figures are not checked, only produced)."""
    pytest.importorskip("transformers")
    from nanoseek.bench import decode

    out = tmp_path / "rows.jsonl"
    assert decode.main(["--set", "num_hidden_layers=2", "--batch-sizes", "1,2", "--prompt-lens", "16",
                        "--new-tokens", "4", "--repeats", "1", "--no-compile", "--mtp-prompt-len", "16",
                        "--e2e-new-tokens", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "acceptance" in text and "end to end" in text
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    e2e = [r for r in rows if r.get("table") == "e2e"]
    assert {(r["shape"], r["batch"]) for r in e2e} == {("tiny", 1), ("tiny", 2), ("wide", 1), ("wide", 2)}
    assert all(r["default_s"] > 0 and r["transformers_s"] > 0 for r in e2e)
    cells = [r for r in rows if "batch" in r and "table" not in r]
    assert len(cells) == 2 and all(r["nanoseek_cache_bytes"] == r["formula_cache_bytes"] for r in cells)
    assert all(r["transformers_tok_s"] > 0 for r in cells)
    assert [r["identical"] for r in rows if "checkpoint" in r] == [True]


# ---------------------------------------------------------------------------------------------
# The R1 reasoning parser (the server's --reasoning-parser deepseek-r1)


@pytest.mark.parametrize("text, reasoning, content", [
    ("<think>\nI think.\n</think>\n\nThe answer.", "I think.", "The answer."),
    ("  <think>a</think>b", "a", "b"),
    ("Hello <think>x</think>", "", "Hello <think>x</think>"),  # no leading tag: all content
    (" Hello", "", " Hello"),
    ("<think>unfinished  ", "unfinished", ""),
    ("<thi", "", "<thi"),
    ("<think>a </th e</think>ok", "a </th e", "ok"),
    ("", "", ""),
])
def test_reasoning_parser_any_split(text, reasoning, content):
    assert split_reasoning(text) == (reasoning, content)
    rng = random.Random(0)
    for _ in range(100):  # the same answer however the text is cut into deltas
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        parser, got_r, got_c = ReasoningParser(), "", ""
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            r, c = parser.feed(text[a:b])
            got_r, got_c = got_r + r, got_c + c
        r, c = parser.finish()
        assert (got_r + r, got_c + c) == (reasoning, content)


def test_reasoning_parser_prompt_opened_think():
    assert split_reasoning("so 6*7=42\n</think>\n\n42", in_reasoning=True) == ("so 6*7=42", "42")
    assert split_reasoning("no end tag", in_reasoning=True) == ("no end tag", "")
