"""`epd bench`: load against a running router, over HTTP (default) or gRPC.

    epd bench --url http://127.0.0.1:8000 --num-requests 200 --request-rate 4 --output-dir out
    epd bench --url 127.0.0.1:50051 --grpc --concurrency 16 --workload shared-prefix
    epd bench --url http://127.0.0.1:8000 --request-rate-sweep 1,2,4,8 --slo ttft=500ms,itl=50ms
    epd bench --url http://127.0.0.1:8000 --dataset sharegpt.jsonl --workload multi-turn

Prints a summary per run; with --output-dir, writes results.json (summaries and every
request) and PNG plots there.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.client.distributions import Distribution, DistributionError
from bench.client.report import Slo, SloError, Summary, format_summary, request_records, summarize
from bench.client.runner import LoadShape, Progress, RunResult, run
from bench.client.transport import GrpcTransport, HttpTransport, Sampling, Transport
from bench.client.workloads import WORKLOADS, DatasetError, WorkloadSpec, build


@dataclass(frozen=True)
class BenchOptions:
    url: str
    grpc: bool
    api_key: str | None
    model: str | None
    workload: WorkloadSpec
    shapes: tuple[LoadShape, ...]
    slo: Slo
    sampling: Sampling
    timeout_s: float
    warmup: int
    image_token: str
    output_dir: Path | None
    progress: bool
    command: str


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark a running router (latency percentiles, throughput, goodput)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="router HTTP URL (http://HOST:PORT), or HOST:PORT with --grpc")
    p.add_argument("--grpc", action="store_true", help="use the gRPC API instead of the OpenAI HTTP API")
    p.add_argument("--api-key", default=None, help="user API key (default: $EPD_API_KEY's first key)")
    p.add_argument("--model", default=None, help="model name to send (default: the router's, from /v1/models)")
    load = p.add_argument_group("load (one of; default: --request-rate inf)")
    shape = load.add_mutually_exclusive_group()
    shape.add_argument("--request-rate", default=None, help="open loop: Poisson arrivals per second, or inf")
    shape.add_argument("--request-rate-sweep", default=None, metavar="R1,R2,...",
                       help="open loop, one run per rate (plots throughput and SLO attainment against rate)")
    shape.add_argument("--concurrency", type=int, default=None, help="closed loop: conversations in flight")
    w = p.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="random")
    w.add_argument("--dataset", type=Path, default=None,
                   help="JSONL of ShareGPT-style conversations ({\"conversations\": [{\"from\": \"human\", ...}]})")
    w.add_argument("--num-requests", type=int, default=100, help="conversations to send (one request each, "
                   "except multi-turn)")
    w.add_argument("--input-len", default="256", help="prompt tokens (chat workloads: words): a distribution, "
                   "e.g. 256, uniform:64:512, normal:256:64, lognormal:256:0.5, exponential:256")
    w.add_argument("--output-len", default="64", help="output tokens asked for: a distribution")
    w.add_argument("--prefix-groups", type=int, default=4, help="shared-prefix: distinct prefixes")
    w.add_argument("--prefix-len", default="128", help="shared-prefix: prefix tokens (a distribution)")
    w.add_argument("--turns", default="3", help="multi-turn: turns per conversation (a distribution)")
    w.add_argument("--images", type=int, default=1, help="multimodal: images per request")
    w.add_argument("--image-size", type=int, default=64, help="multimodal: pixels per side of each random image")
    w.add_argument("--distinct-images", type=int, default=0, help="multimodal: different images (0: all differ)")
    w.add_argument("--image-token", default="<image>", help="gRPC: the model's image placeholder text")
    w.add_argument("--vocab", type=int, default=500, help="random token ids are drawn below this")
    w.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", default="", help="goodput bounds, e.g. ttft=500ms,itl=50ms,tpot=0.05,e2e=10")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--allow-eos", action="store_true", help="let requests stop at EOS (default: exact lengths)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--warmup", type=int, default=0, help="requests sent (not measured) before each run")
    p.add_argument("--output-dir", type=Path, default=None, help="write results.json and PNG plots here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=bench_main, usage_error=p.error)


def _shapes(args: argparse.Namespace) -> tuple[LoadShape, ...]:
    if args.concurrency is not None:
        if args.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        return (LoadShape(concurrency=args.concurrency),)
    texts = args.request_rate_sweep.split(",") if args.request_rate_sweep else [args.request_rate or "inf"]
    rates = []
    for text in texts:
        try:
            rate = float(text)
        except ValueError:
            raise ValueError(f"request rate {text!r} is not a number (or inf)") from None
        if not rate > 0 or math.isnan(rate):
            raise ValueError(f"request rate {text!r} must be positive")
        rates.append(rate)
    return tuple(LoadShape(request_rate=r) for r in rates)


def _workload(args: argparse.Namespace) -> WorkloadSpec:
    for name in ("num_requests", "prefix_groups", "images", "image_size", "vocab"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.vocab <= 10:
        raise ValueError("--vocab must be above 10 (ids below 10 are left out)")
    if args.dataset is not None and args.workload not in ("random", "multi-turn"):
        raise ValueError(f"--dataset goes with the default workload or multi-turn, not {args.workload}")
    if args.dataset is not None and not args.dataset.is_file():
        raise ValueError(f"--dataset {args.dataset}: no such file")
    return WorkloadSpec(kind=args.workload, num_requests=args.num_requests,
                        input_len=Distribution.parse(args.input_len), output_len=Distribution.parse(args.output_len),
                        seed=args.seed, vocab=args.vocab, prefix_groups=args.prefix_groups,
                        prefix_len=Distribution.parse(args.prefix_len), turns=Distribution.parse(args.turns),
                        images_per_request=args.images, image_size=args.image_size,
                        distinct_images=args.distinct_images, dataset=args.dataset)


def options_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> BenchOptions:
    """Checked options; a bad flag raises ValueError with the message to show."""
    url = args.url.strip()
    if args.grpc:
        url = url.removeprefix("grpc://")
        if "://" in url or ":" not in url:
            raise ValueError(f"--url {args.url!r}: with --grpc, give the router's gRPC HOST:PORT")
    elif not url.startswith(("http://", "https://")):
        raise ValueError(f"--url {args.url!r} must start with http:// or https:// (or pass --grpc)")
    if args.timeout <= 0 or args.warmup < 0:
        raise ValueError("--timeout must be positive and --warmup not negative")
    api_key = args.api_key or (os.environ.get("EPD_API_KEY", "").split(",")[0].strip() or None)
    command = "epd bench " + shlex.join(argv if argv is not None else sys.argv[2:])
    return BenchOptions(url, args.grpc, api_key, args.model, _workload(args), _shapes(args), Slo.parse(args.slo),
                        Sampling(args.temperature, not args.allow_eos), args.timeout, args.warmup, args.image_token,
                        args.output_dir, not args.no_progress, command)


def bench_main(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
    except (ValueError, DistributionError, SloError) as exc:
        args.usage_error(str(exc))
    try:
        return asyncio.run(run_bench(options))
    except DatasetError as exc:
        args.usage_error(str(exc))
    except RouterUnreachable as exc:
        print(f"epd bench: {exc}", file=sys.stderr)
        return 1


class RouterUnreachable(RuntimeError):
    """The router did not answer before the benchmark started."""


async def _transport(options: BenchOptions, concurrency: int) -> Transport:
    if options.grpc:
        transport: Transport = GrpcTransport(options.url, options.api_key, options.timeout_s, options.sampling,
                                             options.image_token)
        return transport
    http = HttpTransport(options.url, options.model, options.api_key, options.timeout_s, options.sampling,
                         max(concurrency, 1))
    try:
        await http.resolve_model()
    except Exception as exc:  # noqa: BLE001 - any failure here means: no usable router
        await http.close()
        raise RouterUnreachable(f"cannot list models at {options.url}/v1/models: {exc}") from None
    return http


def _concurrency_bound(options: BenchOptions) -> int:
    if options.shapes[0].concurrency is not None:
        return options.shapes[0].concurrency
    return min(4096, options.workload.num_requests)


async def run_bench(options: BenchOptions) -> int:
    conversations = build(options.workload)
    transport = await _transport(options, _concurrency_bound(options))
    results: list[RunResult] = []
    try:
        for index, shape in enumerate(options.shapes):
            if options.warmup:
                await _warmup(options, transport, index)
            total = sum(len(c.turns) for c in conversations)
            progress = Progress(total, shape.label, options.progress)
            results.append(await run(conversations, transport, shape, progress, options.workload.seed + index))
    finally:
        await transport.close()
    summaries = [summarize(r, options.slo) for r in results]
    print(f"command: {options.command}")
    for summary in summaries:
        print(format_summary(summary), flush=True)
    if options.output_dir is not None:
        write_results(options, results, summaries)
    return 0 if any(s.completed for s in summaries) else 1


async def _warmup(options: BenchOptions, transport: Transport, index: int) -> None:
    spec = WorkloadSpec(**{**asdict(options.workload), "num_requests": options.warmup,
                           "seed": options.workload.seed + 7919 + index})
    warm = build(spec)
    await run(warm, transport, LoadShape(concurrency=min(len(warm), 8)), Progress(0, "warmup", False))


def write_results(options: BenchOptions, results: list[RunResult], summaries: list[Summary]) -> None:
    from bench.client.plots import PlotsUnavailable, write_plots
    directory = options.output_dir
    assert directory is not None
    directory.mkdir(parents=True, exist_ok=True)
    body = {"command": options.command, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": _config(options),
            "runs": [{"summary": s.to_dict(), "requests": request_records(r)} for s, r in zip(summaries, results)]}
    path = directory / "results.json"
    path.write_text(json.dumps(body, indent=1) + "\n")
    print(f"wrote {path}")
    try:
        for plot in write_plots(results, summaries, directory):
            print(f"wrote {plot}")
    except PlotsUnavailable as exc:
        print(f"epd bench: {exc}", file=sys.stderr)


def _config(options: BenchOptions) -> dict[str, Any]:
    w = options.workload
    return {"url": options.url, "api": "grpc" if options.grpc else "http", "model": options.model,
            "workload": w.kind, "dataset": str(w.dataset) if w.dataset else None, "num_requests": w.num_requests,
            "input_len": str(w.input_len), "output_len": str(w.output_len), "seed": w.seed,
            "shapes": [s.label for s in options.shapes], "slo": options.slo.to_dict(),
            "temperature": options.sampling.temperature, "ignore_eos": options.sampling.ignore_eos}
