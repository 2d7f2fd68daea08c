#!/usr/bin/env bash
# A/B of one environment switch on the decode step, on one machine, alternating runs
# (machines of one kind differ by a few percent; only same-machine pairs compare).
# Usage: bash bench/decode_ab.sh VAR ROUNDS LOG_DIR [engine_bench args...]
#   e.g. bash bench/decode_ab.sh EPD_FUSED_NORM 2 bench/results --decode-batches 1,64
# Runs `VAR=1` then `VAR=0`, ROUNDS times; logs LOG_DIR/ab-VAR-{1,0}-ROUND.log and
# prints the decode rows of each run.
set -uo pipefail
var=$1 rounds=$2 log_dir=$3
shift 3
export PYTHONUNBUFFERED=1
for round in $(seq 1 "$rounds"); do
  for value in 1 0; do
    log="$log_dir/ab-$var-$value-$round.log"
    env "$var=$value" python3 -m bench.engine_bench --model llama-3.1-8b --prefill 1x64 \
      --skip transformers,overlap,attention "$@" >"$log" 2>&1
    echo "== $var=$value round $round"
    grep -E "copy \(|decode: .*(step, CUDA graph|achieved)" "$log"
  done
done
