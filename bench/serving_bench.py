"""Serving benchmark: a load generator against the router's gRPC API.

Sends `--num-requests` requests of random token prompts (`--input-len` tokens) asking
for exactly `--output-len` tokens (ignore_eos), at most `--concurrency` at once, and
prints throughput, TTFT, inter-token latency and end-to-end latency percentiles, and
goodput under an SLO. With `--launch` it starts a local cluster first (`epd up` flags
after `--`), e.g. one aggregated worker:

    python -m bench.serving_bench --launch --prefill 0 --decode 1 -- --device cuda --dtype bfloat16 \\
        --model DIR --num-pages 40000
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import grpc

from proto import epd_pb2 as pb
from proto import epd_pb2_grpc as pb_grpc


@dataclass
class RequestTiming:
    start: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.start


async def _one(stub: pb_grpc.RouterStub, prompt: list[int], output_len: int, timeout: float) -> RequestTiming:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    request.token_ids.ids.extend(prompt)
    timing = RequestTiming(time.perf_counter())
    try:
        async for response in stub.Generate(request, timeout=timeout):
            if response.HasField("chunk") and response.chunk.token_ids:
                now = time.perf_counter()
                # Several tokens in one message arrived together: each gets this time.
                timing.token_times.extend([now] * len(response.chunk.token_ids))
                timing.tokens += len(response.chunk.token_ids)
            elif response.HasField("finished") and response.finished.reason == pb.FINISH_REASON_ERROR:
                timing.error = response.finished.error
    except grpc.aio.AioRpcError as exc:
        timing.error = f"{exc.code().name}: {exc.details()}"
    return timing


async def run_load(address: str, args: argparse.Namespace) -> tuple[list[RequestTiming], float]:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, args.vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)]
    limit = asyncio.Semaphore(args.concurrency)
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RouterStub(channel)

        async def bounded(prompt: list[int]) -> RequestTiming:
            async with limit:
                return await _one(stub, prompt, args.output_len, args.timeout)

        start = time.perf_counter()
        timings = await asyncio.gather(*(bounded(p) for p in prompts))
        return list(timings), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def report(timings: list[RequestTiming], wall: float, args: argparse.Namespace) -> None:
    ok = [t for t in timings if t.error is None and t.token_times]
    errors = [t.error for t in timings if t.error is not None]
    out_tokens = sum(t.tokens for t in ok)
    ttfts = [t.ttft for t in ok]
    itls = [x for t in ok for x in t.itls]
    e2es = [t.e2e for t in ok]
    good = [t for t in ok if t.ttft <= args.slo_ttft and (not t.itls or statistics.mean(t.itls) <= args.slo_itl)]
    print(f"requests: {len(ok)} ok, {len(errors)} failed" + (f" (first error: {errors[0]})" if errors else ""))
    print(f"wall time: {wall:.2f} s; output tokens/s: {out_tokens / wall:.1f}; "
          f"input tokens/s: {len(ok) * args.input_len / wall:.1f}; requests/s: {len(ok) / wall:.2f}")
    for name, values in (("TTFT (ms)", ttfts), ("ITL (ms)", itls), ("E2E (ms)", e2es)):
        print(f"{name:<10} p50 {_pct(values, 50) * 1e3:9.1f}  p90 {_pct(values, 90) * 1e3:9.1f}  "
              f"p99 {_pct(values, 99) * 1e3:9.1f}  mean {statistics.mean(values) * 1e3 if values else float('nan'):9.1f}")
    print(f"goodput (TTFT <= {args.slo_ttft * 1e3:.0f} ms, mean ITL <= {args.slo_itl * 1e3:.0f} ms): "
          f"{len(good) / wall:.2f} requests/s ({len(good)}/{len(timings)})")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        index = argv.index("--")
        argv, extra = argv[:index], argv[index + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50051", help="router gRPC address")
    parser.add_argument("--launch", action="store_true", help="start a local cluster (epd up flags after --)")
    parser.add_argument("--prefill", type=int, default=0)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=500, help="prompt token ids are drawn below this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="seconds")
    parser.add_argument("--slo-itl", type=float, default=0.05, help="seconds")
    parser.add_argument("--log-dir", default=None)
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse(argv)
    print(f"command: python -m bench.serving_bench {shlex.join(argv)}", flush=True)
    if not args.launch:
        timings, wall = asyncio.run(run_load(args.address, args))
        report(timings, wall, args)
        return 0
    from deploy.local import ClusterSpec, LocalCluster
    from worker.config import free_port
    spec = ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, port=free_port(), grpc_port=free_port(),
                       model=_flag(extra, "--model"), worker_args=tuple(_without(extra, "--model")),
                       log_dir=args.log_dir)
    with LocalCluster(spec) as cluster:
        timings, wall = asyncio.run(run_load(cluster.grpc_address, args))
    report(timings, wall, args)
    return 0


def _flag(extra: list[str], name: str) -> str | None:
    return extra[extra.index(name) + 1] if name in extra else None


def _without(extra: list[str], name: str) -> list[str]:
    if name not in extra:
        return extra
    index = extra.index(name)
    return extra[:index] + extra[index + 2:]


if __name__ == "__main__":
    sys.exit(main())
