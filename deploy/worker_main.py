"""Runs one worker process until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from worker.config import WorkerConfig


async def run_worker(config: WorkerConfig, ready_file: str | None = None) -> None:
    if config.role == "encode":
        from encode_worker.server import serve_encode as serve
    elif config.role == "prefill":
        from prefill_worker.server import serve_prefill as serve
    elif config.role == "decode":
        from decode_worker.server import serve_decode as serve
    else:
        raise ValueError(f"unknown worker role {config.role!r}")
    runtime = await serve(config)
    print(f"{config.role} worker {runtime.worker_id} ready on {runtime.address}", flush=True)
    if ready_file:
        with open(ready_file, "w") as handle:
            handle.write(runtime.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runtime.stop()


def main(config: WorkerConfig) -> int:
    from kv_transfer import TransferError
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {config.role} %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_worker(config))
    except TransferError as exc:  # e.g. the backend cannot start with these options
        print(f"epd worker: error: transfer backend {config.transfer!r}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
