#!/usr/bin/env bash
# The main job: the whole tiny pipeline on a fresh machine, ~11 minutes on 2 CPU cores (plus the
# first install).
#
#   bash scripts/speedrun.sh                      # RUN=runs/tiny MINUTES=10 by default
#   RUN=runs/t2 MINUTES=3 bash scripts/speedrun.sh
#
# install -> tokenize the embedded corpus (the Python stdlib) -> train the tiny preset for MINUTES
# (validation bits-per-byte at the start and the end, sampled completions and a fill-in-the-middle
# example at the end) -> a completion from the inference engine -> the run's report. One line per
# stage; each stage is a `nanoseek` command.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RUN="${RUN:-runs/tiny}"
MINUTES="${MINUTES:-10}"
SECONDS=0
stage() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

stage "setup: .venv with torch (CPU) and nanoseek";  bash scripts/setup.sh
export PATH="$ROOT/.venv/bin:$PATH"
# OpenMP's default (threads spin between parallel regions) is the fast setting on an idle machine:
# OMP_WAIT_POLICY=PASSIVE measured 1.4x slower training steps and 4x slower decoding there. On a
# machine shared with other busy jobs, set OMP_WAIT_POLICY=PASSIVE yourself: spinning threads then
# fight the other jobs (3-5x slower steps seen).
rm -rf "$RUN"
stage "prepare: stdlib corpus -> 4K BPE -> token shards"; nanoseek prepare --out "$RUN/data"
stage "train: tiny preset, $MINUTES minutes";  nanoseek train --data "$RUN/data" --out "$RUN" --preset tiny \
    --max-minutes "$MINUTES" --batch-size 16 --micro-batch 8 --eval-every 200
CKPT="$RUN/checkpoints/$(cat "$RUN/checkpoints/latest")"
stage "generate: the inference engine on $CKPT";  nanoseek generate --model "$CKPT" --no-chat \
    --prompt "def read_file(path):" --max-new-tokens 64 --temperature 0.7 --top-k 40 --seed 0
stage "report: $RUN/report.md";  cat "$RUN/report.md"
stage "done: $RUN"
