#!/usr/bin/env bash
# Issue 5 item 5 on one H200 through the device tool: one aggregated worker behind the
# router, Llama-3.1-8B architecture with random bf16 weights, 512 requests of 1,024
# random prompt tokens and 256 output tokens at concurrency 256.
# Usage: bash bench/serving_h200.sh [TAG [extra worker flags...]]: logs under $OUT/TAG.
# Carry `.whl` (../shared/tools/device-wheels grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2).
set -uo pipefail
tag=${1:-serving}
shift || true
out=${OUT:-/tmp/out}/$tag
mkdir -p "$out"
[ -d /tmp/site/grpc ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m proto.build || exit 1
python3 -c "from bench.presets import write_model_dir; from pathlib import Path; write_model_dir('llama-3.1-8b', Path('/tmp/l8b'))" || exit 1
python3 -m bench.serving_bench --launch --prefill 0 --decode 1 --num-requests 512 --concurrency 256 \
  --input-len 1024 --output-len 256 --log-dir "$out/logs" -- \
  --model /tmp/l8b --load-format dummy --device cuda --dtype bfloat16 --attention-backend triton --cuda-graphs --transfer none \
  --num-pages 24000 --max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 4096 --overlap-schedule "$@" 2>&1 | tee "$out/serving.log"
tail -30 "$out"/logs/decode-0.log > "$out/decode-tail.log" 2>/dev/null
