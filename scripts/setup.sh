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
install_transfer_backends() {
  # Optional KV-transfer backends (kv_transfer/mooncake.py, kv_transfer/nixl.py);
  # the tests skip a backend whose package is missing. Mooncake's wheel links
  # libibverbs and libnuma even for TCP; install them only when missing, and only
  # as root (without recommends: RDMA hosts bring their own providers).
  local missing=() pair known
  known="$(ldconfig -p 2>/dev/null || true)"
  for pair in libibverbs.so.1:libibverbs1 libnuma.so.1:libnuma1; do
    grep -qF "${pair%%:*}" <<<"$known" || missing+=("${pair##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"
    else
      echo "setup.sh: ${missing[*]} missing (needs root): the mooncake backend will not load" >&2
    fi
  fi
  # The CPU wheel, never beside the CUDA wheel (same module): a GPU machine that
  # has mooncake-transfer-engine keeps it.
  if ! $VPY -m pip show -q mooncake-transfer-engine >/dev/null 2>&1; then
    $VPY -m pip install -q mooncake-transfer-engine-non-cuda
  fi
  # nixl's own metadata pulls nixl-cu13 as well: install exactly the cu12 pair.
  $VPY -m pip install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
}
install_transfer_backends
echo "$want" > "$stamp"
