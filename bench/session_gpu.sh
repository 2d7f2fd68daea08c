#!/usr/bin/env bash
# One device call covering the open GPU questions of issues 13 and 17 (estimated at about 10 minutes on an H100; not yet run):
#   bash bench/session_gpu.sh [PHASE...]   (default: spec-tests kernel-tests engine profile spec-bench)
#   spec-tests    speculation GPU tests with full tracebacks (verify graphs on and off, both drafters, sessions)
#   kernel-tests  the attention kernels' and the Triton engine path's GPU tests
#   engine        bench.engine_bench on Llama-3.1-8B (random weights): prefill MFU, one layer of prefill
#                 attention against torch SDPA (per sequence and batched), decode at batch 1 and 64
#   profile       bench.prefill_profile: the 4 x 2,048 prefill kernel by kernel
#   spec-bench    bench.spec_bench (workload SPEC_WORKLOAD, default continue; weights SPEC_LOAD_FORMAT,
#                 default dummy; prompt SPEC_PROMPT_LEN, default 512), ITL at batch 1 and 16
#                 with verify steps and draft rounds eager (--no-speculative-cuda-graphs)
#   spec-bench-graphs  the same with their graphs (--speculative-cuda-graphs, the default)
#   c1, c256-B    bench/serving_speed.sh c1 / c256-B (served against LLM.generate, same flags; B: token budget);
#                 c1-nomux, c256-B-nomux: the same with one Generate call per request (--no-decode-multiplex)
# Logs under $OUT, packed at the end into $OUT/logs.tgz when there are more files than the
# device tool brings back (8). Carry `.whl` as bench/serving_speed.sh says.
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/machine.log"
phases=("$@"); [ ${#phases[@]} -eq 0 ] && phases=(spec-tests kernel-tests engine profile spec-bench)
for phase in "${phases[@]}"; do
  echo "== $phase $(date +%T)"
  case $phase in
    spec-tests)
      timeout 200 python3 -m pytest -q -p no:cacheprovider -rA --tb=long tests/engine/test_spec_gpu.py \
        > "$out/spec-gpu-tests.log" 2>&1; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$out/spec-gpu-tests.log" | tail -12;;
    kernel-tests)
      timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short tests/engine/test_kernels.py \
        tests/engine/test_triton_engine.py ${KERNEL_TESTS_K:+-k "$KERNEL_TESTS_K"} > "$out/kernel-tests.log" 2>&1
      timeout 60 python3 -m pytest -q -p no:cacheprovider tests/bench/test_offline_baseline.py -k kernel_builds >> "$out/kernel-tests.log" 2>&1
      tail -3 "$out/kernel-tests.log";;
    engine)
      timeout 200 python3 -m bench.engine_bench --model llama-3.1-8b --skip transformers,overlap \
        --out "$out/engine-bench.json" > "$out/engine-bench.log" 2>&1
      grep -E "prefill|(step, CUDA|bandwidth)" "$out/engine-bench.log";;
    profile)
      timeout 120 python3 -m bench.prefill_profile --model llama-3.1-8b --prefill 4x2048 --iters 3 \
        > "$out/prefill-profile.log" 2>&1; grep -A14 "categor" "$out/prefill-profile.log" | head -30;;
    spec-bench|spec-bench-graphs)
      graphs=(--no-speculative-cuda-graphs); [ "$phase" = spec-bench-graphs ] && graphs=(--speculative-cuda-graphs)
      timeout "${SPEC_TIMEOUT:-240}" python3 -m bench.spec_bench --model llama-3.1-8b --device cuda --dtype bfloat16 --batches 1,16 \
        --workload "${SPEC_WORKLOAD:-continue}" --period 8 --ngram-k "${NGRAM_K:-3,5}" --draft-k "${DRAFT_K-3}" --prompt-len "${SPEC_PROMPT_LEN:-512}" \
        --load-format "${SPEC_LOAD_FORMAT:-dummy}" --output-len 256 --num-pages 8192 "${graphs[@]}" --out "$out/$phase.json" > "$out/$phase.log" 2>&1
      tail -10 "$out/$phase.log";;
    c1|c1-*|c256-*)
      timeout "${SERVE_TIMEOUT:-280}" bash bench/serving_speed.sh "$phase" > /dev/null 2>&1; tail -14 "$out/$phase.log";;
    *) echo "unknown phase $phase";;
  esac
done
# The device tool brings back at most 8 files: past that, everything goes into one archive.
if [ "$(ls "$out" | wc -l)" -gt 8 ]; then
  (cd "$out" && tar czf logs.tgz --exclude=logs.tgz --remove-files -- *)
fi
