"""Receiver endpoint run as a separate process by the conformance tests.

    python -m tests.kv_transfer.peer_main BACKEND NUM_PAGES CONFIG_JSON

Prints its descriptor as one JSON line, then one JSON line per notification of
room ``PEER_ROOM``: ``{"seq": ..., "sha256": ...}`` over the pages listed (JSON)
in the notification's payload. Exits when stdin closes (the test went away).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

import torch

from kv_transfer import TransferBackend, TransferTimeoutError
from tests.kv_transfer.support import PEER_ROOM, factory_for, page_bytes_of, random_kv


async def _report(backend: TransferBackend, kv_pages: torch.Tensor) -> None:
    while True:
        try:
            note = await backend.wait_notification(PEER_ROOM, timeout=60)
        except TransferTimeoutError:
            continue
        pages = json.loads(note.payload)
        digest = hashlib.sha256(page_bytes_of(kv_pages, pages)).hexdigest()
        print(json.dumps({"seq": note.seq, "sha256": digest}), flush=True)


async def main(name: str, num_pages: int, config: dict[str, object]) -> None:
    factory = factory_for(name)
    kv = random_kv(num_pages, seed=99, device=factory.device)
    async with factory.create(**config) as backend:
        await backend.register_region("kv", kv)
        backend.reserve_room(PEER_ROOM, 1, "kv", range(num_pages))
        print(json.dumps(backend.descriptor().to_dict()), flush=True)
        reporter = asyncio.create_task(_report(backend, kv))
        # Stdin closing means the test process is gone: do not outlive it.
        await asyncio.to_thread(sys.stdin.buffer.read)
        reporter.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])))
