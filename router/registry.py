"""The workers the router knows: named on the command line or registered through the
Registry service, each with one gRPC channel, and the health monitor that polls their
Status to keep load, prefix caches and health current.

A worker is in rotation (`healthy`) from its first successful Status until its Status
has failed for `unhealthy_after` seconds (or a request saw it unreachable), and back in
as soon as Status succeeds again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Union

import grpc

from proto import epd_pb2, epd_pb2_grpc
from proto.auth import cluster_channel
from router.breaker import CircuitBreaker
from router.config import ROLES, RouterConfig
from router.decode_mux import DecodeMux
from router.worker_state import Clock, WorkerLoad, WorkerState

log = logging.getLogger("router.registry")

# Reconnect quickly after a worker restarts (gRPC's default backoff grows to 2 minutes),
# and allow long prompts through.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),  # prompts with images
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]

WorkerStub = Union[epd_pb2_grpc.DecodeWorkerStub, epd_pb2_grpc.PrefillWorkerStub, epd_pb2_grpc.EncodeWorkerStub]
_STUBS = {"decode": epd_pb2_grpc.DecodeWorkerStub, "prefill": epd_pb2_grpc.PrefillWorkerStub,
          "encode": epd_pb2_grpc.EncodeWorkerStub}


@dataclass
class WorkerHandle:
    """A worker's state with the channel and stub to reach it (owned by the registry)."""

    state: WorkerState
    channel: grpc.aio.Channel
    stub: WorkerStub
    added_at: float
    mux: DecodeMux | None = None  # decode workers: the multiplexed stream (router/decode_mux.py)


class WorkerRegistry:
    def __init__(self, config: RouterConfig, clock: Clock = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._workers: dict[str, WorkerHandle] = {}
        self._closing: set[asyncio.Future[None]] = set()  # channels of dropped workers
        for spec in config.static_workers():
            self.add(spec.role, spec.id, spec.address, static=True)

    def add(self, role: str, worker_id: str, address: str, static: bool = False) -> WorkerHandle:
        """Add a worker, or re-point a known id to a new address."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not worker_id or not address:
            raise ValueError("a worker needs an id and an address")
        old = self._workers.get(worker_id)
        if old is not None and old.state.address == address and old.state.role == role:
            return old
        if old is not None:
            self._drop(worker_id)
        channel = cluster_channel(address, CHANNEL_OPTIONS, self._config.cluster_token)
        stub_class = _STUBS[role]
        breaker = CircuitBreaker(f"{role} worker {worker_id}", self._config.breaker_failures,
                                 self._config.breaker_cooldown, self._clock)
        state = WorkerState(role, worker_id, address, static=static, breaker=breaker)
        stub = stub_class(channel)
        handle = WorkerHandle(state, channel, stub, self._clock(),
                              DecodeMux(stub, worker_id) if role == "decode" and self._config.decode_multiplex else None)
        self._workers[worker_id] = handle
        log.info("added %s worker %s at %s", role, worker_id, address)
        return handle

    def _drop(self, worker_id: str, grace: float = 0.0) -> None:
        handle = self._workers.pop(worker_id, None)
        if handle is not None:
            handle.state.healthy = False
            if handle.mux is not None:
                handle.mux.retire()
            closing = asyncio.ensure_future(_close_channel(handle.channel, grace))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)
            log.info("removed %s worker %s", handle.state.role, worker_id)

    def remove(self, worker_id: str, grace: float = 0.0) -> bool:
        """Forget a worker: no new calls go to it; calls already running on its channel
        may finish for `grace` seconds before they are cancelled."""
        found = worker_id in self._workers
        self._drop(worker_id, grace)
        return found

    def get(self, worker_id: str) -> WorkerHandle | None:
        return self._workers.get(worker_id)

    def handles(self, role: str | None = None) -> list[WorkerHandle]:
        return [h for h in self._workers.values() if role is None or h.state.role == role]

    def healthy(self, role: str) -> list[WorkerState]:
        """The workers in rotation: healthy and not draining."""
        return [h.state for h in self.handles(role) if h.state.healthy and not h.state.draining]

    def routable(self, role: str) -> list[WorkerState]:
        """The workers new requests may go to: in rotation, and their circuit breaker
        lets a call through."""
        return [s for s in self.healthy(role) if s.breaker.allows()]

    def ready(self) -> bool:
        """Every worker named on the command line is healthy, and at least the expected
        number of each role is."""
        if any(not h.state.healthy for h in self._workers.values() if h.state.static):
            return False
        return (len(self.healthy("prefill")) >= self._config.expect_prefill
                and len(self.healthy("decode")) >= self._config.expect_decode
                and len(self.healthy("encode")) >= self._config.expect_encode)

    def mark_failed(self, worker_id: str, reason: str) -> None:
        """A request found the worker unreachable: out of rotation until Status succeeds."""
        handle = self._workers.get(worker_id)
        if handle is not None and handle.state.healthy:
            log.warning("%s worker %s out of rotation: %s", handle.state.role, worker_id, reason)
            _take_down(handle.state, self._clock(), reason)

    def forget_stale(self) -> None:
        """Drop registered (not command-line) workers that have been down too long."""
        now = self._clock()
        for worker_id, handle in list(self._workers.items()):
            state = handle.state
            down_since = state.down_since if state.last_ok is not None else handle.added_at
            if not state.static and not state.healthy and down_since is not None \
                    and now - down_since > self._config.forget_after:
                self._drop(worker_id)

    async def close(self) -> None:
        handles, self._workers = list(self._workers.values()), {}
        for closing in list(self._closing):
            closing.cancel()  # the router stops: no more grace for removed workers' calls
        await asyncio.gather(*(h.mux.aclose() for h in handles if h.mux is not None), return_exceptions=True)
        await asyncio.gather(*(h.channel.close() for h in handles), *self._closing, return_exceptions=True)


async def _close_channel(channel: grpc.aio.Channel, grace: float) -> None:
    """Close after running calls finish (at most `grace` s); cancelled, close at once."""
    try:
        await channel.close(grace or None)
    except asyncio.CancelledError:
        await channel.close()
        raise


def _take_down(state: WorkerState, now: float, reason: str) -> None:
    state.healthy = False
    state.down_since = now
    state.last_error, state.last_error_at = reason, time.time()
    state.prefix.reset()  # events may be missed while down; resync from a snapshot


def load_from_status(status: epd_pb2.WorkerStatus) -> WorkerLoad:
    return WorkerLoad(kv_pages_total=status.kv_pages_total, kv_pages_free=status.kv_pages_free,
                      running=status.running, waiting=status.waiting,
                      queued_prefill_tokens=status.queued_prefill_tokens,
                      page_size=status.page_size, max_model_len=status.max_model_len,
                      queued_images=status.queued_images)


class HealthMonitor:
    """Polls every worker's Status every `health_interval` seconds (one poll per worker
    at a time, each with `health_timeout`), applying load and KV events."""

    def __init__(self, registry: WorkerRegistry, config: RouterConfig,
                 clock: Clock = time.monotonic) -> None:
        self._registry = registry
        self._config = config
        self._clock = clock
        self._polling: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-health-monitor")

    async def stop(self) -> None:
        tasks = [t for t in [self._task, *self._polling.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        self._polling.clear()

    async def _run(self) -> None:
        while True:
            for handle in self._registry.handles():
                if handle.state.id not in self._polling:
                    task = asyncio.create_task(self.poll(handle))
                    self._polling[handle.state.id] = task
                    task.add_done_callback(lambda _t, wid=handle.state.id: self._polling.pop(wid, None))
            self._registry.forget_stale()
            await asyncio.sleep(self._config.health_interval)

    async def poll(self, handle: WorkerHandle) -> None:
        request = epd_pb2.StatusRequest(after_event=handle.state.prefix.cursor)
        try:
            status = await handle.stub.Status(request, timeout=self._config.health_timeout)
        except grpc.aio.AioRpcError as exc:
            self._failed(handle, f"{exc.code().name}: {exc.details()}")
            return
        except Exception as exc:  # noqa: BLE001 - e.g. a channel closed under us; a failed poll either way
            self._failed(handle, repr(exc))
            return
        if self._registry.get(handle.state.id) is handle:  # not replaced meanwhile
            self._succeeded(handle, status)

    def _succeeded(self, handle: WorkerHandle, status: epd_pb2.WorkerStatus) -> None:
        state = handle.state
        if not state.healthy:
            log.info("%s worker %s at %s is healthy", state.role, state.id, state.address)
        state.healthy, state.last_ok, state.down_since = True, self._clock(), None
        state.load = load_from_status(status)
        state.status = status
        state.draining = state.draining or status.draining  # drained on its own (SIGTERM)
        if status.event_seq < state.prefix.cursor and not status.events_reset:
            state.prefix.reset()  # the worker restarted; the next poll gets a snapshot
        else:
            state.prefix.apply(status)

    def _failed(self, handle: WorkerHandle, reason: str) -> None:
        state, now = handle.state, self._clock()
        since = state.last_ok if state.last_ok is not None else handle.added_at
        if state.healthy and now - since >= self._config.unhealthy_after:
            log.warning("%s worker %s at %s out of rotation: Status failing for %.1f s (%s)",
                        state.role, state.id, state.address, now - since, reason)
            _take_down(state, now, f"Status failing for {now - since:.1f} s ({reason})")
