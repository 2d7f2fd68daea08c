"""Where a prefill's GPU time goes: torch.profiler over a few engine prefill forwards of a
real architecture with random weights (the engine's GPU path: Triton attention backend,
Triton kernels), against the measured bf16 matmul rate.

    python -m bench.prefill_profile [--model llama-3.1-8b] [--prefill 4x2048] [--iters 3] [--trace T.json.gz]

Prints: the reference matmul rate; the wall time and MFU per forward (no profiler); the
kernels by GPU time, each with its share; the same grouped into categories; the time by
which the forward exceeds its FLOPs at the matmul rate, split into where it goes (matmuls
below the rate, attention, elementwise kernels, GPU idle); and each matmul shape's rate.
"""
from __future__ import annotations

import argparse
import re
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import torch

from bench.engine_bench import Row, attention_flops, batch_of, linear_params, make_requests, mean_time, \
    measure_ceilings
from bench.presets import PRESETS, write_model_dir
from engine.engine import Engine

CATEGORIES = (  # first match wins (flash kernels name cutlass types); names as the profiler lists kernels
    ("attention", r"flash|fmha|attention|_prefill_kernel|_decode_split|_merge_splits"),
    ("matmul", r"nvjet|gemm|cutlass|xmma|cublas|splitKreduce|_skinny_matmul"),
    ("norm", r"rms_norm"),
    ("activation", r"silu"),
    ("rotary + KV write", r"rotary|kv_write"),
    ("index / copy", r"index|gather|scatter|copy|Memcpy|Memset|cat"),
    ("other elementwise", r"elementwise|reduce"),
)


class Kernel(NamedTuple):
    name: str
    calls: int
    us: float  # GPU time, all profiled forwards


def category(name: str) -> str:
    return next((label for label, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")


def self_device_us(event: Any) -> float:
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else event.self_cuda_time_total)


def device_us(event: Any) -> float:
    value = getattr(event, "device_time_total", None)
    return float(value if value is not None else event.cuda_time_total)


def kernels_of(prof: torch.profiler.profile) -> list[Kernel]:
    found = [Kernel(e.key, e.count, self_device_us(e)) for e in prof.key_averages() if self_device_us(e) > 0]
    return sorted(found, key=lambda k: -k.us)


def matmul_shapes(prof: torch.profiler.profile) -> list[tuple[tuple[int, int, int], int, float]]:
    """((M, K, N), calls, GPU us) of every aten::mm / aten::addmm shape."""
    shapes: dict[tuple[int, int, int], list[float]] = defaultdict(lambda: [0, 0.0])
    for e in prof.key_averages(group_by_input_shape=True):
        dims = [s for s in e.input_shapes if isinstance(s, list) and len(s) == 2]
        if e.key in ("aten::mm", "aten::addmm") and len(dims) >= 2:
            (m, k), (_, n) = dims[-2], dims[-1]
            entry = shapes[(m, k, n)]
            entry[0] += e.count
            entry[1] += device_us(e)
    return sorted(((s, int(c), t) for s, (c, t) in shapes.items()), key=lambda x: -x[2])


def print_kernels(kernels: list[Kernel], iters: int, top: int) -> float:
    total = sum(k.us for k in kernels)
    print(f"\n## kernels by GPU time ({iters} forwards; total {total / iters / 1e3:.2f} ms per forward)")
    print(f"{'share':>7} {'ms/fwd':>8} {'calls/fwd':>9}  {'category':<18} kernel")
    for k in kernels[:top]:
        print(f"{k.us / total:7.1%} {k.us / iters / 1e3:8.3f} {k.calls / iters:9.1f}  {category(k.name):<18} "
              f"{k.name[:110]}")
    rest = sum(k.us for k in kernels[top:])
    print(f"{rest / total:7.1%} {rest / iters / 1e3:8.3f} {'':>9}  {'':<18} ({len(kernels) - top} more kernels)")
    return total / iters


def print_categories(kernels: list[Kernel], iters: int, wall_ms: float) -> dict[str, float]:
    per_category: dict[str, float] = defaultdict(float)
    for k in kernels:
        per_category[category(k.name)] += k.us / iters / 1e3
    busy = sum(per_category.values())
    print(f"\n## by category (ms per forward; share of the {wall_ms:.2f} ms wall time)")
    for label, ms in sorted(per_category.items(), key=lambda x: -x[1]):
        print(f"  {label:<20} {ms:9.3f} ms  {ms / wall_ms:6.1%}")
    print(f"  {'GPU idle (wall - kernels)':<20} {wall_ms - busy:9.3f} ms  {(wall_ms - busy) / wall_ms:6.1%}")
    return per_category


def print_matmuls(shapes: list[tuple[tuple[int, int, int], int, float]], iters: int, rate: float) -> float:
    """Per shape: calls, time, achieved rate; returns the matmuls' FLOPs per forward."""
    print(f"\n## matmul shapes (aten::mm/addmm; M tokens, K in, N out) against {rate / 1e12:.1f} TFLOP/s")
    flops_total = 0.0
    for (m, k, n), calls, us in shapes:
        flops = 2.0 * m * k * n * calls / iters
        flops_total += flops
        achieved = flops / (us / iters / 1e6)
        print(f"  {m:>6} x {k:>6} x {n:>6}: {calls / iters:5.1f} calls/fwd {us / iters / 1e3:8.3f} ms/fwd "
              f"{achieved / 1e12:7.1f} TFLOP/s = {achieved / rate:.3f} of the rate")
    return flops_total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="llama-3.1-8b")
    parser.add_argument("--prefill", default="4x2048", help="prompts x tokens")
    parser.add_argument("--iters", type=int, default=3, help="profiled forwards")
    parser.add_argument("--top", type=int, default=25, help="kernels listed")
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace here (.json or .json.gz)")
    args = parser.parse_args(argv)
    prompts, length = (int(x) for x in args.prefill.split("x"))
    rows: list[Row] = []
    _, rate = measure_ceilings(rows)
    tokens = prompts * length
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(write_model_dir(args.model, Path(tmp) / args.model), device="cuda", dtype="bfloat16",
                        load_format="dummy", attention_backend="triton", triton_kernels=True,
                        page_size=16, num_pages=tokens // 16 + 64, max_model_len=max(4096, length),
                        max_num_batched_tokens=max(8192, tokens), max_num_seqs=max(prompts, 8),
                        enable_prefix_cache=False)
    engine.kv_cache.buffer.normal_()
    cfg = engine.model_config
    requests = make_requests(engine, [length] * prompts, [0] * prompts, seed=1)
    run = lambda: engine.runner.execute(batch_of(requests))  # noqa: E731
    wall = mean_time(run, iters=5)
    layer_params, head_params = linear_params(engine)
    attention = attention_flops([length] * prompts, [length] * prompts, cfg.num_heads, cfg.head_dim) * cfg.num_layers
    flops = 2 * layer_params * tokens + 2 * head_params * prompts + attention
    flash = engine.runner.attention.flash_prefill
    print(f"# prefill_profile  model={args.model}  {prompts} x {length}  device={torch.cuda.get_device_name()}  "
          f"torch={torch.__version__}  prefill attention: {'flash varlen' if flash else 'triton/SDPA'}")
    print(f"matmul reference (8192^3, median of 20): {rate / 1e12:.1f} TFLOP/s")
    print(f"forward: {wall * 1e3:.2f} ms (mean of 5 back-to-back, no profiler); {flops / 1e12:.2f} TFLOP "
          f"-> {flops / wall / 1e12:.1f} TFLOP/s = MFU {flops / wall / rate:.4f}")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(args.iters):
            run()
        torch.cuda.synchronize()
    kernels = kernels_of(prof)
    print_kernels(kernels, args.iters, args.top)
    per_category = print_categories(kernels, args.iters, wall * 1e3)
    matmul_flops = print_matmuls(matmul_shapes(prof), args.iters, rate)
    print_excess(wall * 1e3, flops, rate, matmul_flops, per_category)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
        print(f"\ntrace: {args.trace}")


def print_excess(wall_ms: float, flops: float, rate: float, matmul_flops: float,
                 per_category: dict[str, float]) -> None:
    """The forward's time above its FLOPs at the matmul rate, by where it goes."""
    ideal = flops / rate * 1e3
    matmul_ideal = matmul_flops / rate * 1e3
    print(f"\n## time above the FLOPs at the matmul rate: {wall_ms:.2f} - {ideal:.2f} = {wall_ms - ideal:.2f} ms "
          f"(MFU {ideal / wall_ms:.4f}; 0.80 needs {ideal / 0.80:.2f} ms)")
    parts = {"matmuls below the rate": per_category.get("matmul", 0.0) - matmul_ideal,
             "attention (its FLOPs at the rate deducted)": per_category.get("attention", 0.0) - (ideal - matmul_ideal),
             "GPU idle": wall_ms - sum(per_category.values())}
    parts.update({label: ms for label, ms in per_category.items() if label not in ("matmul", "attention")})
    for label, ms in sorted(parts.items(), key=lambda x: -x[1]):
        print(f"  {label:<44} {ms:8.3f} ms  {ms / (wall_ms - ideal):6.1%} of the excess")


if __name__ == "__main__":
    main()
