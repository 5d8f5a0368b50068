"""The engine's defaults: compiled decoding chosen by itself (and its on-disk cache shared by
processes), eager fallback when compiling cannot work, and speculative="auto" that keeps MTP
speculation only while it is faster. Eager stays the reference: every mode must give its tokens.

Compiling is the expensive part on 2 cores, so the compile tests share one shape (1 layer, 1 MTP
module, batch 1: a plain and a speculative graph) and the test run's inductor cache directory
(tests/conftest.py): whichever compiles it first compiles it cold, everything after loads it."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanoseek.inference import Engine
from nanoseek.inference.aot import Flat, Package
from nanoseek.inference.compiled import CompiledSteps, CompileRecord
from nanoseek.model import Transformer, preset

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [3, 17, 99, 5, 8]

# One process: compile (or load) the shared shape's decode step and report what inductor did.
SCRIPT = """
import json, torch
from torch._dynamo.utils import counters
from nanoseek.inference import Engine
from nanoseek.model import Transformer, preset
torch.set_num_threads(1)
torch.manual_seed(0)
model = Transformer(preset("tiny", **json.loads({shape!r})))
engine = Engine(model, max_batch_size=1, max_seq_len=24)
at_init = engine.stats["compiled"]
engine.warmup()
out = engine.generate([{prompt!r}], max_new_tokens=6, ignore_eos=True)
print(json.dumps(dict(out=out, compiled=engine.stats["compiled"], at_init=at_init, graphs=counters["stats"]["unique_graphs"],
                      packages={{k: v is not None for k, v in engine.steps.loaded.items()}},
                      **{{k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}})))
"""
SHAPE = dict(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=1, vocab_size=256,
             max_position_embeddings=96)


def compiled_shape() -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny", **SHAPE)).eval()


def run_process() -> dict:
    env = dict(os.environ)  # TORCHINDUCTOR_CACHE_DIR: the test run's (tests/conftest.py)
    env.pop("NANOSEEK_COMPILE", None)  # the default, as a user gets it
    code = SCRIPT.format(shape=json.dumps(SHAPE), prompt=PROMPT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disk_cache_is_reused_by_a_second_process():
    """A second process loads the batch-1 AOTInductor packages the first one built (so its default
    engine compiles from the first step): no FX-graph or AOTAutograd cache miss, so neither Dynamo,
    inductor nor the C++ compiler runs again. (Batch > 1 graphs are torch.compile's, whose own
    disk cache the other tests share.)"""
    first = run_process()  # compiles (cold unless an earlier test compiled this shape)
    assert first["compiled"]
    assert first["packages"] == {"decode step": True, "speculative step": True}
    second = run_process()
    assert second["compiled"] and second["out"] == first["out"]
    assert second["at_init"] and second["packages"] == first["packages"]
    assert second["graphs"] == 0  # nothing traced by Dynamo
    assert second.get("inductor", {}).get("fxgraph_cache_miss", 0) == 0  # nothing compiled
    assert second.get("aot_autograd", {}).get("autograd_cache_miss", 0) == 0


def test_default_engine_compiles_and_gives_the_eager_tokens(monkeypatch):
    """Engine(model) with every default compiles (at warm-up, or by itself once compiling is known
    to be cheap: a warm cache) and decodes exactly the eager tokens, plain and speculative."""
    monkeypatch.delenv("NANOSEEK_COMPILE", raising=False)
    model = compiled_shape()
    want = Engine(model, max_batch_size=1, max_seq_len=24, compile=False).generate(
        [PROMPT], max_new_tokens=6, ignore_eos=True)
    engine = Engine(model, max_batch_size=1, max_seq_len=24)
    # automatic: eager until compiling pays, unless the compiled packages are on disk already
    assert engine.stats["compiled"] == engine.steps.warm
    engine.warmup()  # plain and speculative graphs: the engine's mode is "auto"
    assert engine.stats["compiled"]
    assert engine.generate([PROMPT], max_new_tokens=6, ignore_eos=True) == want
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert engine.generate([PROMPT], max_new_tokens=6, ignore_eos=True, speculative="mtp") == want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # warm-up compiled it
    # this shape's compile time is on record (a warm cache); at price 0 the automatic mode
    # compiles after its first eager step
    CompileRecord(model).save(0.0)
    auto = Engine(model, max_batch_size=1, max_seq_len=24)
    assert auto.generate([PROMPT], max_new_tokens=4, ignore_eos=True) == [want[0][:4]]
    assert auto.stats["compiled"]


def test_a_lone_long_prompt_prefills_through_its_compiled_package():
    """A prompt of >= prefill_min tokens prefilled alone runs the ahead-of-time prefill package once
    compiling is on (with the MTP caches for speculation: its own package): the cache rows, MTP state
    and first-token logits it leaves are the eager ones, so are the tokens; shorter prompts stay eager."""
    from nanoseek.inference.prefill import whole_prompt

    model = compiled_shape()
    eager = Engine(model, max_batch_size=1, max_seq_len=96, compile=False)
    engine = Engine(model, max_batch_size=1, max_seq_len=96, compile=True)
    # past the MoE's dense path (82 tokens for this shape)
    prompt = [(7 * i) % 250 + 3 for i in range(engine.decoder.prefill_min + 2)]
    for mode in (None, "mtp"):
        assert engine.generate([prompt], max_new_tokens=4, ignore_eos=True, speculative=mode) == \
            eager.generate([prompt], max_new_tokens=4, ignore_eos=True, speculative=mode)
    assert engine.steps.loaded["prefill"] is not None and engine.steps.loaded["MTP prefill"] is not None
    # the package against the eager function, on fresh caches: hidden states and every cache row written
    ids = torch.tensor([prompt + [0, 0]])
    out = {}
    for name, fn in (("package", engine.decoder.prefill), ("eager", lambda *a: whole_prompt(model, *a))):
        cache = [torch.zeros(1, 90, w.shape[-1]) for w in engine.cache.rows(0, 1)]
        mtp = [torch.zeros(1, 90, w.shape[-1]) for w in engine.decoder.mtp_cache.rows(0, 1)]
        with torch.inference_mode():
            out[name] = (fn(ids, cache, mtp), cache, mtp)
    (h, c, m), (h0, c0, m0) = out["package"], out["eager"]
    assert h.shape == (1, 2, model.args.hidden_size)
    torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
    for a, b in zip(c + m, c0 + m0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert c[0][0, len(prompt) - 1].abs().sum() > 0 and c[0][0, len(prompt):].abs().sum() == 0
    # a short prompt is prefilled eagerly (the package's shortest is prefill_min tokens)
    calls = []
    package = engine.steps.loaded["prefill"]
    engine.steps.loaded["prefill"] = lambda *a: calls.append(len(a)) or package(*a)
    assert engine.generate([PROMPT], max_new_tokens=2, ignore_eos=True, speculative=None) == \
        eager.generate([PROMPT], max_new_tokens=2, ignore_eos=True, speculative=None)
    assert calls == []
    engine.generate([prompt], max_new_tokens=2, ignore_eos=True, speculative=None)
    assert len(calls) == 1


def test_packages_are_keyed_by_the_thread_count():
    """Inductor writes a CPU kernel's parallel loops only when the compiling process has more than
    one thread: a package built at 1 thread must not be the one a 2-thread process loads."""
    model = compiled_shape()
    paths = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        engine = Engine(model, max_batch_size=1, max_seq_len=24, compile=False)
        paths[threads] = {name: p.path for name, (p, _) in engine.decoder._packages().items()}
    torch.set_num_threads(1)
    assert paths[1].keys() == paths[2].keys() and "decode step" in paths[1]
    assert all(paths[1][name] != paths[2][name] for name in paths[1])


def test_compiling_that_cannot_work_falls_back_to_eager(monkeypatch, caplog):
    """No C++ compiler, or an error while compiling: one logged line, eager tokens, never a failure."""
    from torch._inductor import compile_fx, config

    model = compiled_shape()
    want = Engine(model, max_batch_size=1, max_seq_len=24, compile=False).generate(
        [PROMPT], max_new_tokens=4, ignore_eos=True)
    with config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), caplog.at_level(logging.WARNING, logger="nanoseek"):
        engine = Engine(model, max_batch_size=1, max_seq_len=24, compile=True)
        assert engine.generate([PROMPT], max_new_tokens=4, ignore_eos=True) == want
    assert not engine.stats["compiled"]
    assert [r.getMessage() for r in caplog.records if "no C++ compiler" in r.getMessage()]
    caplog.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated compiler crash")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    monkeypatch.setattr(Package, "load", lambda self: None)  # no AOTInductor package either
    monkeypatch.setattr(Package, "build", lambda self, example: None)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="nanoseek"):
        engine = Engine(model, max_batch_size=1, max_seq_len=24, compile=True)
        assert engine.generate([PROMPT], max_new_tokens=4, ignore_eos=True) == want
        assert engine.generate([PROMPT], max_new_tokens=4, ignore_eos=True) == want
    assert not engine.stats["compiled"]
    lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(lines) == 1 and "running it eagerly" in lines[0]
    torch._dynamo.reset()


def test_a_bad_package_costs_one_line_and_never_fails(tmp_path, caplog):
    """A corrupt package file is reported in one line and not used (the engine then builds it anew);
    a package that fails at run time falls back to torch.compile with one line, same output."""
    model = compiled_shape()
    bad = tmp_path / "decode-step.pt2"
    bad.write_bytes(b"not a zip file")
    package = Package(Flat(model, lambda x: x), bad, [{}], "decode step")
    with caplog.at_level(logging.WARNING, logger="nanoseek"):
        assert package.exists and package.load() is None
    assert len(caplog.records) == 1 and str(bad) in caplog.records[0].getMessage()
    caplog.clear()

    class Broken:  # loads, then fails when called
        exists = True

        def load(self):
            return lambda x: (_ for _ in ()).throw(RuntimeError("shape mismatch"))

    steps = CompiledSteps({"double": lambda x: 2 * x}, model, "on", torch.device("cpu"),
                          {"double": (Broken(), lambda x: (x,))})
    x = torch.arange(3.0)
    with caplog.at_level(logging.WARNING, logger="nanoseek"):
        assert torch.equal(steps.call("double", True, x), 2 * x)
        assert torch.equal(steps.call("double", True, x), 2 * x)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "double package" in lines[0] and "shape mismatch" in lines[0]
    torch._dynamo.reset()


# --- speculative="auto" ----------------------------------------------------------------------------
def cpu_pressure() -> float:
    """Share of the last 10 s in which some runnable task waited for a CPU (0 where unknown)."""
    try:
        return float(open("/proc/pressure/cpu").read().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        return 0.0


def predictable(V: int = 48) -> Transformer:
    """An 8-layer model (the MTP layer is then a small share of a step) trained for a few seconds on the trivially predictable sequence t+1 mod V,
    main head and MTP head alike: its MTP module drafts the next-but-one token almost always."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=V, num_hidden_layers=8, max_position_embeddings=320))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        ids = (torch.randint(0, V, (4, 1)) + torch.arange(33)) % V
        out = model.run(ids[:, :-1], mtp=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        loss = loss + F.cross_entropy(out.mtp_logits[0].flatten(0, 1), ids[:, 2:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_auto_speculation_steps_aside_for_a_random_head_and_keeps_a_good_one():
    """The default mode of an MTP checkpoint is "auto"; greedy output is plain greedy output in every
    mode. A random MTP head (acceptance ~0) makes speculation slower, so auto turns it off; a head that
    drafts well (a model trained on t+1 mod V: 2 tokens per step) makes it faster, so auto keeps it."""
    torch.manual_seed(1)
    random_head = Transformer(preset("tiny", num_hidden_layers=2, max_position_embeddings=160)).eval()
    engine = Engine(random_head, max_batch_size=2, max_seq_len=120, compile=False)
    assert engine.speculative == "auto"
    plain = engine.generate([PROMPT], max_new_tokens=60, ignore_eos=True, speculative=None)
    engine.generate([PROMPT], max_new_tokens=8, ignore_eos=True, speculative="mtp")  # first-use costs paid
    assert engine.generate([PROMPT], max_new_tokens=60, ignore_eos=True) == plain
    verdict = engine.stats["speculative_auto"][1]
    assert verdict["speculating"] is False and verdict["tokens_per_step"] < 1.5, verdict
    # once speculation lost at every batch size measured, new requests skip the MTP prefill
    assert not engine.auto.wants_mtp

    good = predictable()
    engine = Engine(good, max_batch_size=2, max_seq_len=310, compile=False)
    prompt = list(range(10, 20))
    # 300 tokens: past the first re-measurement (after 128 steps), in case a busy machine skewed the first
    plain = engine.generate([prompt], max_new_tokens=300, ignore_eos=True, speculative=None)
    assert plain[0][:5] == [20, 21, 22, 23, 24]  # it did learn the sequence
    engine.generate([prompt], max_new_tokens=8, ignore_eos=True, speculative="mtp")  # first-use costs paid
    assert engine.generate([prompt], max_new_tokens=300, ignore_eos=True) == plain
    stats = engine.stats
    verdict = stats["speculative_auto"][1]
    assert verdict["tokens_per_step"] > 1.8, verdict
    if cpu_pressure() < 50:  # the verdict is a timing: on a saturated CPU a speculative step's many
        # small ops were seen to cost 1.2-2.5x a plain step from one minute to the next
        assert verdict["speculating"] is True, verdict
        assert stats["tokens_per_row_step"] > 1.25  # probes and re-measurements are plain steps
    # sampled requests with a seed stay on plain decoding, so a seed reproduces whatever the timings
    a = engine.generate([prompt], max_new_tokens=20, temperature=1.0, seed=3)
    assert engine.stats["tokens_per_row_step"] == 1.0
    assert engine.generate([prompt], max_new_tokens=20, temperature=1.0, seed=3, speculative=None) == a


def test_auto_speculation_catches_up_after_plain_steps(monkeypatch):
    """Switching from plain to speculative decoding mid-request first writes the MTP cache rows the
    plain steps skipped: with forced switches every few steps, every draft still equals the argmax
    of the uncached MTP forward over the committed tokens, and the tokens are plain greedy's."""
    from nanoseek.inference import speculative as spec

    torch.manual_seed(2)
    model = Transformer(preset("tiny", num_hidden_layers=2, num_nextn_predict_layers=2,
                               max_position_embeddings=96)).eval()
    prompts = [list(range(10, 20)), [5, 9, 13]]
    engine = Engine(model, max_batch_size=2, max_seq_len=60, compile=False)
    plain = engine.generate(prompts, max_new_tokens=30, ignore_eos=True, speculative=None)

    class Alternating(spec.AutoSpeculation):
        calls = 0

        def choose(self, n):
            self.calls += 1
            return (self.calls // 4) % 2 == 1  # 4 plain steps, 4 speculative, ...

    checked, real_draft = [], spec.draft

    def checking_draft(mtp_step, prev, tokens, positions, newest, mtp_cache, reqs, **kw):
        drafts, qs = real_draft(mtp_step, prev, tokens, positions, newest, mtp_cache, reqs, **kw)
        for req, d in zip(reqs, drafts.tolist()):
            seq = req.prompt + req.tokens
            for k in (1, 2):
                out = model.run(torch.tensor([seq + d[: k - 1]]), mtp=True)
                assert int(out.mtp_logits[k - 1][0, len(seq) - 2].argmax()) == d[k - 1]
                checked.append(k)
        return drafts, qs

    monkeypatch.setattr(spec, "draft", checking_draft)
    engine.auto = Alternating()
    assert engine.generate(prompts, max_new_tokens=30, ignore_eos=True) == plain
    assert len(checked) > 20 and engine.stats["drafted"] > 0


def test_warmup_covers_the_batch_where_the_moe_turns_grouped(monkeypatch):
    """Warm-up decodes at batch 1, 2 and the first batches past each of the MoE's small-batch paths (past
    gathering the chosen experts, and on CPU past running every expert densely: the grouped GEMM's graph),
    so a server never compiles those graphs mid-traffic."""
    torch.manual_seed(0)
    model = Transformer(preset("tiny", **SHAPE)).eval()  # 8 experts, 2 per token: dense from 5, grouped from 82
    sizes = []
    for max_batch, want in ((128, [1, 2, 5, 82]), (16, [1, 2, 5]), (3, [1, 2, 3]), (1, [1])):
        engine = Engine(model, max_batch_size=max_batch, max_seq_len=24, compile=True, speculative=None)
        monkeypatch.setattr(engine, "generate", lambda prompts, **kw: sizes.append(len(prompts)))
        engine.warmup()
        assert sizes == want * 2, (max_batch, sizes)  # plain and MTP-speculative (the shape has MTP)
        sizes.clear()


def test_batch_steps_compile_only_while_the_cache_rows_in_use_pay_for_a_full_read(monkeypatch):
    """A compiled step reads every cache row: at batch > 1 it runs only while the rows in use are at least
    1/FULL_READ_MAX of the cache (else eager reads just those) or the cache is short (SHORT_CACHE rows at
    most: read whole at little cost); batch 1 and the warm-up always compile."""
    from nanoseek.inference import decode
    from nanoseek.inference.decode import FULL_READ_MAX

    engine = Engine(compiled_shape(), max_batch_size=4, max_seq_len=40, compile=True, speculative=None)
    d = engine.decoder
    rows = d.cache.max_len
    assert rows <= decode.SHORT_CACHE and d._compiled(2, 2, 1)  # a short cache: always
    monkeypatch.setattr(decode, "SHORT_CACHE", 0)  # as if this cache were long
    assert d._compiled(1, 1, 1)  # batch 1: always
    assert not d._compiled(2, 2, rows // FULL_READ_MAX - 1)
    assert d._compiled(2, 2, -(-rows // FULL_READ_MAX))
    d.warming = True
    assert d._compiled(2, 2, 1)
