#!/usr/bin/env bash
# Quick start: install uv if missing, then run the proxy with the shipped configuration.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-uv.sh
exec uv run --frozen imageworks-chat-proxy "$@"
