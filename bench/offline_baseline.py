"""The engine alone, on the serving benchmark's own requests: the baseline its figures are
divided by (issue 13). Run by `bench.serving_bench --offline-baseline` in a subprocess
before the cluster starts (the GPU then holds one engine at a time), or by hand:

    python -m bench.offline_baseline --num-requests 512 --input-len 1024 --output-len 256 -- \\
        --model DIR --load-format dummy --device cuda --dtype bfloat16 --attention-backend triton \\
        --cuda-graphs --overlap-schedule

It builds the engine from the same flags the worker gets and measures, in this order:
- one request of the workload alone, stepping the engine by hand: the time from adding it
  to its first token (prefill + one step: what TTFT at concurrency 1 is compared with),
  and the median time between its later tokens (the batch-1 step, with CUDA graphs and
  overlap if the flags ask: what ITL at concurrency 1 is compared with); `--repeats`
  different prompts, each figure the median over them (one request's first token moved
  by a factor of 1.7 between runs);
- `LLM.generate` of every request of the workload at once: output tokens per second, and
  the time between each request's tokens as the engine hands them out (the engine's own
  ITL under that load, which the served ITL percentiles are compared with).
The last line printed is one JSON object of these figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import Any, NamedTuple

from bench.serving_bench import workload


def parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    if "--" in argv:
        index = argv.index("--")
        own, engine_argv = argv[:index], argv[index + 1:]
    else:
        own, engine_argv = argv, []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="single requests timed (median taken)")
    parser.add_argument("--skip-throughput", action="store_true", help="measure the single request only")
    args = parser.parse_args(own)
    args.images, args.distinct_images, args.image_size = 0, 0, 0
    from deploy.cli import add_engine_arguments
    engine_parser = argparse.ArgumentParser(prog="engine flags")
    add_engine_arguments(engine_parser)
    engine_args, _ = engine_parser.parse_known_args(engine_argv)  # worker-only flags are ignored
    return args, engine_args


def single_request(llm: object, prompt: list[int], output_len: int) -> dict[str, float]:
    """Step the engine by hand for one request: seconds to the first token, and the median
    seconds between the tokens after it."""
    from engine import SamplingParams
    engine = llm.engine  # type: ignore[attr-defined]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    rid = engine.add_request(prompt, params)
    token_times: list[float] = []
    finished = False
    while not finished:
        for out in engine.step():
            if out.request_id == rid:
                token_times.extend([time.perf_counter()] * len(out.new_token_ids))
                finished = out.finished
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return {"first_token_s": token_times[0] - start, "step_s": statistics.median(gaps)}


def single_requests(llm: object, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """`single_request` for each prompt (no cache hits between them); medians."""
    runs = []
    for prompt in prompts:
        llm.engine.free_cache()  # type: ignore[attr-defined]
        runs.append(single_request(llm, prompt, output_len))
    return {"first_token_s": statistics.median(r["first_token_s"] for r in runs),
            "step_s": statistics.median(r["step_s"] for r in runs),
            "first_token_runs_s": [r["first_token_s"] for r in runs]}


def async_first_tokens(llm: object, prompts: list[list[int]], output_len: int) -> list[float]:
    """Seconds from `AsyncEngine.generate` to each prompt's first output, one prompt at a
    time (cache freed before each): the engine driven from an event loop as a worker
    drives it, without gRPC. Beside `single_request`'s figure it shows what the engine
    thread's hops and the loop add to the first token."""
    import asyncio

    from engine import SamplingParams
    from engine.async_engine import AsyncEngine
    params = SamplingParams(max_tokens=min(output_len, 2), temperature=0.0, ignore_eos=True)

    async def run() -> list[float]:
        async_engine = AsyncEngine(llm.engine)  # type: ignore[attr-defined]
        await async_engine.start()
        firsts = []
        try:
            for index, prompt in enumerate(prompts):
                await async_engine.run(async_engine.engine.free_cache)
                start = time.perf_counter()
                first = None
                async for out in async_engine.generate(prompt, params, f"async-{index}"):
                    if first is None and out.new_token_ids:
                        first = time.perf_counter() - start
                firsts.append(first if first is not None else float("nan"))
        finally:
            await async_engine.stop()
        return firsts

    return asyncio.run(run())


def throughput(llm: object, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    """`LLM.generate` of every prompt at once. Its engine's `step` is wrapped to note when
    each request's tokens come out (a few microseconds a step), for the engine's ITL."""
    from engine import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine = llm.engine  # type: ignore[attr-defined]
    token_times: dict[str, list[float]] = {}
    step, schedule = engine.step, engine.scheduler.schedule
    scheduled: list[tuple[int, int, int]] = []  # batches scheduled during the current step call
    steps: list[StepShape] = []

    def noted_schedule() -> object:
        batch = schedule()
        decode = sum(1 for item in batch.scheduled if item.num_new_tokens == 1 and item.request.output_token_ids)
        tokens = sum(item.num_new_tokens for item in batch.scheduled)
        scheduled.append((decode, tokens - decode, len(batch.scheduled) - decode))
        return batch

    timings = engine.overlap.timings if engine.overlap is not None else None

    def timed_step() -> list:
        begin = time.perf_counter()
        host_before = timings.cpu if timings is not None else 0.0
        outputs = step()
        now = time.perf_counter()
        host = (timings.cpu - host_before) if timings is not None else now - begin
        for out in outputs:
            token_times.setdefault(out.request_id, []).extend([now] * len(out.new_token_ids))
        decode, prefill, chunks = (max(s[0] for s in scheduled), sum(s[1] for s in scheduled),
                                   sum(s[2] for s in scheduled)) if scheduled else (0, 0, 0)
        steps.append(StepShape(now - begin, decode, prefill, chunks, host))
        scheduled.clear()
        return outputs

    engine.step, engine.scheduler.schedule = timed_step, noted_schedule
    try:
        with kernel_builds() as built:
            start = time.perf_counter()
            results = llm.generate(prompts, params)  # type: ignore[attr-defined]
            wall = time.perf_counter() - start
    finally:
        del engine.step, engine.scheduler.schedule
    if engine.config.overlap_schedule and len(steps) > 1:
        # A call launches its batch and waits for the one before: its time is mostly the
        # GPU time of the batch the previous call launched.
        steps = [earlier._replace(seconds=later.seconds, host_seconds=later.host_seconds)
                 for earlier, later in zip(steps, steps[1:])]
    tokens = sum(len(r.outputs[0].token_ids) for r in results)
    itls = sorted(b - a for times in token_times.values() for a, b in zip(times, times[1:]))
    figures = {"generate_wall_s": wall, "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
               "kernel_builds": built}
    if itls:
        figures.update({"engine_itl_p50_s": itls[len(itls) // 2], "engine_itl_p99_s": itls[int(len(itls) * 0.99)]})
    figures.update(step_shapes(steps))
    return figures


@contextlib.contextmanager
def kernel_builds() -> Iterator[list[str]]:
    """Triton kernel variants built (compiled, or loaded from the disk cache) while the
    block runs: each is a step stalled on the host. Empty where Triton is absent."""
    built: list[str] = []
    try:
        from triton import knobs
    except ImportError:
        yield built
        return
    previous = knobs.runtime.jit_post_compile_hook

    def record(**kwargs: Any) -> None:
        built.append(str(kwargs.get("repr", kwargs.get("fn", "?"))))
        if previous is not None:
            previous(**kwargs)

    knobs.runtime.jit_post_compile_hook = record
    try:
        yield built
    finally:
        knobs.runtime.jit_post_compile_hook = previous


class StepShape(NamedTuple):
    """One `engine.step` call under LLM.generate: its wall time and what it scheduled
    (with the overlap scheduler a call launches one batch and reads the one before, so
    each batch's shape is paired with the next call's time)."""

    seconds: float
    decode_rows: int
    prefill_tokens: int
    prefill_chunks: int
    host_seconds: float = 0.0  # the call's host time, waits for the GPU excluded (overlap scheduler)


def step_shapes(steps: list[StepShape]) -> dict[str, object]:
    """Step-time percentiles, for steps with and without prefill work, and the slowest
    steps' shapes: what the engine's ITL tail is made of."""
    if not steps:
        return {}
    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]
    times = [s.seconds for s in steps]
    mixed = [s.seconds for s in steps if s.prefill_tokens]
    pure = [s.seconds for s in steps if not s.prefill_tokens]
    slowest = sorted(steps, key=lambda s: s.seconds, reverse=True)[:max(1, len(steps) // 100)]
    return {"steps": len(steps), "prefill_tokens_total": sum(s.prefill_tokens for s in steps),
            "step_p50_s": pct(times, 0.5), "step_p99_s": pct(times, 0.99),
            "steps_with_prefill": len(mixed), "step_with_prefill_p50_s": pct(mixed, 0.5) if mixed else None,
            "step_with_prefill_p99_s": pct(mixed, 0.99) if mixed else None,
            "step_decode_only_p50_s": pct(pure, 0.5) if pure else None,
            "step_decode_only_p99_s": pct(pure, 0.99) if pure else None,
            "slowest_steps": [s._asdict() for s in slowest[:12]],
            # Every step as [ms, decode rows, prefill tokens, prefill chunks, host ms], in order.
            "step_list": [[round(s.seconds * 1e3, 2), s.decode_rows, s.prefill_tokens, s.prefill_chunks,
                           round(s.host_seconds * 1e3, 2)] for s in steps]}


def main(argv: list[str] | None = None) -> int:
    args, engine_args = parse(list(sys.argv[1:] if argv is None else argv))
    from deploy.cli import engine_options
    from engine import LLM
    llm = LLM(engine_args.model, **engine_options(engine_args))
    prompts = [p for p, _ in workload(args, None)]
    warm = [[(t * 7 + 3) % args.vocab for t in p] for p in prompts[:2]]
    throughput(llm, warm, 8)  # first uses compile kernels: not measured
    figures = {"requests": len(prompts), "input_len": args.input_len, "output_len": args.output_len}
    singles = [[(t * (5 + 2 * i) + 1 + i) % args.vocab for t in prompts[0]] for i in range(args.repeats)]
    figures.update(single_requests(llm, singles, args.output_len))
    firsts = async_first_tokens(llm, [[(t + 11 * (i + 1)) % args.vocab for t in p] for i, p in enumerate(singles)],
                                args.output_len)
    figures.update(first_token_async_s=statistics.median(firsts), first_token_async_runs_s=firsts)
    if not args.skip_throughput:
        llm.engine.free_cache()  # the warm-up and single request must give the workload no hits
        figures.update(throughput(llm, prompts, args.output_len))
    print(f"offline: first token {figures['first_token_s'] * 1e3:.2f} ms, step {figures['step_s'] * 1e3:.3f} ms"
          + (f", LLM.generate {figures['output_tokens_per_s']:.1f} output tokens/s over "
             f"{figures['generate_wall_s']:.2f} s" if "output_tokens_per_s" in figures else "")
          + (f", engine ITL p50 / p99 {figures['engine_itl_p50_s'] * 1e3:.1f} / "
             f"{figures['engine_itl_p99_s'] * 1e3:.1f} ms" if "engine_itl_p50_s" in figures else ""), flush=True)
    if "steps" in figures:
        ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
        print(f"offline: {figures['steps']} steps, p50 / p99 {ms(figures['step_p50_s'])} / "
              f"{ms(figures['step_p99_s'])} ms; {figures['steps_with_prefill']} with prefill "
              f"{ms(figures['step_with_prefill_p50_s'])} / {ms(figures['step_with_prefill_p99_s'])} ms; decode only "
              f"{ms(figures['step_decode_only_p50_s'])} / {ms(figures['step_decode_only_p99_s'])} ms", flush=True)
        print("offline: slowest steps (ms, decode rows, prefill tokens, prefill chunks, host ms): " + "; ".join(
            f"{s['seconds'] * 1e3:.1f} {s['decode_rows']} {s['prefill_tokens']} {s['prefill_chunks']} "
            f"{s['host_seconds'] * 1e3:.1f}"
            for s in figures["slowest_steps"]), flush=True)
    if "kernel_builds" in figures:
        builds = figures["kernel_builds"]
        print(f"offline: Triton kernel variants built during LLM.generate: {len(builds)}"
              + "".join(f"\n  {b[:300]}" for b in builds[:8]), flush=True)
    print("offline: first token of each single request (ms): "
          + ", ".join(f"{t * 1e3:.2f}" for t in figures["first_token_runs_s"]), flush=True)
    print(f"offline: first token through AsyncEngine (an event loop, no gRPC) p50 "
          f"{figures['first_token_async_s'] * 1e3:.2f} ms: "
          + ", ".join(f"{t * 1e3:.2f}" for t in figures["first_token_async_runs_s"]), flush=True)
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
