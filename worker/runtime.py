"""What every worker process has: the engine on its own thread, the transfer backend
with the KV cache registered, a gRPC server, status with prefix-cache events,
registration with a router, and a Prometheus /metrics endpoint."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from engine.async_engine import AsyncEngine, StepHook
from engine.config import EngineConfig
from engine.engine import Engine
from kv_transfer import TransferBackend, compat_hash, create_backend
from proto import epd_pb2 as pb
from proto.keepalive import SERVER_OPTIONS as SERVER_KEEPALIVE
from worker.auth import server_interceptors
from worker.config import GRPC_MESSAGE_OPTIONS, WorkerConfig
from worker.drain import Lifecycle
from worker.events import KVEventLog
from worker.http import WorkerHTTPServer
from worker.kv_layout import KV_REGION, kv_regions  # noqa: F401 - KV_REGION re-exported
from worker.metrics import (REQUEST_BUCKETS, TRANSFER_BUCKETS, CountsBy, DurationHistogram, MetricSource, Sample,
                            families, spec_samples, status_samples)
from worker.pins import Pins, pin_counts
from worker.registration import deregister, register_loop

logger = logging.getLogger(__name__)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


class WorkerRuntime:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        options = dict(config.engine_options)
        if config.role != "decode":  # prefill samples a request's first token only; encode none: no drafting
            options.update(speculative=None, speculative_draft_model=None)
        self.engine = Engine(config.model, EngineConfig(), **{
            **options, "max_sessions": config.max_sessions,
            "session_idle_timeout_s": config.session_idle_timeout_s})
        self.async_engine = AsyncEngine(self.engine)
        # "none": an aggregated worker (decode that prefills everything itself).
        self.transfer: TransferBackend | None = None
        try:
            if config.transfer != "none":
                # Bind where gRPC binds, publish the address peers dial.
                self.transfer = create_backend(config.transfer, compat_hash=self.compat_hash(),
                                               host=config.host, advertise_host=config.public_host,
                                               **config.transfer_options)
            elif config.role == "prefill":
                raise ValueError("a prefill worker needs a transfer backend (--transfer)")
        except BaseException:
            self.engine.close()  # its tensor-parallel ranks, if any
            raise
        self.events = KVEventLog()
        self.server = grpc.aio.server(options=[*GRPC_MESSAGE_OPTIONS, *SERVER_KEEPALIVE],
                                      interceptors=server_interceptors(config.cluster_token))
        self.port = 0
        self.snapshot: dict[str, float] = {}
        self.metric_sources: list[MetricSource] = []  # the role service's own /metrics samples
        # The role service's own WorkerStatus fields (read on the engine thread), and what
        # it starts after / closes before the runtime's own parts.
        self.status_sources: list[Callable[[], dict[str, Any]]] = []
        self.starters: list[Callable[[], Awaitable[None]]] = []
        self.closers: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        # Readiness, the drain gate every admission call runs inside, exit on request.
        self.life = Lifecycle(config.drain_timeout_s,
                              self.engine.config.max_num_seqs + config.max_queued_requests)
        self._http: WorkerHTTPServer | None = None
        self.metric_sources.extend(self._observe_metrics())
        self.pins = Pins(self)  # PinPrefix / UnpinPrefix and requests' own pins
        self.metric_sources += [self.pins.samples, self._session_samples]
        if self.engine.speculation is not None:
            stats = self.engine.speculation.stats
            self.metric_sources.append(lambda: spec_samples(stats))

    def _observe_metrics(self) -> list[MetricSource]:
        """Histograms of this worker's admission calls and of its KV transfer writes."""
        self.life.gate.durations = DurationHistogram("request_duration_seconds", REQUEST_BUCKETS)
        sources: list[MetricSource] = [self.life.gate.durations.samples]
        if self.transfer is not None:
            writes = DurationHistogram("kv_transfer_write_seconds", TRANSFER_BUCKETS, "backend")
            failures = CountsBy("kv_transfer_write_failures_total", "backend", counter=True)
            name = self.config.transfer
            failures.add(name, 0)

            def observe(seconds: float, sent: int, ok: bool) -> None:
                if ok:
                    writes.observe(seconds, name)
                else:
                    failures.add(name)

            self.transfer.write_observer = observe
            sources += [writes.samples, failures.samples]
        return sources

    @property
    def model_name(self) -> str:
        """The `model` label of this worker's metrics: its checkpoint directory's name."""
        return Path(str(self.engine.model_path)).name

    @property
    def worker_id(self) -> str:
        return self.config.worker_id or f"{self.config.role}-{self.port}"

    @property
    def address(self) -> str:
        return f"{self.config.public_host}:{self.port}"

    def compat_hash(self) -> str:
        mc, ec = self.engine.model_config, self.engine.config
        return compat_hash(architecture=mc.architecture, dtype=mc.dtype, num_layers=mc.num_layers,
                           num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim, page_size=ec.page_size,
                           vocab_size=mc.vocab_size, hidden_size=mc.hidden_size,
                           # Not the TP size: peers of different sizes convert (worker/kv_layout.py);
                           # the rule that splits KV heads over ranks must be the same.
                           kv_heads_split="engine.parallel.layout/1")

    def set_step_hook(self, hook: StepHook) -> None:
        self.async_engine = AsyncEngine(self.engine, after_step=hook)

    async def start(self) -> None:
        self._watch_ranks()
        if self.transfer is not None:
            await _maybe_await(self.transfer.start())
            for name, tensor in kv_regions(self.engine):  # one per tensor-parallel rank ("kv" alone at size 1)
                await _maybe_await(self.transfer.register_region(name, tensor))
        for start in self.starters:
            await start()
        await self.async_engine.start()
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self.server.start()
        self.life.gate.worker_id = self.worker_id
        if self.config.metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(_WorkerCollector(self))
            self._http = WorkerHTTPServer(self.config.host, self.config.metrics_port, registry, self.life.health)
        self.life.ready = True
        self._tasks.append(asyncio.create_task(self._refresh_snapshot()))
        if self.config.router:
            self._tasks.append(asyncio.create_task(self._register_loop()))
        logger.info("%s worker %s listening on %s", self.config.role, self.worker_id, self.address)

    async def stop(self) -> None:
        self.life.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.config.router:
            await deregister(self.config.router, self.worker_id, self.config)
        await self.server.stop(grace=1.0)
        if self._http is not None:
            self._http.close()
        await self.async_engine.stop()
        for close in self.closers:
            await close()
        if self.transfer is not None:
            await _maybe_await(self.transfer.close())
        self.engine.close()  # stops the tensor-parallel ranks; the engine thread is done by now

    def _watch_ranks(self) -> None:
        """A tensor-parallel rank that dies or hangs fails the worker loudly (exit status 1)
        rather than leaving it up with an engine that can no longer step."""
        tp = self.engine.tp
        if tp is None or tp.group is None:
            return
        loop = asyncio.get_running_loop()
        tp.group.on_failure = lambda error: loop.call_soon_threadsafe(self.life.fail, str(error))
        if tp.group.failure is not None:  # it failed before anyone listened
            self.life.fail(str(tp.group.failure))

    # -- status ------------------------------------------------------------------------

    def _counts(self) -> dict[str, Any]:
        """Runs on the engine thread."""
        engine = self.engine
        cache = engine.scheduler.cache
        if cache is not None:
            self.events.extend(cache.drain_events())
        acct = engine.page_accounting()
        sessions = engine.scheduler.sessions
        return dict(
            sessions_open=sessions.open if sessions else 0,
            session_restores_total=sessions.restores_total if sessions else 0,
            session_restored_tokens_total=sessions.restored_tokens_total if sessions else 0,
            **pin_counts(engine),
            kv_pages_total=acct.total, kv_pages_free=acct.free,
            kv_pages_cached=acct.cached, running=len(engine.scheduler.running),
            waiting=len(engine.scheduler.waiting) + len(engine.scheduler.parked),
            prefill_tokens_total=engine.counters.prefill_tokens_total,
            requests_total=engine.counters.requests_total,
            queued_prefill_tokens=engine.scheduler.queued_prefill_tokens(),
            prefix_hit_tokens_total=engine.scheduler.prefix_hit_tokens_total,
            generated_tokens_total=engine.counters.generated_tokens_total,
            **{k: v for source in self.status_sources for k, v in source().items()},
        )

    def _status_on_engine(self, after_event: int) -> pb.WorkerStatus:
        counts = self._counts()
        counts.pop("generated_tokens_total")
        cache = self.engine.scheduler.cache
        batch = self.events.since(after_event, cache.all_hashes() if cache else [])
        return pb.WorkerStatus(
            role=self.config.role, id=self.worker_id, address=self.address, healthy=True,
            kv_bytes_sent_total=self.transfer.bytes_sent_total if self.transfer else 0,
            kv_bytes_received_total=self.transfer.bytes_received_total if self.transfer else 0,
            page_size=self.engine.config.page_size, model=str(self.engine.model_path),
            max_model_len=self.engine.max_model_len, event_seq=batch.seq,
            events_reset=batch.reset, stored=batch.stored, removed=batch.removed,
            metrics_address=f"{self.config.public_host}:{self._http.port if self._http else 0}",
            transfer=self.config.transfer,
            transfer_address=self.transfer.descriptor().address if self.transfer else "",
            pins=cache.pin_tails() if cache else [], draining=self.life.gate.draining, **counts)

    async def status(self, request: pb.StatusRequest) -> pb.WorkerStatus:
        return await self.async_engine.run(self._status_on_engine, request.after_event)

    def _tick(self) -> dict[str, Any]:
        """Engine thread, twice a second: release idle sessions, then the counts."""
        self.engine.expire_sessions()
        return self._counts()

    def _session_samples(self) -> list[Sample]:
        sessions = self.engine.scheduler.sessions
        releases = dict(sessions.releases) if sessions else {}
        return [Sample("session_releases_total", float(releases.get(reason, 0)), (("reason", reason),), True)
                for reason in ("closed", "expired", "evicted", "pressure", "diverged", "replaced")]

    async def _refresh_snapshot(self) -> None:
        while True:
            counts = await self.async_engine.run(self._tick)
            if self.transfer is not None:
                counts["kv_bytes_sent_total"] = self.transfer.bytes_sent_total
                counts["kv_bytes_received_total"] = self.transfer.bytes_received_total
                counts["kv_transfer_seconds_total"] = self.transfer.transfer_seconds_total
            self.snapshot = counts
            await asyncio.sleep(0.5)

    async def _register_loop(self) -> None:
        assert self.config.router is not None
        await register_loop(self.config.router, self.config.role, self.worker_id, self.address,
                            self.config.heartbeat_interval_s, self.config)


_COUNTERS = ("prefill_tokens_total", "requests_total", "kv_bytes_sent_total", "kv_bytes_received_total",
             "images_encoded_total", "embedding_cache_hits_total", "embedding_bytes_received_total",
             "prefix_hit_tokens_total", "generated_tokens_total", "kv_transfer_seconds_total",
             "session_restores_total", "session_restored_tokens_total")


class _WorkerCollector:
    """Exposes the runtime's last snapshot (refreshed twice a second) and, read live,
    the samples of the role's metric sources."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self.runtime = runtime

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        runtime = self.runtime
        labels = {"pool": runtime.config.role, "worker": runtime.worker_id, "model": runtime.model_name}
        backend = runtime.config.transfer if runtime.transfer is not None else None
        snapshot = status_samples(dict(runtime.snapshot), _COUNTERS, backend)
        live = [sample for source in list(runtime.metric_sources) for sample in source()]
        live.append(Sample("requests_refused_total", runtime.life.gate.refused_total, counter=True))
        yield from families([*snapshot, *live], labels)
