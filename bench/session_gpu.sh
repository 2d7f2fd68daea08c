#!/usr/bin/env bash
# One device call covering the open GPU questions of issues 13 and 17 (about 10 minutes on an H100):
#   bash bench/session_gpu.sh
# 1. speculation GPU tests with full tracebacks (verify graphs on and off, both drafters);
# 2. the attention kernels' and the Triton engine path's GPU tests;
# 3. bench.engine_bench on Llama-3.1-8B (random weights): prefill MFU, one layer of prefill
#    attention against torch SDPA (per sequence and batched), decode at batch 1 and 64;
# 4. bench.prefill_profile: the 4 x 2,048 prefill kernel by kernel;
# 5. bench/serving_speed.sh c256-1024 (served against LLM.generate, same flags).
# Logs under $OUT. Carry `.whl` as bench/serving_speed.sh says.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/machine.log"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rA --tb=long tests/engine/test_spec_gpu.py \
  > "$out/spec-gpu-tests.log" 2>&1; tail -5 "$out/spec-gpu-tests.log"
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/engine/test_kernels.py \
  tests/engine/test_triton_engine.py tests/engine/test_varlen_attention.py > "$out/kernel-tests.log" 2>&1
tail -5 "$out/kernel-tests.log"
timeout 200 python3 -m bench.engine_bench --model llama-3.1-8b --skip transformers,overlap \
  --out "$out/engine-bench.json" > "$out/engine-bench.log" 2>&1; grep -E "prefill|decode.*(step, CUDA|bandwidth)" "$out/engine-bench.log"
timeout 120 python3 -m bench.prefill_profile --model llama-3.1-8b --prefill 4x2048 --iters 3 \
  > "$out/prefill-profile.log" 2>&1; tail -3 "$out/prefill-profile.log"
timeout "${SERVE_TIMEOUT:-200}" bash bench/serving_speed.sh ${SERVE_PHASES:-c256-1024} > /dev/null 2>&1
tail -12 "$out"/c256-*.log
