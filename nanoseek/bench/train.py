"""Training-step throughput: nanoseek against transformers, same config, same weights, one run.

    nanoseek bench train                                  # tiny preset, batch 8 x 256, fp32 CPU
    nanoseek bench train --batch-size 4 --seq-len 512 --set num_hidden_layers=6 --out bench.jsonl

One step = forward + cross-entropy + backward + AdamW (β 0.9/0.95, wd 0.1). nanoseek's model is
built, saved in the HF layout and loaded by transformers' `DeepseekV3ForCausalLM` with its
fastest MoE path (`experts_implementation="grouped_mm"`) and SDPA attention; the two agree on the
logits before anything is timed. The main model only on both sides (transformers drops the MTP
module on load), plus a third row: nanoseek's full `nanoseek train` step (MTP, λ = 0.3, balance
loss) for reference. Timing rounds alternate between the models, so a busy machine slows both
alike; each model's figure is the median step time.

MFU = tokens/s × model FLOPs per token / peak, the peak being the best fp32 1024³ matmul measured
in the same process (see nanoseek/train/metrics.py for the FLOP count).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.model import PRESETS, Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.train.loss import training_loss
from nanoseek.train.metrics import flops_per_token, measure_peak_flops


def adamw(model):
    # as `nanoseek train` runs it (fused), for both models
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def step_fn(forward, model, ids):
    """A training step closure: forward -> loss -> backward -> AdamW -> zero_grad."""
    opt = adamw(model)

    def step():
        loss = forward(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--out", type=Path, help="append the results as one JSON line here")
    a = p.parse_args(argv)
    import transformers  # the peer; a test-only dependency

    transformers.logging.set_verbosity_error()  # its load report lists the MTP tensors it drops

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    args = preset(a.preset, **parse_overrides(a.overrides)).replace(torch_dtype="float32")
    ours = Transformer(args).train()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="sdpa", experts_implementation="grouped_mm").train()
    impl = theirs.config._experts_implementation
    ids = torch.randint(0, args.vocab_size, (a.batch_size, a.seq_len + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    with torch.no_grad():
        diff = (ours(inputs) - theirs(inputs).logits).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"nanoseek bench train: the two models disagree (max |Δlogit| {diff:.2e}); not timing")

    ours_full = Transformer(args).train()  # a separate copy, so the rows' optimizers don't interact
    ours_full.load_state_dict(ours.state_dict())
    # Each library's own loss: nanoseek's fused head + cross-entropy (nanoseek/train/loss.py);
    # transformers' `labels=` loss, given the already shifted targets (`shift_labels`).
    runs = {
        "nanoseek": step_fn(lambda x: training_loss(ours, x, targets, 0.0).total, ours, inputs),
        "transformers": step_fn(lambda x: theirs(x, labels=targets, shift_labels=targets).loss, theirs, inputs),
        "nanoseek +MTP +balance": step_fn(lambda x: training_loss(ours_full, x, targets, 0.3, 1e-4).total,
                                         ours_full, inputs),
    }
    for step in runs.values():  # warm-up: allocator, lazy init, AdamW state
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, step in runs.items():
            for _ in range(a.steps):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    peak = measure_peak_flops(torch.device("cpu"), torch.float32)
    tokens = a.batch_size * a.seq_len
    flops = {"nanoseek": flops_per_token(ours, a.seq_len, mtp=False),
             "transformers": flops_per_token(ours, a.seq_len, mtp=False),
             "nanoseek +MTP +balance": flops_per_token(ours_full, a.seq_len, mtp=True)}
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"step_ms": med * 1e3, "tok_per_s": tokens / med, "mfu": tokens / med * flops[name] / peak,
                      "flops_per_token": flops[name]}
    ratio = rows["nanoseek"]["tok_per_s"] / rows["transformers"]["tok_per_s"]

    print(f"training step, {a.preset} preset ({ours.num_params() / 1e6:.2f}M params, "
          f"{ours.num_params(active=True) / 1e6:.2f}M active), batch {a.batch_size} x {a.seq_len}, fp32, "
          f"{torch.get_num_threads()} threads; transformers {transformers.__version__} experts={impl}, sdpa; "
          f"max |Δlogit| {diff:.1e}; measured peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'':<24}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}")
    for name, r in rows.items():
        print(f"{name:<24}{r['step_ms']:>10.1f}{r['tok_per_s']:>12,.0f}{r['mfu']:>8.1%}")
    print(f"nanoseek / transformers: {ratio:.2f}x")
    if a.out:
        record = {"bench": "train", "preset": a.preset, "overrides": a.overrides, "batch_size": a.batch_size,
                  "seq_len": a.seq_len, "threads": torch.get_num_threads(), "peak_flops": peak, "rows": rows,
                  "ratio": ratio, "transformers": transformers.__version__, "experts_implementation": impl}
        with open(a.out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
