#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Mooncake logs every connection at INFO, also after pytest's summary; keep errors only.
export MC_LOG_LEVEL="${MC_LOG_LEVEL:-ERROR}"
export EPD_CACHE_DIR="${EPD_CACHE_DIR:-$(mktemp -d)/epd-cache}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
