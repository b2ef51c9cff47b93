#!/usr/bin/env bash
# The one command for lint, types and the whole test suite: used by developers, the hook and CI.
# Extra arguments go to pytest (e.g. scripts/check.sh -k registry -x).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-uv.sh
uv sync --frozen --quiet
echo "== ruff (lint)";   uv run --frozen ruff check .
echo "== ruff (format)"; uv run --frozen ruff format --check .
echo "== mypy";          uv run --frozen mypy
echo "== pytest";        uv run --frozen pytest "$@"
