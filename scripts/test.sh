#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export EPD_CACHE_DIR="${EPD_CACHE_DIR:-$(mktemp -d)/epd-cache}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
