# Sourced by the device scripts (bench/serving_speed.sh, bench/spec_gpu.sh): installs the
# carried `.whl` wheels into /tmp/site once per machine, puts them and the checkout on the
# path (installed again when the carried set changes), builds the protobuf stubs, and sets `out` to $OUT (logs go there).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
# Installed again whenever the carried set differs from what this machine installed last.
if [ "$(ls .whl 2>/dev/null)" != "$(cat /tmp/site/.carried 2>/dev/null)" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  ls .whl > /tmp/site/.carried
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
python3 -m proto.build >/dev/null || exit 1
