"""Prometheus metrics of one router, in its own CollectorRegistry.

- `epd_router_*{model}`: request outcomes, latencies (TTFT, inter-token, end-to-end,
  admission queue) and token counts as the router saw them; running and queued requests.
- `epd_router_worker_*{pool,worker,model}`: each worker as the router sees it: in
  rotation or not, draining, requests routed there, and the counts of its last Status
  (KV pages, queues, transfer bytes, prefix-cache hits). A scrape of the router alone
  sees the whole cluster; each worker's own `/metrics` (`epd_worker_*`) adds its
  histograms and per-peer counts.

Names follow Prometheus practice: base units (seconds, bytes), `_total` on counters only.
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.breaker import STATE_VALUES
from router.registry import WorkerHandle

# From a cached short prompt on a GPU (milliseconds) to a long queue or output (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 7.5, 10.0,
                   20.0, 30.0, 60.0, 120.0, 300.0)
# Between two tokens: a fast GPU decode step (~5 ms) to a preempted or stalled request.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
               2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name, WorkerStatus field, help) of the worker counters re-exported as is.
_WORKER_COUNTERS = (
    ("kv_bytes_sent", "kv_bytes_sent_total", "KV cache bytes the worker sent"),
    ("kv_bytes_received", "kv_bytes_received_total", "KV cache bytes the worker received"),
    ("prefix_hit_tokens", "prefix_hit_tokens_total", "prompt tokens served from the worker's prefix cache"),
    ("prefill_tokens", "prefill_tokens_total", "prompt tokens the worker computed"),
    ("requests", "requests_total", "requests the worker handled"),
    ("images_encoded", "images_encoded_total", "images the worker's vision tower encoded"),
    ("embedding_cache_hits", "embedding_cache_hits_total", "images served from the worker's embedding cache"),
    ("embedding_bytes_sent", "embedding_bytes_sent_total", "image embedding bytes the worker sent"),
    ("embedding_bytes_received", "embedding_bytes_received_total", "image embedding bytes the worker received"),
    ("session_restores", "session_restores_total", "turns that started from their session's kept KV"),
    ("session_restored_tokens", "session_restored_tokens_total", "prompt tokens session restores served"),
)
# (metric name, WorkerStatus field) of the gauges.
_WORKER_GAUGES = (("kv_pages_capacity", "kv_pages_total"), ("kv_pages_free", "kv_pages_free"),
                  ("kv_pages_cached", "kv_pages_cached"), ("requests_running", "running"),
                  ("requests_waiting", "waiting"), ("queued_prefill_tokens", "queued_prefill_tokens"),
                  ("queued_images", "queued_images"), ("embedding_slots_free", "embedding_slots_free"),
                  ("embedding_slots_capacity", "embedding_slots_total"), ("sessions_open", "sessions_open"),
                  ("pinned_pages", "pinned_pages"), ("pinned_pages_resident", "pinned_pages_resident"))
WORKER_PREFIX = "epd_router_worker_"


class WorkerCollector(Collector):
    """Reads the workers' last Status at scrape time."""

    def __init__(self, handles: Callable[[], list[WorkerHandle]], model: str) -> None:
        self._handles = handles
        self._model = model

    def collect(self) -> Iterator[Metric]:
        labels = ["pool", "worker", "model"]
        p = WORKER_PREFIX
        up = GaugeMetricFamily(p + "healthy", "1 while the worker is in rotation", labels=labels)
        draining = GaugeMetricFamily(p + "draining", "1 while the worker drains", labels=labels)
        routed = CounterMetricFamily(p + "routed_requests", "requests this router sent the worker", labels=labels)
        utilization = GaugeMetricFamily(p + "kv_page_utilization", "share of KV pages held by requests",
                                        labels=labels)
        breaker = GaugeMetricFamily(p + "breaker_state", "the router's circuit breaker: 0 closed, 1 half-open, 2 open",
                                    labels=labels)
        failures = GaugeMetricFamily(p + "breaker_failures", "failures in a row the router saw on the worker's calls",
                                     labels=labels)
        opened = CounterMetricFamily(p + "breaker_opened", "times the worker's breaker opened", labels=labels)
        counters = {f: CounterMetricFamily(p + name, text, labels=labels) for name, f, text in _WORKER_COUNTERS}
        gauges = {f: GaugeMetricFamily(p + name, f"{f} in the worker's last Status", labels=labels)
                  for name, f in _WORKER_GAUGES}
        for handle in self._handles():
            state = handle.state
            key = [state.role, state.id, self._model]
            up.add_metric(key, 1.0 if state.healthy else 0.0)
            draining.add_metric(key, 1.0 if state.draining else 0.0)
            routed.add_metric(key, float(state.routed_total))
            breaker.add_metric(key, STATE_VALUES[state.breaker.state])
            failures.add_metric(key, float(state.breaker.failures))
            opened.add_metric(key, float(state.breaker.opened_total))
            status = state.status
            if status is None:
                continue
            for field, family in (*counters.items(), *gauges.items()):
                family.add_metric(key, float(getattr(status, field)))
            if status.kv_pages_total:
                held = status.kv_pages_total - status.kv_pages_free - status.kv_pages_cached
                utilization.add_metric(key, held / status.kv_pages_total)
        yield from (up, draining, routed, utilization, breaker, failures, opened, *counters.values(), *gauges.values())


class RouterMetrics:
    def __init__(self, handles: Callable[[], list[WorkerHandle]], model: str = "") -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, ["model"]
        self.model = model
        self._requests = Counter("epd_router_requests", "requests by outcome", ["model", "status"], registry=r)
        self.ttft = Histogram("epd_router_time_to_first_token_seconds", "arrival to first token", m,
                              buckets=LATENCY_BUCKETS, registry=r).labels(model)
        self.itl = Histogram("epd_router_inter_token_latency_seconds", "between two streamed chunks", m,
                             buckets=ITL_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram("epd_router_e2e_request_latency_seconds", "arrival to finish", m,
                             buckets=LATENCY_BUCKETS, registry=r).labels(model)
        self.queue_time = Histogram("epd_router_queue_time_seconds", "waiting for an admission slot", m,
                                    buckets=LATENCY_BUCKETS, registry=r).labels(model)
        self.prompt_tokens = Counter("epd_router_prompt_tokens", "prompt tokens routed", m, registry=r).labels(model)
        self.generation_tokens = Counter("epd_router_generation_tokens", "tokens generated", m,
                                         registry=r).labels(model)
        self.cached_tokens = Counter("epd_router_prefix_cache_hit_tokens",
                                     "prompt tokens served from a prefix cache (from usage)", m,
                                     registry=r).labels(model)
        self.retries = Counter("epd_router_decode_retries",
                               "requests moved to another decode worker before their first token", m,
                               registry=r).labels(model)
        self.migrations = Counter("epd_router_migrations",
                                  "requests resumed on another decode worker after tokens had streamed", m,
                                  registry=r).labels(model)
        self.sessions_open = Gauge("epd_router_sessions_open", "sessions this router keeps on their workers", m,
                                   registry=r).labels(model)
        self.session_moves = Counter("epd_router_session_moves",
                                     "session turns sent to another decode worker than the session's last one "
                                     "(it was gone, unhealthy, full or failed)", m, registry=r).labels(model)
        self.running = Gauge("epd_router_requests_running", "requests holding a slot", m, registry=r).labels(model)
        self.queued = Gauge("epd_router_requests_queued", "requests waiting for a slot", m,
                            registry=r).labels(model)
        r.register(WorkerCollector(handles, model))

    def requests(self, status: str) -> Counter:
        """The request counter of one outcome (ok, error, aborted, rejected, ...)."""
        return self._requests.labels(self.model, status)

    def outcomes(self) -> dict[str, float]:
        """Requests so far by outcome (what /cluster?view=overview shows)."""
        return {s.labels["status"]: s.value for metric in self._requests.collect() for s in metric.samples
                if s.name.endswith("_total")}

    def totals(self) -> dict[str, float]:
        """Token counts so far, by their metric names without the prefix."""
        counters = (("prompt_tokens_total", self.prompt_tokens), ("generation_tokens_total", self.generation_tokens),
                    ("prefix_cache_hit_tokens_total", self.cached_tokens), ("decode_retries_total", self.retries),
                    ("migrations_total", self.migrations), ("session_moves_total", self.session_moves))
        return {name: _value(counter) for name, counter in counters}

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _value(child: Counter) -> float:
    """A counter child's value, through the public collect()."""
    return next(s.value for m in child.collect() for s in m.samples if s.name.endswith("_total"))
