#!/usr/bin/env bash
# Issue 10's GPU figures through the device tool, one call: encode throughput of the encode
# path vs transformers (llava-1.5-7b's vision side, bf16; the tiny VLM, fp32), then an
# image-heavy serving run with an encode pool against encoding on prefill (llava-1.5-7b's
# vision side + a Llama-3.2-1B-shaped language model, random bf16 weights).
# Usage: bash bench/encode_h200.sh [TRANSFER]: logs under $OUT. Carry `.whl`
# (../shared/tools/device-wheels grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2).
set -uo pipefail
transfer=${1:-cuda_ipc}
out=${OUT:-/tmp/out}
mkdir -p "$out"
[ -d /tmp/site/grpc ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 EPD_CACHE_DIR=/tmp/epd-cache
python3 -m proto.build || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -m bench.encode_bench --preset llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 --batch 8 \
  --batch 32 --batch 64 --image-size 336 --out "$out/encode-llava.json" 2>&1 | grep -v "Loading weights" \
  | tee "$out/encode-llava.log"
python3 -m bench.encode_bench --preset tiny --device cuda --dtype float32 --batch 1 --batch 32 \
  --out "$out/encode-tiny.json" 2>&1 | grep -v "Loading weights" | tee "$out/encode-tiny.log"
ck=$(python3 -m bench.encode_bench --preset llava-1.5-7b --text llama-3.2-1b --save-checkpoint /tmp/vlm 2>/dev/null | tail -1)
echo "checkpoint: $ck" | tee "$out/serving.log"
timeout 420 python3 -m bench.serving_bench --launch --encode 1 --prefill 1 --decode 1 --images 4 --image-size 336 \
  --num-requests 128 --warmup 32 --concurrency 16 --input-len 256 --output-len 32 \
  --compare-encode-on-prefill --log-dir "$out/logs" -- --model "$ck" --device cuda --dtype bfloat16 \
  --attention-backend triton --transfer "$transfer" --num-pages 4000 --max-model-len 4096 \
  --max-num-batched-tokens 8192 2>&1 | tee -a "$out/serving.log"
for f in "$out"/logs/*.log; do tail -20 "$f" > "$f.tail"; done 2>/dev/null
exit 0
