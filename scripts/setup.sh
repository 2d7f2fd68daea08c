#!/usr/bin/env bash
# Creates .venv and installs epd-serve with its test tools. Idempotent: a second run
# only checks. Needs Python 3.10+ (3.11 tested) and no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.epd-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
$VPY -m pip install -q --upgrade pip
# Install the CPU build of torch first: a bare `torch` requirement could pull a CUDA build.
$VPY -c "import torch" 2>/dev/null || $VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q -e ".[test]"
$VPY -c "import proto"  # generates the gRPC stubs from proto/epd.proto
echo "$want" > "$stamp"
