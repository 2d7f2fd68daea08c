"""Pools at run time: `POST /admin/pools/{pool}` (and `epd scale`, and the autoscaler)
set a pool's replica count.

Growing asks the launcher (`--launcher URL`: the `epd up` process, local or Ray) to start
workers; they register with the router and take traffic once their Status answers.
Shrinking drains: the chosen worker is marked draining here first (the dispatcher never
routes to it again), then told to Drain over gRPC (it refuses new calls with
UNAVAILABLE, so a decode worker already holding it as a prefill candidate goes to the
next one, and finishes its running requests), then deregistered and stopped. A request
accepted is never dropped by scaling.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from proto import epd_pb2
from router.config import ROLES, RouterConfig, autoscale_bounds
from router.errors import RouterError
from router.registry import WorkerRegistry
from router.worker_state import WorkerState

log = logging.getLogger("router.pools")
LAUNCHER_TIMEOUT_S = 30.0  # one launcher call (starting a process or an actor)
START_TIMEOUT_S = 600.0  # a started worker that has not registered by then is given up


class PoolError(RouterError):
    """A scaling request that cannot be carried out (400; 404 for an unknown pool)."""

    error_type = "invalid_request_error"
    code = "invalid_pool_request"

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class LauncherClient:
    """The launcher's small JSON API: POST /workers {"role"} -> {"id"}; DELETE /workers/ID."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"x-epd-cluster-token": token} if token else {}

    async def start(self, role: str) -> str:
        body = await self._call("POST", "/workers", {"role": role})
        return str(body["id"])

    async def stop(self, worker_id: str) -> None:
        await self._call("DELETE", f"/workers/{worker_id}", None)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=LAUNCHER_TIMEOUT_S) as client:
                response = await client.request(method, self.url + path, json=body, headers=self._headers)
        except httpx.HTTPError as exc:
            raise PoolError(f"the launcher at {self.url} is unreachable: {exc!r}", 503) from exc
        if response.status_code >= 400:
            raise PoolError(f"the launcher refused {method} {path}: {response.text.strip()}", 502)
        return dict(response.json())


@dataclass
class Decision:
    """One change of a pool's size, for GET /admin/pools, the log and the metrics."""

    at: float  # unix time
    pool: str
    before: int
    after: int
    source: str  # "admin" or "autoscaler"
    inputs: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"time": self.at, "pool": self.pool, "from": self.before, "to": self.after,
                "source": self.source, "inputs": self.inputs}


class PoolManager:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry) -> None:
        self.config = config
        self.registry = registry
        self.bounds = autoscale_bounds(config)
        self.launcher = LauncherClient(config.launcher, config.cluster_token) if config.launcher else None
        self.starting: dict[str, dict[str, float]] = {role: {} for role in ROLES}  # id -> started at
        self.decisions: deque[Decision] = deque(maxlen=200)
        self._drains: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()

    # -- what a pool holds ---------------------------------------------------------

    def members(self, pool: str) -> list[WorkerState]:
        """The pool's workers that stay: registered and not draining."""
        return [h.state for h in self.registry.handles(pool) if not h.state.draining]

    def size(self, pool: str) -> int:
        """Workers that stay plus those started and not registered yet."""
        self._settle(pool)
        return len(self.members(pool)) + len(self.starting[pool])

    def _settle(self, pool: str) -> None:
        now = time.monotonic()
        known = {s.id for s in self.members(pool)}
        for worker_id, since in list(self.starting[pool].items()):
            if worker_id in known or now - since > START_TIMEOUT_S:
                del self.starting[pool][worker_id]

    def describe(self) -> dict[str, Any]:
        pools = {}
        for pool in ROLES:
            members = self.members(pool)
            pools[pool] = {
                "replicas": self.size(pool), "ready": sum(1 for s in members if s.healthy),
                "workers": sorted(s.id for s in members), "starting": sorted(self.starting[pool]),
                "draining": sorted(h.state.id for h in self.registry.handles(pool) if h.state.draining),
                "autoscale": dict(zip(("min", "max"), self.bounds[pool])) if pool in self.bounds else None}
        return {"pools": pools, "launcher": self.config.launcher,
                "decisions": [d.as_dict() for d in self.decisions]}

    # -- changing a pool -------------------------------------------------------------

    def check(self, pool: str, replicas: object) -> int:
        if pool not in ROLES:
            raise PoolError(f"unknown pool {pool!r}; the pools are {', '.join(ROLES)}", 404)
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise PoolError("'replicas' must be an integer")
        if replicas < 0:
            raise PoolError(f"'replicas' must be >= 0, got {replicas}")
        if pool == "decode" and replicas < 1:
            raise PoolError("the decode pool needs at least 1 worker")
        low, high = self.bounds.get(pool, (0, None))
        if high is not None and not low <= replicas <= high:
            raise PoolError(f"{pool} is autoscaled between {low} and {high}; {replicas} is outside")
        if replicas > self.size(pool) and self.launcher is None:
            raise PoolError("this router has no launcher (--launcher) to start workers; start them yourself "
                            "with `epd worker ... --router ADDRESS`", 409)
        return replicas

    async def scale(self, pool: str, replicas: object, source: str = "admin",
                    inputs: dict[str, float] | None = None) -> dict[str, Any]:
        target = self.check(pool, replicas)
        async with self._lock:
            before = self.size(pool)
            started = [await self._start(pool) for _ in range(target - before)]
            drained = [self._drain(state) for state in self._victims(pool, before - target)]
        if target != before:
            decision = Decision(time.time(), pool, before, target, source, inputs or {})
            self.decisions.append(decision)
            log.info("pool %s: %d -> %d workers (%s%s)", pool, before, target, source,
                     "".join(f", {k}={v:g}" for k, v in (inputs or {}).items()))
        return {"pool": pool, "replicas": target, "started": started, "draining": drained}

    async def _start(self, pool: str) -> str:
        assert self.launcher is not None
        worker_id = await self.launcher.start(pool)
        self.starting[pool][worker_id] = time.monotonic()
        return worker_id

    def _victims(self, pool: str, count: int) -> list[WorkerState]:
        """The workers to let go: unhealthy ones first, then the least busy, newest first."""
        if count <= 0:
            return []
        members = self.members(pool)
        members.sort(key=lambda s: (s.healthy, s.effective_requests(), s.effective_queued_tokens(),
                                    -(s.last_ok or 0.0)))
        return members[:count]

    def _drain(self, state: WorkerState) -> str:
        state.draining = True  # before anything else: no new request goes there
        task = asyncio.create_task(self._retire(state), name=f"drain-{state.id}")
        self._drains[state.id] = task
        task.add_done_callback(lambda _t, wid=state.id: self._drains.pop(wid, None))
        return state.id

    async def _retire(self, state: WorkerState) -> None:
        handle = self.registry.get(state.id)
        timeout = self.config.drain_timeout
        if handle is not None and state.healthy:
            try:
                reply = await handle.stub.Drain(epd_pb2.DrainRequest(timeout_s=timeout, exit=True),
                                                timeout=timeout + 10.0)
                log.info("worker %s drained (%s)", state.id,
                         "nothing left" if reply.drained else f"{reply.inflight} still running")
            except grpc.aio.AioRpcError as exc:
                log.warning("worker %s: Drain failed (%s); stopping it anyway", state.id, exc.code().name)
        await self._streams_done(state)
        self.registry.remove(state.id)  # closes the channel: only once nothing of ours is on it
        if self.launcher is not None:
            try:
                await self.launcher.stop(state.id)
            except PoolError as exc:  # not one the launcher started (e.g. `epd worker` by hand)
                log.info("worker %s: %s", state.id, exc.message)

    async def _streams_done(self, state: WorkerState) -> None:
        """The worker has answered its last call; wait until this router has read it
        (the last message of a decode stream may still be on its way)."""
        deadline = time.monotonic() + min(30.0, self.config.drain_timeout)
        while state.inflight_requests > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if state.inflight_requests > 0:
            log.warning("worker %s: %d request(s) of this router still open after its drain",
                        state.id, state.inflight_requests)

    async def close(self) -> None:
        for task in list(self._drains.values()):
            task.cancel()
        await asyncio.gather(*self._drains.values(), return_exceptions=True)
