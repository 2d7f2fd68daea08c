"""The decode worker's serving cost per step, with a model that costs nothing: a CPU
proxy for what the served worker loses against the engine alone under load (issue 13
item 2).

    python -m bench.worker_loop [--requests 512] [--concurrency 256] [--prompt-len 32]
                                [--output-len 64] [--paths stream,generate] [--rounds 2]

A real decode worker process (gRPC server, AsyncEngine, DecodeService) runs with the
tiny model's forward replaced by `bench.host_overhead.NullModel` (fixed logits, no
compute), so its steps are host work only: scheduling, input preparation, sampling and
the read-back. The client (this process) sends `--requests` greedy requests,
`--concurrency` at once, straight to the worker: `stream` over one DecodeWorker.Stream
(`router.decode_mux.DecodeMux`, what the router does), `generate` one Generate call each
(`--no-decode-multiplex`). The same requests then run through the same null-model
engine alone (`engine.step()` in a loop, no server). Printed per path: output tokens/s
served and alone, their ratio, and the worker loop's step and gap between steps (its
event loop's turn: publishing outputs and sending them), from the worker's own
`LoopStats`. On a GPU the step is the model's and the gap adds to it; here the step is
small, so the gap's share is the serving path's cost made visible. Paths take turns for
`--rounds`. The CPU is not the GPU host's: compare paths and commits with each other,
not these figures with GPU ones. `EPD_WORKER_PROFILE=FILE` runs the worker under
`py-spy record` (raw samples to FILE).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 300.0


def engine_options(args: argparse.Namespace) -> dict[str, object]:
    pages_per_request = -(-(args.prompt_len + args.output_len + 8) // 16) + 1
    return {"page_size": 16, "num_pages": args.concurrency * pages_per_request + 64, "max_model_len": 4096,
            "max_num_seqs": args.concurrency, "max_num_batched_tokens": 8192, "overlap_schedule": True,
            "enable_prefix_cache": False}


def null_model(engine: object, rows: int) -> None:
    from bench.host_overhead import NullModel
    cfg = engine.model_config  # type: ignore[attr-defined]
    engine.runner.model = NullModel(cfg.hidden_size, min(16, cfg.vocab_size), rows)  # type: ignore[attr-defined]


# --- the worker process -------------------------------------------------------------

async def serve(args: argparse.Namespace) -> None:
    from decode_worker.server import serve_decode
    from engine.async_engine import LoopStats
    from worker.config import WorkerConfig
    totals = {"steps": 0, "step_s": 0.0, "gap_s": 0.0, "gaps": 0}
    record = LoopStats.record

    def counted(self: LoopStats, start: float, end: float) -> None:  # the bench's own totals (LoopStats resets)
        if self._last_end is not None:
            totals["gap_s"] += start - self._last_end
            totals["gaps"] += 1
        totals["steps"] += 1
        totals["step_s"] += end - start
        record(self, start, end)

    LoopStats.record = counted  # type: ignore[method-assign]
    worker = await serve_decode(WorkerConfig(role="decode", transfer="none", port=args.serve,
                                             engine_options=engine_options(args)))
    null_model(worker.engine, 8192)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: print("STATS " + json.dumps(totals), flush=True))
    loop.add_signal_handler(signal.SIGUSR2, lambda: totals.update(steps=0, step_s=0.0, gap_s=0.0, gaps=0))
    print(f"READY {worker.address} {os.getpid()}", flush=True)
    await stop.wait()
    await worker.stop()


# --- the client -----------------------------------------------------------------------

def prompts(args: argparse.Namespace, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(args.prompt_len)] for _ in range(args.requests)]


async def load(address: str, path: str, args: argparse.Namespace, seed: int) -> tuple[float, int]:
    """Output tokens/s of the requests sent straight to the worker, and their tokens."""
    import grpc

    from proto import epd_pb2 as pb
    from proto import epd_pb2_grpc as pb_grpc
    from router.decode_mux import DecodeMux
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.DecodeWorkerStub(channel)
    mux = DecodeMux(stub, "decode-0") if path == "stream" else None
    limit = asyncio.Semaphore(args.concurrency)
    sampling = pb.SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)

    async def one(index: int, prompt: list[int]) -> int:
        request = pb.DecodeRequest(request_id=f"{path}-{seed}-{index}", prompt_token_ids=prompt, sampling=sampling)
        async with limit:
            tokens = 0
            if mux is not None:
                call = mux.generate(request, REQUEST_TIMEOUT_S)
                while (response := await call.read()) is not grpc.aio.EOF:
                    tokens += len(response.chunk.token_ids)
            else:
                async for response in stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
                    tokens += len(response.chunk.token_ids)
        if tokens != args.output_len:
            raise RuntimeError(f"request {index} over {path}: {tokens} tokens, expected {args.output_len}")
        return tokens

    try:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts(args, seed)))))
        return tokens / (time.perf_counter() - start), tokens
    finally:
        if mux is not None:
            mux.close()
        await channel.close()


def alone(args: argparse.Namespace, seed: int) -> float:
    """Output tokens/s of the same requests through the same null-model engine, stepped
    in a loop with no server (up to `--concurrency` running, as the worker runs them)."""
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    options = engine_options(args)
    engine = Engine(None, device="cpu", **options)  # type: ignore[arg-type]
    null_model(engine, 8192)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    waiting = prompts(args, seed)
    tokens = 0
    start = time.perf_counter()
    while waiting or engine.has_unfinished_requests():
        while waiting and len(engine.requests) < args.concurrency:
            engine.add_request(waiting.pop(0), params)
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start)


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        argv = [sys.executable, "-m", "bench.worker_loop", "--serve", "0", "--concurrency", str(args.concurrency),
                "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len)]
        if os.environ.get("EPD_WORKER_PROFILE"):  # py-spy on the PATH: raw samples of the worker's whole run
            argv = ["py-spy", "record", "-r", "250", "-f", "raw", "-o", os.environ["EPD_WORKER_PROFILE"], "--"] + argv
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        # (the worker's pid: under py-spy the child of this process is py-spy)
        self.address, pid = self._line("READY ", START_TIMEOUT_S).split()
        self.pid = int(pid)

    def _line(self, prefix: str, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the worker exited ({self.proc.poll()}) before printing {prefix.strip()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"the worker printed no {prefix.strip()} line in {timeout:g} s")

    def reset(self) -> None:
        os.kill(self.pid, signal.SIGUSR2)
        time.sleep(0.2)

    def stats(self) -> dict[str, float]:
        os.kill(self.pid, signal.SIGUSR1)
        return json.loads(self._line("STATS ", 30.0))

    def stop(self) -> None:
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def rounds(worker: Worker, paths: list[str], args: argparse.Namespace,
                 rows: dict[str, list[tuple[float, float, float, float]]]) -> None:
    await load(worker.address, paths[0], args, seed=999)  # warm-up: first uses, not measured
    for round_ in range(args.rounds):
        for path in paths:
            seed = 1000 * round_ + len(rows[path])
            worker.reset()
            served, _ = await load(worker.address, path, args, seed)
            stats = worker.stats()
            offline = alone(args, seed)  # (blocks the loop: nothing else runs in it meanwhile)
            step_ms = stats["step_s"] / max(1, stats["steps"]) * 1e3
            gap_ms = stats["gap_s"] / max(1, stats["gaps"]) * 1e3
            rows[path].append((served, offline, step_ms, gap_ms))
            print(f"round {round_ + 1} {path}: served {served:.0f} tok/s, engine alone {offline:.0f} tok/s "
                  f"({served / offline:.3f}); worker loop step {step_ms:.3f} ms, gap {gap_ms:.3f} ms "
                  f"over {stats['steps']} steps", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--paths", default="stream,generate", help="comma-separated: stream, generate")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the worker process
    args = parser.parse_args(argv)
    if args.serve is not None:
        asyncio.run(serve(args))
        return 0
    paths = [p for p in args.paths.split(",") if p]
    if not paths or any(p not in ("stream", "generate") for p in paths):
        parser.error(f"--paths takes stream and/or generate, got {args.paths!r}")
    print(f"# python -m bench.worker_loop {' '.join(sys.argv[1:] if argv is None else argv)}", flush=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}", flush=True)
    worker = Worker(args)
    rows: dict[str, list[tuple[float, float, float, float]]] = {p: [] for p in paths}
    try:
        asyncio.run(rounds(worker, paths, args, rows))  # one event loop: grpc.aio keeps its poller across calls
    finally:
        worker.stop()
    print(f"| path | served tok/s | engine alone tok/s | served / alone | step ms | gap ms | "
          f"(medians of {args.rounds}; {args.requests} requests x {args.prompt_len} in / {args.output_len} out, "
          f"concurrency {args.concurrency}) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for path, values in rows.items():
        med = [statistics.median(v[i] for v in values) for i in range(4)]
        print(f"| {path} | {med[0]:.0f} | {med[1]:.0f} | {med[0] / med[1]:.3f} | {med[2]:.3f} | {med[3]:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
