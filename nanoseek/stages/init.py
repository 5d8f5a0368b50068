"""Write a randomly initialised model in the HF layout.

    nanoseek init --preset tiny --out runs/random-tiny [--set num_hidden_layers=2 --set q_lora_rank=null]
                  [--tokenizer DIR] [--seed 0]

Useful for smoke tests and for checking that a shape fits before training it. With --tokenizer,
vocab_size (and bos/eos_token_id) default to the tokenizer's; a --set vocab_size smaller than the
tokenizer is an error, a larger one is kept (an embedding padded past the tokenizer, as
DeepSeek-V3's 129,280 rows for 128,815 ids).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from nanoseek.cli import int_in
from nanoseek.model import PRESETS, ConfigError, Transformer, preset
from nanoseek.model.args import parse_overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanoseek init", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelArgs / config.json field (JSON value), repeatable")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", type=Path, help="HF tokenizer directory to copy next to the model")
    p.add_argument("--seed", type=int_in(0), default=0)
    a = p.parse_args(argv)
    if a.out.exists() and not a.out.is_dir():
        p.error(f"--out {a.out} exists and is not a directory")
    try:
        overrides = parse_overrides(a.overrides)
    except ConfigError as e:  # one line naming the field, without argparse's usage block
        print(f"nanoseek init: error: {e}", file=sys.stderr)
        return 2
    if a.tokenizer is not None:
        overrides = fit_tokenizer(p, a.tokenizer, overrides)
    try:
        args = preset(a.preset, **overrides)
    except ConfigError as e:
        print(f"nanoseek init: error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(a.seed)
    model = Transformer(args)
    try:
        model.save_pretrained(a.out)
    except OSError as e:
        p.error(f"--out {a.out}: cannot write the model ({e.strerror or e})")
    if a.tokenizer is not None:
        for f in a.tokenizer.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, a.out / f.name)
    print(f"wrote {a.out}: {model.num_params() / 1e6:.2f}M parameters "
          f"({model.num_params(active=True) / 1e6:.2f}M active), {len(model.mtp)} MTP module(s)")
    return 0


def fit_tokenizer(p: argparse.ArgumentParser, path: Path, overrides: dict) -> dict:
    """The overrides with vocab_size, bos_token_id and eos_token_id taken from the tokenizer in
    `path` unless given; parser error if it cannot be read or the given vocab_size is too small."""
    from nanoseek.data import DataError, Tokenizer

    if not (path / "tokenizer.json").is_file():
        p.error(f"--tokenizer {path}: no tokenizer.json there")
    try:
        tok = Tokenizer.from_dir(path)
    except (DataError, OSError, ValueError) as e:
        p.error(f"--tokenizer {path}: {e}")
    given = overrides.get("vocab_size")
    if isinstance(given, int) and not isinstance(given, bool) and given < tok.vocab_size:
        p.error(f"--set vocab_size={given} is smaller than the tokenizer in {path} ({tok.vocab_size} ids); "
                f"leave it out to use {tok.vocab_size}")
    overrides = dict(overrides)
    overrides.setdefault("vocab_size", tok.vocab_size)
    overrides.setdefault("bos_token_id", tok.bos_id)
    overrides.setdefault("eos_token_id", tok.eos_id)
    return overrides
