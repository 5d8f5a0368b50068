"""Write a randomly initialised model in the HF layout.

    nanoseek init --preset tiny --out runs/random-tiny [--set num_hidden_layers=2 --set q_lora_rank=null]
                  [--tokenizer DIR] [--seed 0]

Useful for smoke tests and for checking that a shape fits before training it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from nanoseek.model import PRESETS, ConfigError, Transformer, preset
from nanoseek.model.args import parse_overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek init", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelArgs / config.json field (JSON value), repeatable")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", type=Path, help="HF tokenizer directory to copy next to the model")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        args = preset(a.preset, **parse_overrides(a.overrides))
    except ConfigError as e:  # one line naming the field, without argparse's usage block
        print(f"nanoseek init: error: {e}", file=sys.stderr)
        return 2
    if a.tokenizer is not None and not (a.tokenizer / "tokenizer.json").exists():
        p.error(f"--tokenizer {a.tokenizer}: no tokenizer.json there")
    torch.manual_seed(a.seed)
    model = Transformer(args)
    model.save_pretrained(a.out)
    if a.tokenizer is not None:
        for f in a.tokenizer.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, a.out / f.name)
    print(f"wrote {a.out}: {model.num_params() / 1e6:.2f}M parameters "
          f"({model.num_params(active=True) / 1e6:.2f}M active), {len(model.mtp)} MTP module(s)")
    return 0
