#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and starts the demo cluster on the built-in tiny
# model. Extra arguments go to `epd up` (e.g. --prefill 2 --decode 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/epd up "$@"
