#!/usr/bin/env bash
# Issue 17 on one GPU (H200 or H100) through the device tool, one command:
#   bash bench/spec_gpu.sh
# 1. the speculation GPU tests (graphs + overlap + Triton, greedy exact vs no speculation,
#    verify steps and draft rounds replaying graphs);
# 2. bench.spec_bench on Llama-3.1-8B (random weights) with a 1-layer draft of its shape:
#    ITL at batch 1 and 16 for none / ngram K=3,5 / draft K=3, beside the acceptance length,
#    on the self-echo workload (prompt P + T + P, T the target's own continuation of P).
# Logs under $OUT. Carry `.whl` (../shared/tools/device-wheels grpcio==1.85.3
# grpcio-tools==1.85.1 protobuf==7.36.2 pytest pytest-timeout) as bench/serving_speed.sh does.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/machine.log"
python3 -m pytest -q -p no:cacheprovider tests/engine/test_spec_gpu.py tests/engine/test_triton_engine.py \
  tests/engine/test_kernels.py 2>&1 \
  | tee "$out/spec-gpu-tests.log"
python3 -m bench.spec_bench --model llama-3.1-8b --device cuda --dtype bfloat16 --batches 1,16 \
  --ngram-k 3,5 --draft-k 3 --prompt-len 512 --output-len 256 --num-pages 8192 \
  --out "$out/spec-bench.json" 2>&1 | tee "$out/spec-bench.log"
