"""Admission control: at most `max_running` requests generate at once, at most
`max_queued` more wait for a slot in arrival order; beyond that a request is refused
at once (HTTP 429, gRPC RESOURCE_EXHAUSTED) instead of piling up."""
from __future__ import annotations

import asyncio
import time

from router.errors import Overloaded


class Slot:
    """A granted place; `release` is idempotent."""

    def __init__(self, admission: Admission, queue_time: float) -> None:
        self._admission = admission
        self.queue_time = queue_time
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release()


class Admission:
    def __init__(self, max_running: int, max_queued: int, retry_after: float = 1.0) -> None:
        self._max_queued = max_queued
        self._retry_after = retry_after
        self._free = asyncio.Semaphore(max_running)
        self.running = 0
        self.queued = 0

    async def acquire(self) -> Slot:
        if self._free.locked() and self.queued >= self._max_queued:
            raise Overloaded(f"the router is at its limit ({self.running} requests running, "
                             f"{self.queued} queued); retry later", retry_after=self._retry_after)
        start = time.monotonic()
        self.queued += 1
        try:
            await self._free.acquire()
        finally:
            self.queued -= 1
        self.running += 1
        return Slot(self, time.monotonic() - start)

    def _release(self) -> None:
        self.running -= 1
        self._free.release()
