"""Serving benchmark: a load generator against the router's gRPC API (the GPU scripts'
driver; `epd bench` is the user-facing client and shares its code, bench/client/).

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
from pathlib import Path

from bench.client.report import percentile
from bench.client.transport import GrpcTransport, Outgoing, RequestTiming, Sampling
from bench.client.workloads import Turn, random_png


async def _one(transport: GrpcTransport, prompt: list[int], output_len: int, images: list[bytes]) -> RequestTiming:
    timing = RequestTiming(time.perf_counter())
    await transport.send(Outgoing(Turn(output_len, tuple(prompt), images=tuple(images))), timing)
    return timing


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
    transport = GrpcTransport(address, None, args.timeout, Sampling(temperature=0.0, ignore_eos=True))
    try:
        async def bounded(prompt: list[int], images: list[bytes]) -> RequestTiming:
            async with limit:
                return await _one(transport, prompt, args.output_len, images)

        if warmup:  # first uses compile kernels and load the vision tower: not measured
            await asyncio.gather(*(bounded(p, i) for p, i in warmup))
        start = time.perf_counter()
        timings = await asyncio.gather(*(bounded(p, i) for p, i in requests))
        return list(timings), time.perf_counter() - start
    finally:
        await transport.close()


def _pct(values: list[float], q: float) -> float:
    found = percentile(values, q)
    return float("nan") if found is None else found


def report(timings: list[RequestTiming], wall: float, args: argparse.Namespace, title: str = "") -> dict[str, float]:
    """Print the figures; returns the ones the offline baseline is compared with."""
    if title:
        print(f"--- {title}")
    ok = [t for t in timings if t.ok]
    errors = [t.error for t in timings if t.error is not None]
    out_tokens = sum(t.output_tokens for t in ok)
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
    # A message carrying several tokens gives them one arrival time: zero gaps after the
    # first. Their share says how far the stream fell behind the engine.
    merged = sum(1 for x in itls if x == 0.0)
    print(f"tokens that arrived in one message with the token before: {merged} of {len(itls)} gaps "
          f"({merged / max(1, len(itls)):.1%})")
    return {"output_tokens_per_s": out_tokens / wall, "ttft_p50_s": _pct(ttfts, 50), "itl_p50_s": _pct(itls, 50),
            "itl_p99_s": _pct(itls, 99)}


def offline_baseline(args: argparse.Namespace, extra: list[str]) -> dict[str, float]:
    """The same requests through the engine alone (bench/offline_baseline.py), in a child
    process that exits before the cluster starts. At concurrency 1 only the single-request
    figures are taken (LLM.generate of every request at once compares with a loaded run)."""
    import json
    import subprocess
    own = ["--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
           "--output-len", str(args.output_len), "--vocab", str(args.vocab), "--seed", str(args.seed)]
    if args.concurrency == 1:
        own.append("--skip-throughput")
    done = subprocess.run([sys.executable, "-m", "bench.offline_baseline", *own, "--", *extra],
                          stdout=subprocess.PIPE, text=True, check=True)
    lines = done.stdout.strip().splitlines()
    print(*lines[:-1], sep="\n", flush=True)
    if args.log_dir:  # every step's time and shape, for a look at the tail afterwards
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.log_dir) / "offline.json").write_text(lines[-1] + "\n")
    return json.loads(lines[-1])


def compare(served: dict[str, float], offline: dict[str, float]) -> None:
    print("--- served against the engine alone (same requests, same engine flags, same run)")
    step, first = offline["step_s"], offline["first_token_s"]
    print(f"ITL p50 {served['itl_p50_s'] * 1e3:.3f} ms / engine step {step * 1e3:.3f} ms = "
          f"{served['itl_p50_s'] / step:.3f}")
    print(f"TTFT p50 {served['ttft_p50_s'] * 1e3:.2f} ms / engine first token {first * 1e3:.2f} ms = "
          f"{served['ttft_p50_s'] / first:.3f}")
    if "output_tokens_per_s" in offline:
        rate = offline["output_tokens_per_s"]
        print(f"output tokens/s {served['output_tokens_per_s']:.1f} / LLM.generate {rate:.1f} = "
              f"{served['output_tokens_per_s'] / rate:.3f}; ITL p99 {served['itl_p99_s'] * 1e3:.1f} ms")
    if "engine_itl_p99_s" in offline:
        print(f"ITL p50 / p99 served {served['itl_p50_s'] * 1e3:.1f} / {served['itl_p99_s'] * 1e3:.1f} ms; "
              f"engine alone under LLM.generate {offline['engine_itl_p50_s'] * 1e3:.1f} / "
              f"{offline['engine_itl_p99_s'] * 1e3:.1f} ms")


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
    parser.add_argument("--router-args", default="", help="extra flags of the router (with --launch; one string)")
    parser.add_argument("--warmup", type=int, default=0, help="requests sent (other prompts and images) "
                        "before the measured ones, on each cluster")
    parser.add_argument("--images", type=int, default=0, help="images per request (a vision-language model)")
    parser.add_argument("--image-size", type=int, default=336, help="pixels per side of each random image")
    parser.add_argument("--distinct-images", type=int, default=0, help="different images in the workload (0: all)")
    parser.add_argument("--offline-baseline", action="store_true",
                        help="with --launch: first run the same requests through the engine alone "
                             "(bench/offline_baseline.py, same engine flags) and print the served figures "
                             "against it")
    parser.add_argument("--ttft-ladder", type=int, default=0, metavar="N",
                        help="with --launch: after the load, N single requests (--input-len in, 2 out), "
                             "each sent through the router and straight to decode-0 over its DecodeWorker.Stream, "
                             "alternating: the first token's time on each path (where TTFT goes)")
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
    offline = offline_baseline(args, extra) if args.offline_baseline else None
    shapes = [args.encode] + ([0] if args.compare_encode_on_prefill else [])
    results = [(encoders, _launched(args, extra, model, encoders, image_token_id)) for encoders in shapes]
    for encoders, (timings, wall) in results:
        where = f"{encoders} encode worker(s)" if encoders else "images encoded on prefill"
        served = report(timings, wall, args, f"{args.prefill} prefill, {args.decode} decode, {where}")
        if offline is not None:
            compare(served, offline)
    return 0


def _launched(args: argparse.Namespace, extra: list[str], model: str | None, encoders: int,
              image_token_id: int | None) -> tuple[list[RequestTiming], float]:
    from deploy.local import ClusterSpec, LocalCluster
    from worker.config import free_port
    spec = ClusterSpec(num_encode=encoders, num_prefill=args.prefill, num_decode=args.decode, port=free_port(),
                       grpc_port=free_port(), model=model, worker_args=tuple(_without(extra, "--model")),
                       encode_args=tuple(shlex.split(args.encode_args)),
                       router_args=tuple(shlex.split(args.router_args)), log_dir=args.log_dir)
    with LocalCluster(spec) as cluster:
        result = asyncio.run(run_load(cluster.grpc_address, args, image_token_id))
        if args.ttft_ladder:
            asyncio.run(ttft_ladder(cluster.grpc_address, cluster.worker_addresses["decode-0"], args))
        return result


async def ttft_ladder(router: str, decode: str, args: argparse.Namespace) -> None:
    """Single requests at an idle cluster, alternately through the router (the client's
    path) and straight to the decode worker over one DecodeWorker.Stream (the router's own
    path to it): the time to the first token on each, median over `--ttft-ladder`
    requests of fresh prompts (no cache hits). Their difference is the router's part of
    TTFT; the direct figure minus the engine's first token is the worker's."""
    import grpc

    from proto import epd_pb2 as pb
    from proto import epd_pb2_grpc as pb_grpc
    from router.decode_mux import DecodeMux
    rng = random.Random(args.seed + 104729)
    transport = GrpcTransport(router, None, args.timeout, Sampling(temperature=0.0, ignore_eos=True))
    channel = grpc.aio.insecure_channel(decode)
    mux = DecodeMux(pb_grpc.DecodeWorkerStub(channel), "decode-0")
    times: dict[str, list[float]] = {"router": [], "direct": []}

    def prompt() -> list[int]:
        return [rng.randrange(10, args.vocab) for _ in range(args.input_len)]

    async def direct(index: int) -> float:
        request = pb.DecodeRequest(request_id=f"ladder-{index}", prompt_token_ids=prompt(),
                                   sampling=pb.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        start = time.perf_counter()
        call = mux.generate(request, args.timeout)
        first = None
        while (response := await call.read()) is not grpc.aio.EOF:
            if first is None and response.HasField("chunk") and response.chunk.token_ids:
                first = time.perf_counter() - start
        if first is None:
            raise RuntimeError("a direct request to decode-0 returned no token")
        return first

    async def routed() -> float:
        timing = await _one(transport, prompt(), 2, [])
        if not timing.ok:
            raise RuntimeError(f"a request through the router failed: {timing.error}")
        return timing.ttft

    try:
        for index in range(args.ttft_ladder):
            for path in (("router", "direct") if index % 2 else ("direct", "router")):
                times[path].append(await (routed() if path == "router" else direct(index)))
    finally:
        mux.close()
        await channel.close()
        await transport.close()
    med = {path: statistics.median(values) * 1e3 for path, values in times.items()}
    print(f"TTFT ladder ({args.ttft_ladder} single requests each, alternating, {args.input_len} in): "
          f"through the router p50 {med['router']:.2f} ms, straight to decode-0 p50 {med['direct']:.2f} ms, "
          f"the router's part {med['router'] - med['direct']:.2f} ms", flush=True)


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
