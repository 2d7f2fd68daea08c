"""Serving benchmark: a load generator against the router's gRPC API.

Sends `--num-requests` requests of random token prompts (`--input-len` tokens) asking
for exactly `--output-len` tokens (ignore_eos), at most `--concurrency` at once, and
prints throughput, TTFT, inter-token latency and end-to-end latency percentiles, and
goodput under an SLO. With `--launch` it starts a local cluster first (`epd up` flags
after `--`), e.g. one aggregated worker:

    python -m bench.serving_bench --launch --prefill 0 --decode 1 -- --device cuda --dtype bfloat16 \\
        --model DIR --num-pages 40000

Image-heavy runs (a vision-language checkpoint): `--images K` puts K random PNG images
(`--image-size` pixels square, drawn from `--distinct-images` different ones) at the start
of every prompt; `--encode N` launches N encode workers, and `--compare-encode-on-prefill`
runs the same load a second time on a cluster without encode workers (the prefill worker
runs the vision tower) and prints both:

    python -m bench.serving_bench --launch --encode 1 --prefill 1 --decode 1 --images 2 \\
        --compare-encode-on-prefill -- --model DIR --device cuda
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


async def _one(stub: pb_grpc.RouterStub, prompt: list[int], output_len: int, timeout: float,
               images: list[bytes]) -> RequestTiming:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True),
                                 images=images)
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


def random_png(rng: random.Random, size: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def workload(args: argparse.Namespace, image_token_id: int | None) -> list[tuple[list[int], list[bytes]]]:
    """Prompts of random token ids (`--input-len`, below `--vocab`, never the image
    token) led by `--images` image placeholders, each with its image."""
    rng = random.Random(args.seed)
    distinct = args.distinct_images or args.num_requests * args.images
    pool = [random_png(rng, args.image_size) for _ in range(min(distinct, args.num_requests * args.images))]
    requests = []
    for _ in range(args.num_requests):
        text = [t for t in (rng.randrange(10, args.vocab) for _ in range(args.input_len + 8)) if t != image_token_id]
        images = [rng.choice(pool) for _ in range(args.images)] if args.images else []
        placeholders = [image_token_id] * len(images) if images else []
        requests.append((placeholders + text[:args.input_len], images))
    return requests


async def run_load(address: str, args: argparse.Namespace,
                   image_token_id: int | None = None) -> tuple[list[RequestTiming], float]:
    requests = workload(args, image_token_id)
    warmup = workload(argparse.Namespace(**{**vars(args), "num_requests": args.warmup, "seed": args.seed + 7919}),
                      image_token_id) if args.warmup else []
    limit = asyncio.Semaphore(args.concurrency)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 256 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.RouterStub(channel)

        async def bounded(prompt: list[int], images: list[bytes]) -> RequestTiming:
            async with limit:
                return await _one(stub, prompt, args.output_len, args.timeout, images)

        if warmup:  # first uses compile kernels and load the vision tower: not measured
            await asyncio.gather(*(bounded(p, i) for p, i in warmup))
        start = time.perf_counter()
        timings = await asyncio.gather(*(bounded(p, i) for p, i in requests))
        return list(timings), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def report(timings: list[RequestTiming], wall: float, args: argparse.Namespace, title: str = "") -> None:
    if title:
        print(f"--- {title}")
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
    parser.add_argument("--encode", type=int, default=0, help="encode workers (with --launch)")
    parser.add_argument("--encode-args", default="", help="extra flags of the encode workers only (one string)")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent (other prompts and images) "
                        "before the measured ones, on each cluster")
    parser.add_argument("--images", type=int, default=0, help="images per request (a vision-language model)")
    parser.add_argument("--image-size", type=int, default=336, help="pixels per side of each random image")
    parser.add_argument("--distinct-images", type=int, default=0, help="different images in the workload (0: all)")
    parser.add_argument("--compare-encode-on-prefill", action="store_true",
                        help="run the load again without encode workers (the prefill worker encodes)")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse(argv)
    print(f"command: python -m bench.serving_bench {shlex.join(argv)}", flush=True)
    model = _flag(extra, "--model")
    image_token_id = _image_token_id(model) if args.images else None
    if not args.launch:
        timings, wall = asyncio.run(run_load(args.address, args, image_token_id))
        report(timings, wall, args)
        return 0
    shapes = [args.encode] + ([0] if args.compare_encode_on_prefill else [])
    results = [(encoders, _launched(args, extra, model, encoders, image_token_id)) for encoders in shapes]
    for encoders, (timings, wall) in results:
        where = f"{encoders} encode worker(s)" if encoders else "images encoded on prefill"
        report(timings, wall, args, f"{args.prefill} prefill, {args.decode} decode, {where}")
    return 0


def _launched(args: argparse.Namespace, extra: list[str], model: str | None, encoders: int,
              image_token_id: int | None) -> tuple[list[RequestTiming], float]:
    from deploy.local import ClusterSpec, LocalCluster
    from worker.config import free_port
    spec = ClusterSpec(num_encode=encoders, num_prefill=args.prefill, num_decode=args.decode, port=free_port(),
                       grpc_port=free_port(), model=model, worker_args=tuple(_without(extra, "--model")),
                       encode_args=tuple(shlex.split(args.encode_args)),
                       log_dir=args.log_dir)
    with LocalCluster(spec) as cluster:
        return asyncio.run(run_load(cluster.grpc_address, args, image_token_id))


def _image_token_id(model: str | None) -> int:
    from engine.multimodal import read_multimodal_info
    from engine.model_path import resolve_model_path
    info = read_multimodal_info(resolve_model_path(model)) if model else None
    if info is None:
        raise SystemExit("--images needs --model DIR of a vision-language (LLaVA-format) checkpoint after --")
    return info.image_token_id


def _flag(extra: list[str], name: str) -> str | None:
    return extra[extra.index(name) + 1] if name in extra else None


def _without(extra: list[str], name: str) -> list[str]:
    if name not in extra:
        return extra
    index = extra.index(name)
    return extra[:index] + extra[index + 2:]


if __name__ == "__main__":
    sys.exit(main())
