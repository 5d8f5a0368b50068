#!/usr/bin/env bash
# Creates .venv (once) and installs nanoseek into it. Sourced by speedrun.sh and test.sh.
# torch is pinned to 2.13.0 *before* the package install: a bare `torch` requirement with no
# torch present would pull a multi-GB CUDA build instead of the CPU wheel on disk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRAS="${1:-extras,serve}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    python3 -m venv "$ROOT/.venv"
fi
PY="$ROOT/.venv/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e "$ROOT[$EXTRAS]"
