# Sourced by the device scripts (bench/serving_speed.sh, bench/spec_gpu.sh): installs the
# carried `.whl` wheels into /tmp/site once per machine, puts them and the checkout on the
# path, builds the protobuf stubs, and sets `out` to $OUT (logs go there).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
[ -d /tmp/site/grpc ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
python3 -m proto.build >/dev/null || exit 1
