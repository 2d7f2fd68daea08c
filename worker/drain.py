"""Draining a worker: it stops taking new requests and finishes the running ones.

Every role's admission call (decode `Generate`, prefill `Prefill`, encode `Encode`) runs
inside `DrainGate.admit`. Once draining, new calls are refused with UNAVAILABLE, which
every caller already treats as "try another worker" (the router before the first token,
decode for its prefill candidates, prefill for its encoders), so nothing accepted is lost.
`wait` returns once no admitted call is left; the worker then deregisters and exits.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from proto import epd_pb2 as pb

if TYPE_CHECKING:
    from worker.metrics import DurationHistogram

logger = logging.getLogger(__name__)


RETRY_AFTER_KEY = "retry-after"  # trailing metadata of a refusal: seconds, as HTTP's header


class DrainGate:
    """Admission of a worker's calls: refused while draining (UNAVAILABLE), and beyond
    `limit` calls at once (RESOURCE_EXHAUSTED with a `retry-after`), so a worker's queue
    is bounded and its caller takes the excess elsewhere (the router another decode
    worker or a 429, decode the next prefill candidate or its own prefill)."""

    def __init__(self, worker_id: str = "", limit: int | None = None) -> None:
        self.worker_id = worker_id
        self.limit = limit  # calls admitted at once (running + queued); None: unbounded
        self.draining = False
        self.inflight = 0
        self.durations: DurationHistogram | None = None  # each admitted call's seconds (/metrics)
        self.refused_total = 0  # calls refused for the limit
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def admit(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Count one admitted call until it ends; refuse it while draining or full."""
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {self.worker_id} is draining")
        if self.limit is not None and self.inflight >= self.limit:
            self.refused_total += 1
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"worker {self.worker_id} is full ({self.inflight} calls admitted, "
                                f"limit {self.limit}); retry later or elsewhere",
                                trailing_metadata=((RETRY_AFTER_KEY, "1"),))
        self.inflight += 1
        self._idle.clear()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.durations is not None:
                self.durations.observe(time.perf_counter() - started)
            self.inflight -= 1
            if self.inflight == 0:
                self._idle.set()

    def start(self) -> None:
        if not self.draining:
            logger.info("worker %s draining: %d request(s) running", self.worker_id, self.inflight)
        self.draining = True

    async def wait(self, timeout_s: float) -> bool:
        """True once nothing admitted is running; False if `timeout_s` passed first."""
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


class Lifecycle:
    """A worker process's serving state, shared by every role's runtime: readiness for
    GET /health, the drain gate, and whether a Drain call asked the process to exit."""

    def __init__(self, default_timeout_s: float, max_inflight: int | None = None) -> None:
        self.gate = DrainGate(limit=max_inflight)
        self.ready = False  # the gRPC server is up
        self.exit_requested = asyncio.Event()
        self.default_timeout_s = default_timeout_s
        self.fatal_error: str | None = None  # why the worker stops itself (its exit status is then 1)

    def fail(self, message: str) -> None:
        """The worker cannot serve any more (e.g. a tensor-parallel rank died): stop now."""
        if self.fatal_error is None:
            logger.error("worker %s cannot go on: %s; stopping", self.gate.worker_id, message)
            self.fatal_error = message
        self.ready = False
        self.exit_requested.set()

    def health(self) -> tuple[int, str]:
        """200 while serving; 503 while starting or draining."""
        if self.gate.draining:
            return 503, "draining"
        return (200, "ok") if self.ready else (503, "starting")

    async def drain(self, timeout_s: float) -> bool:
        """Take no new requests; True once the running ones have finished."""
        self.gate.start()
        drained = await self.gate.wait(timeout_s)
        if not drained:
            logger.warning("worker %s: %d request(s) still running after a %.0f s drain",
                           self.gate.worker_id, self.gate.inflight, timeout_s)
        return drained

    async def drain_call(self, request: pb.DrainRequest) -> pb.DrainResponse:
        """Every role service's Drain RPC."""
        timeout_s = request.timeout_s if request.timeout_s > 0 else self.default_timeout_s
        drained = await self.drain(timeout_s)
        if request.exit:  # run_worker stops the process once this reply is on its way
            asyncio.get_running_loop().call_later(0.2, self.exit_requested.set)
        return pb.DrainResponse(drained=drained, inflight=self.gate.inflight)
