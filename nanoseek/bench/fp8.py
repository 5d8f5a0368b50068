"""FP8: training numerics against fp32, memory of FP8-resident weights, and (on a GPU) GEMM speed.

    nanoseek bench fp8                                 # 300 steps per run, tiny model, CPU
    nanoseek bench fp8 --steps 100 --out fp8.json
    nanoseek bench fp8 --skip-numerics                 # memory (and the GPU part, when there is one)

1. Numerics. The same `nanoseek train` run (same seed, data order, model and schedule) three times:
   --precision default (fp32), --precision fp8, and fp8 with --adam-moments bf16. Reported: the
   final validation loss, the final training loss (last step: the same batch in every run; and the
   mean of the last 10% of steps) and each one's relative difference from fp32. DeepSeek-V3 reports
   FP8 against BF16 below 0.25% (report §3.3).
2. Memory. Weight bytes of a model loaded fp32, bf16 and FP8-resident (`dtype="fp8"`: the FP8
   layers as E4M3 + fp32 block scales, the rest counted in bf16), measured on a random model of
   --preset, and the same arithmetic for DeepSeek-V3's full config built on the meta device.
3. GPU (CUDA sm_90 only; skipped with a message elsewhere). Blockwise FP8 GEMM (1x128 activation
   tiles x 128x128 weight blocks, cuBLAS through F.scaled_mm) against BF16 torch.mm at 4096^3 and
   at V3's expert shapes (M = 4096 tokens against a [2048, 7168] and a [7168, 2048] weight), with
   the operands already quantised and with the activation's quantisation included; then an FP8
   and a BF16-autocast training step of --gpu-preset. Rounds alternate, best of each is reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nanoseek.model import PRESETS, Transformer, preset
from nanoseek.model.args import parse_overrides
from nanoseek.quant.fp8 import fp8_gemm, fp8_gemm_on_device, quantize_blocks, quantize_tiles
from nanoseek.quant.inference import FP8InferenceExperts, FP8InferenceLinear, model_bytes, to_fp8_inference
from nanoseek.quant.training import to_fp8_training
from nanoseek.train.loss import training_loss
from nanoseek.train.metrics import read_jsonl

RUNS = {"fp32": [], "fp8": ["--precision", "fp8"], "fp8 + bf16 moments": ["--precision", "fp8", "--adam-moments", "bf16"]}
GEMM_SHAPES = [(4096, 4096, 4096), (4096, 2048, 7168), (4096, 7168, 2048)]  # M tokens, N out, K in


# --- 1. numerics -------------------------------------------------------------------------------------
def numerics(a, work: Path) -> dict:
    from nanoseek.stages import prepare, train

    data = work / "data"
    if prepare.main(["--out", str(data), "--max-bytes", str(a.data_bytes), "--vocab-size", "1024", "--seq-len",
                     str(a.seq_len), "--val-fraction", "0.05"]) != 0:
        raise SystemExit("nanoseek bench fp8: preparing the data failed")
    sets = [f"--set={s}" for s in a.overrides]
    rows = {}
    for name, flags in RUNS.items():
        out = work / name.replace(" ", "_").replace("+", "")
        t0 = time.perf_counter()
        argv = ["--data", str(data), "--out", str(out), "--preset", a.preset, *sets, "--steps", str(a.steps),
                "--batch-size", str(a.batch_size), "--batch-start", str(a.batch_size), "--lr", str(a.lr),
                "--eval-every", "0", "--eval-batches", "20", "--samples", "0", "--quiet", "--seed", "0", *flags]
        if train.main(argv) != 0:
            raise SystemExit(f"nanoseek bench fp8: the {name} run failed")
        losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
        tail = losses[-max(1, len(losses) // 10):]
        summary = json.loads((out / "summary.json").read_text())
        rows[name] = {"final_val_loss": summary["final_val_loss"], "final_train_loss": losses[-1],
                      "train_loss_last10pct": sum(tail) / len(tail), "minutes": (time.perf_counter() - t0) / 60}
    ref = rows["fp32"]
    for row in rows.values():
        for key in ("final_val_loss", "final_train_loss", "train_loss_last10pct"):
            row[key + "_rel_diff"] = (row[key] - ref[key]) / ref[key]
    print(f"\n1. numerics: {a.steps} steps of {a.batch_size} x {a.seq_len} tokens, preset {a.preset} "
          f"{' '.join(a.overrides)}, same seed and data order")
    print(f"{'run':<20}{'val loss':>10}{'Δ':>9}{'train (last)':>14}{'Δ':>9}{'train (last 10%)':>18}{'Δ':>9}{'min':>6}")
    for name, r in rows.items():
        print(f"{name:<20}{r['final_val_loss']:>10.4f}{r['final_val_loss_rel_diff']:>+9.3%}"
              f"{r['final_train_loss']:>14.4f}{r['final_train_loss_rel_diff']:>+9.3%}"
              f"{r['train_loss_last10pct']:>18.4f}{r['train_loss_last10pct_rel_diff']:>+9.3%}{r['minutes']:>6.1f}")
    return rows


# --- 2. memory ---------------------------------------------------------------------------------------
def fp8_resident_bytes(model: Transformer) -> int:
    """Bytes of a model with FP8 holders (to_fp8_inference): theirs as held, everything else in bf16."""
    holders = [m for m in model.modules() if isinstance(m, (FP8InferenceLinear, FP8InferenceExperts))]
    held = {id(t) for m in holders for t in list(m.buffers()) + list(m.parameters())}
    rest = sum(t.numel() for t in list(model.parameters()) + list(model.buffers()) if id(t) not in held)
    return sum(model_bytes(m) for m in holders) + 2 * rest


def memory(a, work: Path) -> dict:
    torch.manual_seed(0)
    Transformer(preset(a.preset, **parse_overrides(a.overrides))).save_pretrained(work / "model")
    measured = {name: model_bytes(Transformer.from_pretrained(work / "model", dtype=dtype))
                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    # FP8-resident on CPU keeps the non-FP8 weights fp32; they are counted as bf16, as on a GPU
    measured["fp8_resident"] = fp8_resident_bytes(Transformer.from_pretrained(work / "model", dtype="fp8"))
    with torch.device("meta"):  # DeepSeek-V3's shapes, nothing allocated
        v3 = Transformer(preset("deepseek-v3"))
        numel = sum(t.numel() for t in list(v3.parameters()) + list(v3.buffers()))
        to_fp8_inference(v3, torch.bfloat16)
    rows = {f"{a.preset} {' '.join(a.overrides)} (loaded)": measured,
            "deepseek-v3 (from its shapes)": {"fp32": 4 * numel, "bf16": 2 * numel,
                                              "fp8_resident": fp8_resident_bytes(v3)}}
    print("\n2. weight memory (FP8-resident: the FP8 layers as E4M3 + fp32 128x128 scales, the rest in bf16)")
    print(f"{'model':<36}{'fp32':>12}{'bf16':>12}{'fp8-resident':>14}{'fp8 / bf16':>12}")
    for name, r in rows.items():
        print(f"{name:<36}{_gb(r['fp32']):>12}{_gb(r['bf16']):>12}{_gb(r['fp8_resident']):>14}"
              f"{r['fp8_resident'] / r['bf16']:>12.3f}")
    return rows


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# --- 3. GPU ------------------------------------------------------------------------------------------
def gpu(a) -> dict:
    if not torch.cuda.is_available():
        print("\n3. GPU: skipped (no CUDA device here); nothing measured")
        return {"skipped": "no CUDA device"}
    dev = torch.device("cuda")
    if not fp8_gemm_on_device(dev):
        print(f"\n3. GPU: skipped ({torch.cuda.get_device_name(dev)} is not sm_90; PyTorch's blockwise FP8 "
              "recipes run on Hopper)")
        return {"skipped": "not sm_90"}
    out = {"device": torch.cuda.get_device_name(dev), "gemm": [], "train_step": {}}
    print(f"\n3. GPU: {out['device']}")
    print(f"{'M x N x K':<22}{'bf16 TFLOP/s':>14}{'fp8 TFLOP/s':>13}{'+act quant':>12}{'speed-up':>10}{'(+quant)':>10}")
    for M, N, K in GEMM_SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
        xq, xs = quantize_tiles(x)
        wq, ws = quantize_blocks(w)
        fns = {"bf16": lambda: x @ w.T,
               "fp8": lambda: fp8_gemm(xq, xs, wq, ws, True, torch.bfloat16),
               "fp8+quant": lambda: fp8_gemm(*quantize_tiles(x), wq, ws, True, torch.bfloat16)}
        best = _best_of(fns, a.rounds)
        tf = {k: 2 * M * N * K / t / 1e12 for k, t in best.items()}
        out["gemm"].append({"M": M, "N": N, "K": K, **{f"{k}_tflops": v for k, v in tf.items()}})
        print(f"{f'{M} x {N} x {K}':<22}{tf['bf16']:>14.0f}{tf['fp8']:>13.0f}{tf['fp8+quant']:>12.0f}"
              f"{tf['fp8'] / tf['bf16']:>10.2f}{tf['fp8+quant'] / tf['bf16']:>10.2f}")
    steps = {}
    for name in ("bf16", "fp8"):
        torch.manual_seed(0)
        model = Transformer(preset(a.gpu_preset)).to(dev)
        if name == "fp8":
            to_fp8_training(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        ids = torch.randint(0, model.args.vocab_size, (a.gpu_batch, a.gpu_seq_len + 1), device=dev)

        def step(model=model, opt=opt, ids=ids):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = training_loss(model, ids[:, :-1], ids[:, 1:], 0.3).total
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    best = _best_of(steps, a.rounds)
    out["train_step"] = {f"{k}_ms": v * 1e3 for k, v in best.items()}
    print(f"training step, {a.gpu_preset}, {a.gpu_batch} x {a.gpu_seq_len}: bf16 {best['bf16'] * 1e3:.1f} ms, "
          f"fp8 {best['fp8'] * 1e3:.1f} ms (speed-up {best['bf16'] / best['fp8']:.2f}x)")
    return out


def _best_of(fns: dict, rounds: int) -> dict:
    """Best seconds per call of each function, rounds alternating between them (warm-up first)."""
    for f in fns.values():
        f()
    torch.cuda.synchronize()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for k, f in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                f()
            end.record()
            torch.cuda.synchronize()
            best[k] = min(best[k], start.elapsed_time(end) / 5 / 1e3)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek bench fp8", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model of the numerics and memory rows")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="FIELD=VALUE",
                   help="ModelArgs overrides (default: num_hidden_layers=2)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per training run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-bytes", type=int, default=4_000_000, help="bytes of the stdlib corpus to prepare")
    p.add_argument("--skip-numerics", action="store_true")
    p.add_argument("--rounds", type=int, default=5, help="GPU timing rounds")
    p.add_argument("--gpu-preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--gpu-batch", type=int, default=8)
    p.add_argument("--gpu-seq-len", type=int, default=2048)
    p.add_argument("--out", type=Path, help="also write the figures as JSON here")
    a = p.parse_args(argv)
    a.overrides = a.overrides if a.overrides is not None else ["num_hidden_layers=2"]
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}}
    with tempfile.TemporaryDirectory(prefix="nanoseek-bench-fp8-") as tmp:
        work = Path(tmp)
        if not a.skip_numerics:
            result["numerics"] = numerics(a, work)
        result["memory"] = memory(a, work)
    result["gpu"] = gpu(a)
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
