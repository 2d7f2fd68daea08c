#!/usr/bin/env bash
# Issue 13 on one GPU through the device tool: the serving path against the engine alone,
# each served figure beside its baseline measured in the same invocation.
# Usage: bash bench/serving_speed.sh PHASE... with phases from:
#   kernels    prefill attention tiles (bench.kernel_sweep prefill) and the engine benchmark
#              (prefill 4 x 2,048 against the matmul rate, attention against torch SDPA,
#              decode steps at batch 1 and 64 against copy bandwidth)
#   c1         concurrency 1, 16 requests x 1,024 in / 128 out, with --offline-baseline and
#              --ttft-ladder 16 (the first token through the router and straight to decode)
#   c1-torchops  the same with --no-triton-kernels (torch's norm/rotary/activation/matmul ops)
#   c256       512 x 1,024 in / 256 out at concurrency 256, with --offline-baseline;
#              py-spy samples the worker and the router for 10 s of the load
#   c256-B     the same at a token budget of B (--max-num-batched-tokens B)
#   PHASE-nomux  (c1-nomux, c256-B-nomux) the same with the router's --no-decode-multiplex (one
#              Generate call per request instead of one DecodeWorker.Stream per worker), for A/B runs
# Logs under $OUT. Carry `.whl` (../shared/tools/device-wheels httptools==0.9.0 grpcio==1.85.3
# grpcio-tools==1.85.1 protobuf==7.36.2 py-spy).
source "$(dirname "$0")/device_env.sh"
[ -f /tmp/l8b/config.json ] || python3 -c "from bench.presets import write_model_dir; from pathlib import Path; \
write_model_dir('llama-3.1-8b', Path('/tmp/l8b'))" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/machine.log"
engine_flags=(--model /tmp/l8b --load-format dummy --device cuda --dtype bfloat16 --attention-backend triton
  --cuda-graphs --transfer none --num-pages 24000 --max-num-seqs 256 --max-model-len 4096 --overlap-schedule)

profile() {  # profile LOGDIR TAG: py-spy samples of the worker and the router for 10 s, 8 s into the load
  for _ in $(seq 600); do grep -qs "is healthy" "$1/router.log" && break; sleep 1; done
  sleep 8
  for who in worker router; do
    pid=$(pgrep -f "deploy.cli $who" | head -1)
    [ -n "$pid" ] && py-spy record --nonblocking -r 200 -d 10 -f raw -p "$pid" -o "$out/pyspy-$2-$who.txt" \
      >/dev/null 2>&1 &
  done
  wait
}

for phase in "$@"; do
  router_args=""
  case $phase in *-nomux) router_args="--no-decode-multiplex"; phase_base=${phase%-nomux};; *) phase_base=$phase;; esac
  case $phase_base in
    kernels)
      python3 -m bench.kernel_sweep --model llama-3.1-8b --only prefill 2>&1 | tee "$out/kernels.log"
      python3 -m bench.engine_bench --model llama-3.1-8b --skip transformers,overlap 2>&1 | tee -a "$out/kernels.log";;
    c1|c1-torchops)
      extra=(); [ "$phase_base" = c1-torchops ] && extra=(--no-triton-kernels)
      python3 -m bench.serving_bench --launch --offline-baseline --prefill 0 --decode 1 --num-requests 16 \
        --concurrency 1 --input-len 1024 --output-len 128 --ttft-ladder 16 --router-args="$router_args" --log-dir "/tmp/logs-$phase" \
        -- "${engine_flags[@]}" \
        --max-num-batched-tokens 8192 "${extra[@]}" 2>&1 | grep -v " INFO " | tee "$out/$phase.log"
      grep -h "engine loop" "/tmp/logs-$phase"/*.log | tail -3 | tee -a "$out/$phase.log";;
    c256*)
      budget=${phase_base#c256-}; [ "$budget" = c256 ] && budget=8192
      profile "/tmp/logs-$phase" "$budget${router_args:+-nomux}" &
      python3 -m bench.serving_bench --launch --offline-baseline --prefill 0 --decode 1 --num-requests 512 \
        --concurrency 256 --input-len 1024 --output-len 256 --router-args="$router_args" --log-dir "/tmp/logs-$phase" \
        -- "${engine_flags[@]}" \
        --max-num-batched-tokens "$budget" 2>&1 | grep -v " INFO " | tee "$out/$phase.log"
      grep -h "engine loop" "/tmp/logs-$phase"/*.log | tail -3 | tee -a "$out/$phase.log"
      cp "/tmp/logs-$phase/offline.json" "$out/$phase-offline.json" 2>/dev/null
      wait;;
    *) echo "unknown phase $phase"; exit 2;;
  esac
done
