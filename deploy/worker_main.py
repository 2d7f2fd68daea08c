"""Runs one worker process until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from worker.config import WorkerConfig


async def start_worker(config: WorkerConfig):  # noqa: ANN201 - WorkerRuntime or EncodeRuntime
    if config.role == "encode":
        from encode_worker.server import serve_encode as serve
    elif config.role == "prefill":
        from prefill_worker.server import serve_prefill as serve
    elif config.role == "decode":
        from decode_worker.server import serve_decode as serve
    else:
        raise ValueError(f"unknown worker role {config.role!r}")
    return await serve(config)


async def run_worker(config: WorkerConfig, ready_file: str | None = None,
                     drain: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                     started: Callable[[Any], None] | None = None) -> str | None:
    """Serve until told to go. SIGTERM (or `terminate`) drains first: no new requests,
    the running ones finish (up to --drain-timeout), then the worker deregisters and
    exits; SIGINT, or a second SIGTERM, stops at once. A Drain call with exit=True ends it
    too. `drain` / `stop` replace the signals for callers off the main thread (a Ray
    actor), where no signal handler can be installed; `started` gets the runtime."""
    runtime = await start_worker(config)
    print(f"{config.role} worker {runtime.worker_id} ready on {runtime.address}", flush=True)
    if ready_file:
        with open(ready_file, "w") as handle:
            handle.write(runtime.address)
    if started is not None:
        started(runtime)
    signals = drain is None and stop is None
    drain, now = drain or asyncio.Event(), stop or asyncio.Event()
    if signals:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, now.set)
        loop.add_signal_handler(signal.SIGTERM, lambda: (now if drain.is_set() else drain).set())
    waits = {asyncio.ensure_future(e.wait()): e for e in (drain, now, runtime.life.exit_requested)}
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if any(waits[task] is drain for task in done) and not now.is_set():
        drained = asyncio.ensure_future(runtime.life.drain(config.drain_timeout_s))
        await asyncio.wait([drained, asyncio.ensure_future(now.wait())], return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()
    await runtime.stop()
    return runtime.life.fatal_error  # None: stopped as asked


def gil_switch_interval(environ: dict[str, str]) -> float | None:
    """EPD_GIL_SWITCH_MS: how long (ms) a thread holding the GIL keeps it while another
    waits (Python's default is 5). The engine thread, back from a wait on the GPU, waits up
    to that long for the event loop's thread (streaming tokens) to hand the GIL over."""
    text = environ.get("EPD_GIL_SWITCH_MS")
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1000:
        raise ValueError(f"EPD_GIL_SWITCH_MS must be a number of milliseconds in (0, 1000], got {text!r}")
    return value / 1e3


def main(config: WorkerConfig) -> int:
    import os

    from kv_transfer import TransferError
    from proto import tracing
    try:
        provider = tracing.provider_from_env(f"epd-{config.role}-worker")
        interval = gil_switch_interval(dict(os.environ))
    except (tracing.TracingError, ValueError) as exc:
        print(f"epd worker: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if interval is not None:
        sys.setswitchinterval(interval)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {config.role} %(levelname)s %(name)s: %(message)s")
    try:
        with tracing.enabled(provider):
            fatal = asyncio.run(run_worker(config))
        if fatal is not None:
            print(f"epd worker: error: {fatal}", file=sys.stderr, flush=True)
            return 1
    except TransferError as exc:  # e.g. the backend cannot start with these options
        print(f"epd worker: error: transfer backend {config.transfer!r}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if provider is not None:
            provider.shutdown()  # flushes the spans still batched
    return 0
