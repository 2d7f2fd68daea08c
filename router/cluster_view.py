"""What `GET /cluster` and the `/dashboard` page show.

`GET /cluster` is one entry per worker (its last Status with the router's view of it).
`GET /cluster?view=overview` adds what a person watching the cluster wants in one
fetch: the router's own counts, a summary per pool, per-worker rates (computed here
from the counters' recent history, so every viewer sees the same numbers) and cache hit
rates, and the recent errors (failed requests, workers taken out of rotation).
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.service import RouterService

CLUSTER_FIELDS = ("kv_pages_total", "kv_pages_free", "running", "waiting", "prefill_tokens_total",
                  "kv_bytes_sent_total", "kv_bytes_received_total", "requests_total",
                  "kv_pages_cached", "prefix_hit_tokens_total", "queued_prefill_tokens",
                  "images_encoded_total", "embedding_cache_hits_total", "queued_images",
                  "embedding_bytes_sent_total", "embedding_bytes_received_total",
                  "embedding_slots_free", "embedding_slots_total", "sessions_open", "session_restores_total",
                  "session_restored_tokens_total", "pinned_pages", "pinned_pages_resident")
# Counters turned into per-second rates: (field, rate name).
RATE_FIELDS = (("kv_bytes_sent_total", "kv_bytes_sent_per_s"), ("kv_bytes_received_total", "kv_bytes_received_per_s"),
               ("prefill_tokens_total", "prefill_tokens_per_s"), ("requests_total", "requests_per_s"),
               ("routed_total", "routed_per_s"), ("images_encoded_total", "images_encoded_per_s"),
               ("embedding_bytes_sent_total", "embedding_bytes_sent_per_s"),
               ("embedding_bytes_received_total", "embedding_bytes_received_per_s"))
RATE_WINDOW_S = 10.0  # rates are over about the last this many seconds
SAMPLE_EVERY_S = 0.5  # Status is polled about this often: closer samples add nothing


@dataclass(frozen=True)
class ErrorEvent:
    time: float  # wall clock (seconds since the epoch)
    source: str  # "request" or "worker"
    kind: str  # a request's outcome label (error, invalid, unavailable, ...) or "unhealthy"
    message: str
    worker: str = ""


class RecentErrors:
    """The last `limit` request errors (owned by the router's event loop)."""

    def __init__(self, limit: int = 50) -> None:
        self._events: deque[ErrorEvent] = deque(maxlen=limit)

    def add(self, kind: str, message: str, worker: str = "") -> None:
        self._events.append(ErrorEvent(time.time(), "request", kind, message[:500], worker))

    def events(self) -> list[ErrorEvent]:
        return list(self._events)


class RateTracker:
    """Per-second rates of counters from samples taken when someone looks: the oldest
    sample within RATE_WINDOW_S against the newest. A counter that went down (the worker
    restarted) starts over."""

    def __init__(self) -> None:
        self._history: dict[str, deque[tuple[float, dict[str, float]]]] = {}

    def rates(self, key: str, counters: dict[str, float], now: float) -> dict[str, float | None]:
        history = self._history.setdefault(key, deque())
        if not history or now - history[-1][0] >= SAMPLE_EVERY_S:
            history.append((now, counters))
        while len(history) > 2 and now - history[1][0] >= RATE_WINDOW_S:
            history.popleft()
        (t0, first), (t1, last) = history[0], history[-1]
        out: dict[str, float | None] = {}
        for field, name in RATE_FIELDS:
            delta = last.get(field, 0.0) - first.get(field, 0.0)
            out[name] = delta / (t1 - t0) if t1 > t0 and delta >= 0 else None
        return out

    def forget_except(self, keys: set[str]) -> None:
        for key in set(self._history) - keys:
            del self._history[key]


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


class ClusterView:
    def __init__(self, service: RouterService) -> None:
        self.service = service
        self.rates = RateTracker()

    def workers(self) -> list[dict[str, Any]]:
        """`GET /cluster`: one entry per worker."""
        from router.grpc_server import cluster_status  # here: grpc_server imports service, which imports us
        registry = self.service.registry
        out = []
        for status in cluster_status(registry):
            handle = registry.get(status.id)
            state = handle.state if handle is not None else None
            out.append({"role": status.role, "id": status.id, "address": status.address, "healthy": status.healthy,
                        "draining": status.draining, "routed_total": state.routed_total if state else 0,
                        "breaker": status.breaker, "breaker_failures": status.breaker_failures,
                        **{f: getattr(status, f) for f in CLUSTER_FIELDS}})
        return out

    def overview(self) -> dict[str, Any]:
        """`GET /cluster?view=overview`."""
        now = time.monotonic()
        workers = [self._detailed(entry, now) for entry in self.workers()]
        self.rates.forget_except({w["id"] for w in workers})
        roles = [role for role in ("encode", "prefill", "decode") if any(w["role"] == role for w in workers)]
        return {"time": time.time(), "model": self.service.model.name, "router": self._router(),
                "pools": {role: _pool([w for w in workers if w["role"] == role]) for role in roles},
                "workers": workers, "recent_errors": self._errors()}

    def _detailed(self, entry: dict[str, Any], now: float) -> dict[str, Any]:
        handle = self.service.registry.get(entry["id"])
        state = handle.state if handle is not None else None
        used = entry["kv_pages_total"] - entry["kv_pages_free"] - entry["kv_pages_cached"]
        hits, computed = entry["prefix_hit_tokens_total"], entry["prefill_tokens_total"]
        images = entry["images_encoded_total"] + entry["embedding_cache_hits_total"]
        health = "draining" if entry["draining"] else ("healthy" if entry["healthy"] else "down")
        return {**entry, "health": health, "kv_pages_used": used,
                "kv_page_utilization": _ratio(used, entry["kv_pages_total"]),
                "prefix_cache_hit_rate": _ratio(hits, hits + computed),
                "embedding_cache_hit_rate": _ratio(entry["embedding_cache_hits_total"], images),
                "rates": self.rates.rates(entry["id"], {f: float(entry.get(f, 0)) for f, _ in RATE_FIELDS}, now),
                "last_error": state.last_error if state else "",
                "last_error_at": state.last_error_at if state else None}

    def _router(self) -> dict[str, Any]:
        service = self.service
        counts = service.metrics.totals()
        return {"requests": service.metrics.outcomes(), "running": service.admission.running,
                "queued": service.admission.queued, "sessions_open": len(service.sessions), **counts,
                "prefix_cache_hit_rate": _ratio(counts["prefix_cache_hit_tokens_total"], counts["prompt_tokens_total"])}

    def _errors(self) -> list[dict[str, Any]]:
        events = self.service.recent_errors.events()
        for handle in self.service.registry.handles():
            state = handle.state
            if state.last_error_at is not None:
                kind = "recovered" if state.healthy else "unhealthy"
                events.append(ErrorEvent(state.last_error_at, "worker", kind, state.last_error, state.id))
        return [asdict(e) for e in sorted(events, key=lambda e: e.time, reverse=True)[:50]]


def _pool(workers: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(w["kv_pages_total"] for w in workers)
    used = sum(w["kv_pages_used"] for w in workers)
    hits = sum(w["prefix_hit_tokens_total"] for w in workers)
    computed = sum(w["prefill_tokens_total"] for w in workers)
    rates = {name: sum(w["rates"][name] or 0.0 for w in workers) for _, name in RATE_FIELDS}
    return {"workers": len(workers), "healthy": sum(w["healthy"] for w in workers),
            "draining": sum(w["draining"] for w in workers), "running": sum(w["running"] for w in workers),
            "waiting": sum(w["waiting"] for w in workers), "kv_pages_total": total, "kv_pages_used": used,
            "kv_page_utilization": _ratio(used, total), "prefix_cache_hit_rate": _ratio(hits, hits + computed),
            "queued_prefill_tokens": sum(w["queued_prefill_tokens"] for w in workers),
            "queued_images": sum(w["queued_images"] for w in workers),
            "sessions_open": sum(w["sessions_open"] for w in workers),
            "session_restores_total": sum(w["session_restores_total"] for w in workers),
            "pinned_pages": max((w["pinned_pages"] for w in workers), default=0), "rates": rates}
