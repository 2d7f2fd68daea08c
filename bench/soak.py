"""Soak benchmark: steady load on a real local cluster for a long time, and whether the
router's and the workers' memory stays flat.

    python -m bench.soak [--prefill 1] [--decode 1] [--duration 600] [--warmup 60]
                         [--load-fraction 0.8] [--max-tokens 32] [--sample-interval 5]
                         [--log-dir DIR] [--model DIR]

1. Starts a cluster with the project's launcher (deploy/local.py: router, prefill and
   decode workers as separate processes on CPU, the built-in tiny model by default).
2. Capacity: a closed loop of `--capacity-concurrency` callers for `--capacity-duration`
   seconds; completed requests/s after a short ramp is the cluster's capacity.
3. Steady load: Poisson arrivals at `--load-fraction` x capacity for `--warmup` +
   `--duration` seconds, a mix of HTTP (SSE) and gRPC streams with varied prompts
   (bench/soak_load.py). Every request must stream exactly `--max-tokens` tokens.
4. Every `--sample-interval` seconds, and exactly at the end of warm-up and at the end of
   the load, the RSS of each process tree (router, each worker, with their children) is
   read from /proc (bench/rss.py) and appended to `LOG_DIR/rss.csv`.
5. Per process: RSS at the end of warm-up and at the end, the max, growth after warm-up
   (end vs end of warm-up) and a least-squares slope over the post-warm-up samples; a
   PASS line when growth is under `--max-growth-pct` (5), else FAIL.

Exit status 1 when a process grew by the limit or more, a request failed, or a process
died; 2 for bad flags; 130 on Ctrl-C or SIGTERM (the cluster is stopped in every case).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from bench.client.report import percentile
from bench.rss import Growth, RssLog, growth
from bench.soak_load import Client, Mix, OpenLoopPlan, Result, capacity_rate, closed_loop, open_loop
from deploy.local import ClusterSpec, LocalCluster
from engine.model_path import resolve_model_path
from worker.config import free_port

DRAIN_GRACE_S = 5.0  # beyond the request timeout, for in-flight requests at the end of a phase
PROGRESS_EVERY_S = 60.0  # a status line this often during the run


class Monitor:
    """Samples the RSS of every cluster process; notes any process that died."""

    def __init__(self, cluster: LocalCluster, log: RssLog, interval_s: float) -> None:
        self.cluster, self.log, self.interval_s = cluster, log, interval_s
        self.phase = "capacity"
        self.dead: list[str] = []  # "name (exit code)" of each process that died
        self._dead_names: set[str] = set()
        self.origin = time.perf_counter()
        self.requests: Callable[[], str] = lambda: ""  # the client's counts, for the progress line

    def roots(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.cluster.live_processes()}

    def sample(self, phase: str | None = None) -> None:
        """One sample of every tree; `phase` also becomes the label of the ones after it."""
        self.phase = phase or self.phase
        for name, proc in self.cluster.live_processes():
            if proc.poll() is not None and name not in self._dead_names:
                self._dead_names.add(name)
                self.dead.append(f"{name} (exit {proc.returncode})")
        self.log.take(time.perf_counter() - self.origin, self.phase, self.roots())

    def progress(self) -> None:
        latest = {s.process: s.rss_kib for s in self.log.samples[-len(self.cluster.processes):]}
        rss = ", ".join(f"{name} {kib / 1024:.1f}" for name, kib in latest.items())
        print(f"[{time.perf_counter() - self.origin:6.0f} s] {self.phase}: RSS MiB {rss}; {self.requests()}",
              flush=True)

    def stopped(self) -> bool:
        return bool(self.dead)

    async def run(self) -> None:
        """Sample on a fixed grid from the start until cancelled."""
        ticks, progress_every = 0, max(1, round(PROGRESS_EVERY_S / self.interval_s))
        while True:
            self.sample()
            ticks += 1
            if ticks % progress_every == 0:
                self.progress()
            await asyncio.sleep(max(0.0, self.origin + ticks * self.interval_s - time.perf_counter()))


@dataclass(frozen=True)
class Steady:
    target_rate: float
    window_start: float  # perf_counter at the end of warm-up
    window_end: float  # ... at the end of the load
    max_in_flight: int
    unfinished: int  # requests still running DRAIN_GRACE_S after their timeout


@dataclass(frozen=True)
class Outcome:
    capacity: float  # completed requests/s, closed loop
    steady: Steady | None  # None when the capacity phase failed
    results: list[Result]
    growths: dict[str, Growth | None]
    dead: list[str]


async def measure_capacity(client: Client, monitor: Monitor, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    await closed_loop(client, args.capacity_concurrency, args.capacity_duration, monitor.stopped)
    ramp = min(5.0, args.capacity_duration / 4)  # the first seconds fill the batch
    return capacity_rate(client.results, start, start + args.capacity_duration, ramp)


async def steady_load(client: Client, monitor: Monitor, rate: float, args: argparse.Namespace) -> Steady:
    start = time.perf_counter()
    monitor.sample("warmup")

    async def end_of_warmup() -> None:
        await asyncio.sleep(args.warmup)
        monitor.sample("measure")  # the window's first sample, exactly at the end of warm-up

    marker = asyncio.create_task(end_of_warmup())
    plan = OpenLoopPlan(rate, args.warmup + args.duration, args.seed + 1,
                        lambda arrival_s: "measure" if arrival_s >= args.warmup else "warmup", monitor.stopped)
    in_flight, most = await open_loop(client, plan)
    end = time.perf_counter()
    if not marker.done():  # a process died during warm-up: no window
        marker.cancel()
    monitor.sample("measure")  # the window's last sample: the end of the load, still under load
    monitor.phase = "drain"
    pending: set[asyncio.Task[Result]] = set()
    if in_flight:
        _, pending = await asyncio.wait(in_flight, timeout=args.request_timeout + DRAIN_GRACE_S)
    for task in pending:
        task.cancel()
    monitor.sample()
    return Steady(rate, start + args.warmup, end, most, len(pending))


async def soak(cluster: LocalCluster, args: argparse.Namespace, log: RssLog) -> Outcome:
    monitor = Monitor(cluster, log, args.sample_interval)
    sampler = asyncio.create_task(monitor.run())
    mix = Mix(args.seed, args.max_tokens)
    try:
        async with Client(cluster.http_url, cluster.grpc_address, mix, args.request_timeout) as client:
            monitor.requests = lambda: (f"{len(client.results)} requests done, "
                                        f"{sum(r.error is not None for r in client.results)} failed")
            capacity = await measure_capacity(client, monitor, args)
            print(f"capacity: {capacity:.2f} req/s", flush=True)
            steady = None
            if capacity > 0 and not monitor.dead:
                print(f"steady load: {args.load_fraction * capacity:.2f} req/s for {args.warmup:g} s warm-up "
                      f"+ {args.duration:g} s", flush=True)
                steady = await steady_load(client, monitor, args.load_fraction * capacity, args)
    finally:
        sampler.cancel()
    window = [s for s in log.samples if s.phase == "measure"]
    growths = {name: growth(name, window) for name in cluster.processes}
    return Outcome(capacity, steady, client.results, growths, monitor.dead)


# -- the report ---------------------------------------------------------------------------


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _ms(values: list[float], q: float) -> str:
    value = percentile(values, q)
    return "-" if value is None else f"{value * 1e3:.0f}"


def print_load(outcome: Outcome, args: argparse.Namespace) -> None:
    capacity_runs = [r for r in outcome.results if r.phase == "capacity"]
    print(f"capacity: {outcome.capacity:.2f} req/s (closed loop, concurrency {args.capacity_concurrency}, "
          f"{args.capacity_duration:g} s, {len(capacity_runs)} requests, "
          f"{sum(r.error is not None for r in capacity_runs)} failed)")
    steady = outcome.steady
    if steady is None:
        return
    measured = [r for r in outcome.results if r.phase == "measure"]
    ok = [r for r in measured if r.error is None]
    window = steady.window_end - steady.window_start
    by_kind = ", ".join(f"{k} {sum(r.kind == k for r in measured)}" for k in sorted({r.kind for r in measured}))
    print(f"load: target {steady.target_rate:.2f} req/s ({args.load_fraction:g} x capacity, Poisson), "
          f"{args.warmup:g} s warm-up + {args.duration:g} s measured")
    print(f"achieved: {len(measured) / window:.2f} req/s sent, {len(ok) / window:.2f} req/s completed over "
          f"{window:.0f} s ({len(measured)} requests: {by_kind}); max in flight {steady.max_in_flight}")
    e2e, ttft = [r.e2e_s for r in ok], [r.ttft_s for r in ok if r.ttft_s is not None]
    print(f"latency (measured window, ms): e2e p50 {_ms(e2e, 50)} p99 {_ms(e2e, 99)}; "
          f"TTFT p50 {_ms(ttft, 50)} p99 {_ms(ttft, 99)}")


def print_errors(outcome: Outcome) -> int:
    failed = [r for r in outcome.results if r.error is not None]
    unfinished = outcome.steady.unfinished if outcome.steady else 0
    print(f"errors: {len(failed) + unfinished} ({len(failed)} failed, {unfinished} unfinished "
          f"of {len(outcome.results) + unfinished} requests)")
    counts: dict[str, int] = {}
    for r in failed:
        counts[r.error or ""] = counts.get(r.error or "", 0) + 1
    for message, count in sorted(counts.items(), key=lambda item: -item[1])[:5]:
        print(f"  {count} x {message[:200]}")
    return len(failed) + unfinished


def print_memory(outcome: Outcome, limit_pct: float) -> bool:
    """The RSS table and a verdict per process; True when every process passed."""
    print("| process | RSS end of warm-up MiB | RSS end MiB | max MiB | growth % | slope MiB/min | samples |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, g in outcome.growths.items():
        if g is not None:
            print(f"| {name} | {_mib(g.warm_kib)} | {_mib(g.end_kib)} | {_mib(g.max_kib)} | {g.growth_pct:+.2f} "
                  f"| {g.slope_mib_per_min:+.3f} | {g.samples} |")
    passed = True
    for name, g in outcome.growths.items():
        if g is None:
            print(f"FAIL {name}: fewer than two samples after warm-up")
            passed = False
            continue
        ok = g.growth_pct < limit_pct
        passed &= ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: RSS {g.growth_pct:+.2f}% after warm-up "
              f"({'<' if ok else '>='} {limit_pct:g}%), slope {g.slope_mib_per_min:+.3f} MiB/min")
    return passed


def report(outcome: Outcome, args: argparse.Namespace, command: str, log: RssLog) -> int:
    print("\n== soak summary ==")
    print_load(outcome, args)
    errors = print_errors(outcome)
    memory_ok = print_memory(outcome, args.max_growth_pct)
    for name in outcome.dead:
        print(f"FAIL {name} died during the run")
    passed = memory_ok and errors == 0 and not outcome.dead and outcome.steady is not None
    print(f"RESULT: {'PASS' if passed else 'FAIL'}")
    print(f"samples: {log.path}; process logs: {Path(log.path).parent}")
    print(f"command: {command}")
    return 0 if passed else 1


# -- the command ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default=None, help="checkpoint directory (default: the built-in tiny model)")
    add("--prefill", type=int, default=1, help="prefill workers")
    add("--decode", type=int, default=1, help="decode workers")
    add("--duration", type=float, default=600.0, help="seconds of steady load after warm-up (the measured window)")
    add("--warmup", type=float, default=60.0, help="seconds of steady load before the measured window")
    add("--load-fraction", type=float, default=0.8, help="steady request rate as a fraction of measured capacity")
    add("--max-tokens", type=int, default=32, help="output tokens per request (exact: ignore_eos)")
    add("--sample-interval", type=float, default=5.0, help="seconds between RSS samples")
    add("--log-dir", default=None, help="rss.csv and the processes' logs (default: a new temporary directory)")
    add("--capacity-duration", type=float, default=30.0, help="seconds of the closed-loop capacity run")
    add("--capacity-concurrency", type=int, default=64,
        help="callers in the capacity run (64: a decode worker's default --max-num-seqs, a full batch)")
    add("--max-growth-pct", type=float, default=5.0, help="RSS growth after warm-up that fails a process")
    add("--request-timeout", type=float, default=60.0, help="seconds one request may take, stream included")
    add("--start-timeout", type=float, default=180.0, help="seconds for the cluster to become ready")
    add("--seed", type=int, default=0, help="prompts and arrival times")
    args = parser.parse_args(argv)
    if args.prefill < 0 or args.decode < 1:
        parser.error("--decode must be at least 1 and --prefill at least 0")
    if min(args.duration, args.sample_interval, args.capacity_duration, args.request_timeout) <= 0:
        parser.error("--duration, --sample-interval, --capacity-duration and --request-timeout must be positive")
    if args.warmup < 0 or not 0 < args.load_fraction <= 1.5 or args.max_tokens < 1 or args.capacity_concurrency < 1:
        parser.error("--warmup must be >= 0, --load-fraction in (0, 1.5], --max-tokens and "
                     "--capacity-concurrency >= 1")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the run as Ctrl-C does: the cluster is stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="epd-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"# {command}\n# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, model {args.model or 'built-in tiny'}, {args.prefill} prefill + "
          f"{args.decode} decode, max_tokens {args.max_tokens}, logs in {log_dir}", flush=True)
    # Resolved here, once: the built-in checkpoint is written (with torch) by this process, not
    # by the router, whose memory would then hold torch for the whole run.
    model = str(resolve_model_path(args.model))
    spec = ClusterSpec(num_prefill=args.prefill, num_decode=args.decode, port=free_port(), grpc_port=free_port(),
                       model=model, log_dir=str(log_dir))
    cluster, log = LocalCluster(spec), RssLog(log_dir / "rss.csv")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start(args.start_timeout)
        print(f"cluster ready: {cluster.http_url} (HTTP), {cluster.grpc_address} (gRPC)", flush=True)
        outcome = asyncio.run(soak(cluster, args, log))
        return report(outcome, args, command, log)
    except KeyboardInterrupt:
        print("interrupted: stopping the cluster", file=sys.stderr)
        return 130
    except (TimeoutError, RuntimeError) as exc:  # the cluster did not start
        print(f"soak: {exc} (process logs in {log_dir})", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        log.close()


if __name__ == "__main__":
    sys.exit(main())
