#!/usr/bin/env bash
# Issue 13 acceptance 3 (prefill attention >= torch SDPA; 4 x 2,048 prefill >= 0.80 of the
# matmul rate) on one GPU through the device tool, one command (about 5 minutes on an H100):
#   bash bench/prefill_gpu.sh
# 1. GPU tests of the flash varlen prefill path (against float32 attention; the engine
#    greedy against the torch backend, with prefix-cache hits), the Triton kernels and the
#    Triton engine path, the speculation GPU tests;
# 2. bench.engine_bench on Llama-3.1-8B (random weights): prefill 4 x 2,048 MFU (flash on
#    and off), one layer of prefill attention (engine path, Triton kernel, SDPA, cuDNN SDPA;
#    a prefix case), decode batch 1 and 64 against copy bandwidth (acceptance 6);
# 3. bench.prefill_profile: where the 4 x 2,048 prefill's time goes, kernel by kernel.
# Logs under $OUT. Carry `.whl` (the wheels of ../shared/tools/device-wheels plus
# grpcio==1.85.3 grpcio-tools==1.85.1 protobuf==7.36.2 pytest pytest-timeout pluggy
# iniconfig packaging pygments), as bench/spec_gpu.sh does.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/machine.log"
python3 -c "import torch, triton; from engine.attention.varlen import flash_unavailable as why; \
print('torch', torch.__version__, 'triton', triton.__version__, 'flash varlen:', \
why(torch.device('cuda'), torch.bfloat16, 32, 8, 128) or 'available')" 2>&1 | tee -a "$out/machine.log"
timeout 180 python3 -m pytest -q -p no:cacheprovider tests/engine/test_varlen_attention.py \
  tests/engine/test_kernels.py tests/engine/test_triton_engine.py tests/engine/test_spec_gpu.py 2>&1 \
  | tee "$out/prefill-gpu-tests.log"
timeout 240 python3 -m bench.engine_bench --model llama-3.1-8b --skip transformers,overlap \
  --out "$out/engine-bench.json" 2>&1 | tee "$out/engine-bench.log"
timeout 140 python3 -m bench.prefill_profile --model llama-3.1-8b --prefill 4x2048 --iters 3 \
  --trace "$out/prefill-trace.json.gz" 2>&1 | tee "$out/prefill-profile.log"
