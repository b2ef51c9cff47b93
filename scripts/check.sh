#!/usr/bin/env bash
# The one command for lint, types and the test suite: used by developers, the hook and CI.
#   scripts/check.sh            everything (CI): every test, real processes and slow ones too
#   scripts/check.sh --fast     lint, types and the fast tier (-m "not subprocess and not slow"),
#                               about 90 s: the developer's loop (docs/testing.md, "Tiers")
# Extra arguments go to pytest (e.g. scripts/check.sh --fast -k registry -x).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [[ "${1:-}" == "--fast" ]]; then
    tier=(-m "not subprocess and not slow")
    shift
fi
. scripts/ensure-uv.sh
uv sync --frozen --quiet
echo "== ruff (lint)";   uv run --frozen ruff check .
echo "== ruff (format)"; uv run --frozen ruff format --check .
echo "== mypy";          uv run --frozen mypy
echo "== pytest";        uv run --frozen pytest "${tier[@]}" "$@"
