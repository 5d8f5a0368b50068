#!/usr/bin/env bash
# Runs the whole test suite on CPU: bash scripts/test.sh [pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh" "extras,serve,test"
# tests/test_web.py drives Debian's chromium; install it when missing and we are root with apt.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null 2>&1 || echo "test.sh: could not install chromium; the browser test will skip" >&2
fi
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q "$@"
