"""Our router against sglang-router, in front of stub workers that answer at once.

    python -m bench.router_bench [--modes regular,pd] [--rounds 2] [--tokens 32]
                                 [--pairs 200] [--concurrency 64 --concurrency 256]
                                 [--warmup 1] [--measure 3] [--only ours|sglang]

Both routers serve the same OpenAI streaming chat completions (`POST
/v1/chat/completions`, `stream: true`, `--tokens` output tokens) to the same client
(`bench/router_client.py`: raw keep-alive HTTP/1.1) from stub workers with no model
(`bench/router_stubs.py`): ours speak our worker protocol over gRPC and register with
the router like real workers, sglang's speak SGLang's HTTP API. `regular`: one
decode-only (aggregated) worker; `pd`: one prefill and one decode worker. Each router
runs as its own process with the same routing policy (`--policy`), logging warnings only.

Per mode, the routers take turns (ours, sglang, ours, sglang, ... for `--rounds`), each
turn measuring:
- added latency at concurrency 1: `--pairs` requests through the router, each followed
  by the same request straight to the stubs (ours: one `DecodeWorker.Stream` as the router uses;
  sglang: its HTTP API, prefill and decode at once in PD mode, as sglang-router calls
  them); the figure is a percentile of the router path minus the same percentile of the
  direct path, to the response's last byte;
- requests/s at each `--concurrency` (closed loop, `--warmup` s, then `--measure` s);
- router CPU per request: utime + stime of the router process (/proc/PID/stat, all
  threads) over the measuring window, divided by the requests completed in it; the
  stubs' CPU likewise, for scale (they share the machine's cores with router and client).
Every response of the latency phase and a sample of the others are checked: status 200,
`[DONE]`, and exactly the expected text. Start-to-ready is process start until `/health`
answers and until the first request is served (workers registered and healthy).
With `EPD_ROUTER_PROFILE=PREFIX` in the environment our router runs under `py-spy record`
(raw samples to PREFIX-MODE.txt; py-spy on the PATH): a profile of the whole run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bench.router_client import BenchError, StreamClient, closed_loop
from bench.router_client import check
from bench.router_procs import Proc, RouterSide, start_side
from engine.model_path import default_model_path
from engine.tokenizer import Tokenizer

SCRIPT = "The quick brown fox jumps over the lazy dog and serves tokens to the router. "
PROMPT = ("You are a helpful assistant. Summarise the design of a serving cluster that splits "
          "inference into encode, prefill and decode pools behind one router, in one paragraph. ") * 2
CHECK_EVERY = 25  # in load phases, each caller checks its first response and every 25th


@dataclass(frozen=True)
class Workload:
    body: bytes              # the chat completion request both routers get
    prompt_ids: list[int]    # its prompt as our router tokenizes it (direct gRPC calls)
    script_ids: list[int]    # what our decode stub streams, cycled
    script_texts: list[str]  # the same tokens' texts, what the SGLang stub streams
    expected: str            # the text of one response
    tokens: int


def make_workload(tokens: int) -> Workload:
    tokenizer = Tokenizer.from_pretrained(default_model_path())
    ids = tokenizer.encode(SCRIPT, add_special_tokens=False)
    texts = [tokenizer.decode([t]) for t in ids]
    cycled = [ids[i % len(ids)] for i in range(tokens)]
    expected = "".join(texts[i % len(ids)] for i in range(tokens))
    if tokenizer.decode(cycled) != expected:
        raise SystemExit("the script's tokens do not decode one by one to the same text")
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, True), add_special_tokens=False)
    body = json.dumps({"model": "tiny", "messages": messages, "max_tokens": tokens, "stream": True,
                       "temperature": 0}).encode()
    return Workload(body, prompt_ids, ids, texts, expected, tokens)


class SseCaller:
    """Streamed chat completions on one keep-alive connection; checks a sample."""

    def __init__(self, url: str, workload: Workload, check_every: int, timeout: float = 30.0) -> None:
        self._client = StreamClient(url)
        self._request = self._client.request_bytes(workload.body)
        self._expected = workload.expected
        self._every, self._count, self._timeout = check_every, 0, timeout

    async def __call__(self) -> None:
        response = await self._client.post(self._request, self._timeout)
        if self._count % self._every == 0:
            check(response, self._expected)
        self._count += 1

    def close(self) -> None:
        self._client.close()


@dataclass
class TurnResult:
    router: list[float] = field(default_factory=list)  # c=1 latencies through the router (s)
    direct: list[float] = field(default_factory=list)  # c=1 latencies straight to the stubs (s)
    c1_cpu: tuple[float, int] = (0.0, 0)               # router CPU seconds, requests (c=1)
    rps: dict[int, list[float]] = field(default_factory=dict)
    cpu: dict[int, tuple[float, int]] = field(default_factory=dict)       # router CPU s, requests
    stub_cpu: dict[int, tuple[float, int]] = field(default_factory=dict)  # stubs' CPU s, requests

    def merge(self, other: TurnResult) -> None:
        self.router += other.router
        self.direct += other.direct
        self.c1_cpu = (self.c1_cpu[0] + other.c1_cpu[0], self.c1_cpu[1] + other.c1_cpu[1])
        for c, values in other.rps.items():
            self.rps.setdefault(c, []).extend(values)
        for table, more in ((self.cpu, other.cpu), (self.stub_cpu, other.stub_cpu)):
            for c, (s, n) in more.items():
                old = table.get(c, (0.0, 0))
                table[c] = (old[0] + s, old[1] + n)


async def latency_phase(side: RouterSide, workload: Workload, pairs: int, result: TurnResult) -> None:
    caller = SseCaller(side.url, workload, 1)
    direct = side.direct_caller(workload)
    try:
        for _ in range(3):  # warm both paths (connections, first-call costs)
            await caller()
            await direct()
        before = side.router.cpu_seconds()
        for _ in range(pairs):
            began = time.perf_counter()
            await caller()
            result.router.append(time.perf_counter() - began)
            began = time.perf_counter()
            await direct()
            result.direct.append(time.perf_counter() - began)
        result.c1_cpu = (side.router.cpu_seconds() - before, pairs)
    finally:
        caller.close()
        direct.close()


async def load_phase(side: RouterSide, workload: Workload, concurrency: int, warmup: float, measure: float,
                     result: TurnResult) -> None:
    readings: dict[bool, tuple[float, float]] = {}

    def on_window(start: bool) -> None:
        readings.setdefault(start, (side.router.cpu_seconds(), sum(p.cpu_seconds() for p in side.stubs)))

    load = await closed_loop(lambda: SseCaller(side.url, workload, CHECK_EVERY), concurrency, warmup, measure,
                             on_window)
    on_window(False)
    (r0, s0), (r1, s1) = readings[True], readings[False]
    result.rps.setdefault(concurrency, []).append(load.requests_per_s)
    result.cpu[concurrency] = (r1 - r0, load.completed)
    result.stub_cpu[concurrency] = (s1 - s0, load.completed)


async def run_turn(side: RouterSide, workload: Workload, args: argparse.Namespace) -> TurnResult:
    result = TurnResult()
    await latency_phase(side, workload, args.pairs, result)
    for concurrency in args.concurrency:
        await load_phase(side, workload, concurrency, args.warmup, args.measure, result)
    return result


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@dataclass
class Row:
    mode: str
    router: str
    result: TurnResult
    ready: tuple[float, float]  # s from process start: /health answers, first request served

    def cells(self, concurrency: Sequence[int]) -> list[str]:
        r = self.result
        added = [1e3 * (percentile(r.router, q) - percentile(r.direct, q)) for q in (50, 99)]
        direct = [1e3 * percentile(r.direct, q) for q in (50, 99)]
        cells = [self.mode, self.router, f"{added[0]:.3f}", f"{added[1]:.3f}", f"{direct[0]:.3f} / {direct[1]:.3f}"]
        cells += [f"{statistics.mean(r.rps[c]):.0f}" for c in concurrency]
        cells += [_per_request(r.c1_cpu)] + [_per_request(r.cpu[c]) for c in concurrency]
        cells += [_per_request(r.stub_cpu[concurrency[-1]])]
        return cells + [f"{self.ready[0]:.2f} / {self.ready[1]:.2f}"]


def _per_request(cpu: tuple[float, int]) -> str:
    return f"{1e6 * cpu[0] / cpu[1]:.0f}" if cpu[1] else "-"


def print_table(rows: list[Row], concurrency: Sequence[int]) -> None:
    head = ["mode", "router", "added p50 ms", "added p99 ms", "direct p50 / p99 ms"]
    head += [f"req/s c={c}" for c in concurrency] + ["router CPU us/req c=1"]
    head += [f"router CPU us/req c={c}" for c in concurrency]
    head += [f"stubs CPU us/req c={concurrency[-1]}", "start: /health / first request (s)"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        print("| " + " | ".join(row.cells(concurrency)) + " |")


def _sglang_version() -> str:
    try:
        from importlib.metadata import version
        return version("sglang-router")
    except Exception:  # noqa: BLE001 - not installed
        return "not installed"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.router_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="regular,pd", help="comma-separated: regular, pd")
    parser.add_argument("--rounds", type=int, default=2, help="turns per router and mode, interleaved")
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--pairs", type=int, default=200, help="requests per turn at concurrency 1")
    parser.add_argument("--concurrency", type=int, action="append", default=None, help="load levels (64, 256)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each load window")
    parser.add_argument("--measure", type=float, default=3.0, help="seconds of each load window")
    parser.add_argument("--policy", default="round_robin", help="routing policy of both routers")
    parser.add_argument("--only", choices=("ours", "sglang"), default=None, help="run one router only")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.concurrency = args.concurrency or [64, 256]
    bad = [m for m in args.modes if m not in ("regular", "pd")]
    if bad or not args.modes:
        parser.error(f"--modes: expected regular and/or pd, got {args.modes}")
    if min(args.rounds, args.tokens, args.pairs, *args.concurrency) < 1 or args.measure <= 0 or args.warmup < 0:
        parser.error("--rounds, --tokens, --pairs and --concurrency must be at least 1, --measure positive")
    return args


async def run_mode(mode: str, workload: Workload, args: argparse.Namespace, logs: Path) -> list[Row]:
    names = [n for n in ("ours", "sglang") if args.only in (None, n)]
    sides: list[RouterSide] = []
    try:
        for name in names:
            sides.append(await start_side(name, mode, workload, args.policy, logs))
        totals = {side.name: TurnResult() for side in sides}
        for _ in range(args.rounds):
            for side in sides:  # interleaved: ours, sglang, ours, sglang, ...
                totals[side.name].merge(await run_turn(side, workload, args))
        return [Row(mode, s.label, totals[s.name], s.ready) for s in sides]
    finally:
        for side in sides:
            await side.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.only != "ours" and _sglang_version() == "not installed":
        print("sglang-router is not installed: pip install -e .[bench] (or pass --only ours)", file=sys.stderr)
        return 2
    workload = make_workload(args.tokens)
    command = "python -m bench.router_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"sglang-router {_sglang_version()}, policy {args.policy}, {args.tokens} output tokens, "
          f"{len(workload.prompt_ids)} prompt tokens")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="router-bench-") as logs:
        try:
            for mode in args.modes:
                rows += asyncio.run(run_mode(mode, workload, args, Path(logs)))
        except (BenchError, Proc.Failed) as exc:
            print(f"router_bench: {exc}", file=sys.stderr)
            for log in sorted(Path(logs).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            return 1
    print_table(rows, args.concurrency)
    return 0


if __name__ == "__main__":
    sys.exit(main())
