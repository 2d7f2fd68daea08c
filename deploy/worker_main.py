"""Runs one worker process until SIGINT/SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import signal

from worker.config import WorkerConfig


async def run_worker(config: WorkerConfig, ready_file: str | None = None) -> None:
    if config.role == "prefill":
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
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {config.role} %(levelname)s %(name)s: %(message)s")
    asyncio.run(run_worker(config))
    return 0
