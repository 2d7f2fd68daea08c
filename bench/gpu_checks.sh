#!/usr/bin/env bash
# One pass on a CUDA machine: the GPU kernel/engine tests, then the engine benchmark.
# Usage: bash bench/gpu_checks.sh [LOG_DIR] [extra engine_bench args...]
set -uo pipefail
log_dir=${1:-.}
shift || true
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$log_dir/gpu_checks.log"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine/test_kernels.py tests/engine/test_triton_engine.py \
  2>&1 | tee -a "$log_dir/gpu_checks.log"
python3 -m bench.engine_bench --model llama-3.1-8b --out "$log_dir/engine_bench.json" "$@" \
  2>&1 | tee "$log_dir/engine_bench.log"
python3 -m bench.kernel_sweep --model llama-3.1-8b 2>&1 | tee "$log_dir/kernel_sweep.log"
