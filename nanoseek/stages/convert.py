"""Convert a checkpoint between FP8 and BF16/FP32, on CPU, streaming one tensor at a time.

    nanoseek convert fp8-to-bf16 SRC DST [--dtype float32]     dequantise (DeepSeek's fp8_cast_bf16.py, no GPU)
    nanoseek convert to-fp8 SRC DST [--scale-fmt ue8m0]        quantise to the released checkpoints' format

SRC: a model directory (or a training run / its checkpoints/, meaning the latest checkpoint). DST
must not exist; it appears complete or not at all. The library side is nanoseek/quant/convert.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from nanoseek.checkpoint import CheckpointError, resolve_model_dir
from nanoseek.quant.convert import ConvertError, fp8_to_bf16, to_fp8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="how", required=True)
    down = sub.add_parser("fp8-to-bf16", help="dequantise FP8 weights (fp8 · scale_inv per 128x128 block)")
    down.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                      help="dtype of the dequantised weights (float32 also upcasts the other BF16 tensors)")
    up = sub.add_parser("to-fp8", help="quantise the tensors DeepSeek-V3 ships in FP8 to E4M3 + 128x128 scales")
    up.add_argument("--scale-fmt", choices=["fp32", "ue8m0"], default="fp32",
                    help="ue8m0: power-of-two scales (DeepSeek-V3.1); stored as fp32 either way")
    for s in (down, up):
        s.add_argument("src", type=Path, help="model directory (config.json + safetensors)")
        s.add_argument("dst", type=Path, help="output directory (must not exist)")
    a = p.parse_args(argv)
    try:
        src = resolve_model_dir(a.src)
        if a.how == "fp8-to-bf16":
            fp8_to_bf16(src, a.dst, dtype=getattr(torch, a.dtype))
        else:
            to_fp8(src, a.dst, pow2_scales=a.scale_fmt == "ue8m0")
    except (ConvertError, CheckpointError) as e:
        print(f"nanoseek convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
