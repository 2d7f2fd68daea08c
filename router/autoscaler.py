"""The autoscaler (`--autoscale POOL=MIN:MAX`): every `--autoscale-interval` seconds,
each autoscaled pool's load against its targets gives a utilization u (1.0 = at target);
the pool's desired size is ceil(current × u) clamped to [MIN, MAX] (as Kubernetes' HPA
does), applied through the PoolManager like an admin call.

    prefill: queued prompt tokens per worker / --autoscale-prefill-tokens,
             TTFT p90 of the window / --autoscale-ttft
    decode:  KV pages in use / --autoscale-decode-kv, ITL p90 / --autoscale-itl,
             running requests per worker / --autoscale-decode-running (when set)
    encode:  queued images per worker / --autoscale-encode-images

u is the largest of a pool's ratios. Within 10% of the target nothing changes; after any
change of a pool it does not grow again for the up cool-down nor shrink for the (longer)
down cool-down, against flapping. Each decision is logged with its inputs, kept for
GET /admin/pools, and counted in /metrics.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge

from router.config import RouterConfig, autoscale_bounds
from router.registry import WorkerRegistry

log = logging.getLogger("router.autoscaler")
TOLERANCE = 0.1


class Window:
    """Samples of the last `seconds`; percentiles over what is left."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, value: float, now: float) -> None:
        self._samples.append((now, value))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.seconds:
            self._samples.popleft()
        while len(self._samples) > 100_000:  # bounded however busy the router is
            self._samples.popleft()

    def p90(self, now: float | None = None) -> float:
        self._trim(time.monotonic() if now is None else now)
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, int(0.9 * len(values)))] if values else 0.0


class RecentLatency:
    def __init__(self, seconds: float) -> None:
        self.ttft = Window(seconds)
        self.itl = Window(seconds)


class Autoscaler:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, pools: object,
                 latency: RecentLatency, metrics: CollectorRegistry) -> None:
        self.config = config
        self.registry = registry
        self.pools = pools  # router.pools.PoolManager
        self.latency = latency
        self.bounds = autoscale_bounds(config)
        self.last_change: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.utilization = Gauge("epd_autoscaler_utilization", "load against target (1 = at target)",
                                 ["pool"], registry=metrics)
        self.replicas = Gauge("epd_autoscaler_desired_replicas", "the autoscaler's desired pool size",
                              ["pool"], registry=metrics)
        self.decisions = Counter("epd_autoscaler_decisions", "pool size changes by direction",
                                 ["pool", "direction"], registry=metrics)

    def start(self) -> None:
        if self.bounds:
            self._task = asyncio.create_task(self._run(), name="router-autoscaler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.autoscale_interval)
            for pool in self.bounds:
                try:
                    await self.step(pool)
                except Exception:  # noqa: BLE001 - one failed decision must not end autoscaling
                    log.exception("autoscaler: pool %s", pool)

    def inputs(self, pool: str) -> dict[str, float]:
        """The load of a pool's ready workers, and the ratios to targets (`u_*`)."""
        c, ready = self.config, self.registry.healthy(pool)
        n = max(1, len(ready))
        if pool == "prefill":
            queued = sum(s.effective_queued_tokens() for s in ready) / n
            ttft = self.latency.ttft.p90()
            return {"queued_tokens_per_worker": queued, "ttft_p90_s": ttft,
                    "u_tokens": queued / c.autoscale_prefill_tokens, "u_ttft": ttft / c.autoscale_ttft}
        if pool == "decode":
            sized = [s for s in ready if s.load.kv_pages_total]
            # Pages held by requests; cached prefix pages are evictable, so they are not load.
            kv = sum(1 - (s.load.kv_pages_free + _cached(s)) / s.load.kv_pages_total for s in sized) / max(1, len(sized))
            running = sum(s.load.running for s in ready) / n  # generating now (not parked for a prefill)
            itl = self.latency.itl.p90()
            out = {"kv_used": kv, "running_per_worker": running, "itl_p90_s": itl,
                   "u_kv": kv / c.autoscale_decode_kv, "u_itl": itl / c.autoscale_itl}
            if c.autoscale_decode_running:
                out["u_running"] = running / c.autoscale_decode_running
            return out
        queued = sum(s.effective_queued_images() for s in ready) / n
        return {"queued_images_per_worker": queued, "u_images": queued / c.autoscale_encode_images}

    def desired(self, pool: str, current: int, inputs: dict[str, float]) -> int:
        low, high = self.bounds[pool]
        u = max(v for k, v in inputs.items() if k.startswith("u_"))
        if abs(u - 1.0) <= TOLERANCE:
            want = current
        elif current == 0:
            want = 1 if u > 1.0 else 0  # an empty pool: latency alone can call for a first worker
        else:
            want = math.ceil(current * u)
        return max(low, min(high, want))

    async def step(self, pool: str, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        current = self.pools.size(pool)
        inputs = self.inputs(pool)
        want = self.desired(pool, current, inputs)
        self.utilization.labels(pool).set(max(v for k, v in inputs.items() if k.startswith("u_")))
        self.replicas.labels(pool).set(want)
        since = now - self.last_change.get(pool, -math.inf)
        cooldown = self.config.autoscale_up_cooldown if want > current else self.config.autoscale_down_cooldown
        if want == current or since < cooldown:
            return current
        await self.pools.scale(pool, want, source="autoscaler", inputs={k: round(v, 4) for k, v in inputs.items()})
        self.last_change[pool] = now
        self.decisions.labels(pool, "up" if want > current else "down").inc()
        return want


def _cached(state: object) -> int:
    status = getattr(state, "status", None)
    return int(getattr(status, "kv_pages_cached", 0)) if status is not None else 0
