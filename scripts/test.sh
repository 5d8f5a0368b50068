#!/usr/bin/env bash
# Runs the whole test suite on CPU: bash scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" "extras,serve,test"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
