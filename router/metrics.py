"""Prometheus metrics of one router, in its own CollectorRegistry: request outcomes,
latencies and token counts observed by the router, plus each worker's counters as last
reported by its Status (KV transfer bytes, prefix-cache hits, prefill tokens)."""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.registry import WorkerHandle

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric suffix, WorkerStatus field, help) of the worker counters re-exported as is.
_WORKER_COUNTERS = (
    ("kv_bytes_sent", "kv_bytes_sent_total", "KV cache bytes the worker sent"),
    ("kv_bytes_received", "kv_bytes_received_total", "KV cache bytes the worker received"),
    ("prefix_cache_hit_tokens", "prefix_hit_tokens_total", "prompt tokens served from the worker's prefix cache"),
    ("prefill_tokens", "prefill_tokens_total", "prompt tokens the worker computed"),
    ("requests", "requests_total", "requests the worker handled"),
    ("images_encoded", "images_encoded_total", "images the worker's vision tower encoded"),
    ("embedding_cache_hits", "embedding_cache_hits_total", "images served from the worker's embedding cache"),
    ("embedding_bytes_sent", "embedding_bytes_sent_total", "image embedding bytes the worker sent"),
    ("embedding_bytes_received", "embedding_bytes_received_total", "image embedding bytes the worker received"),
)
_WORKER_GAUGES = ("kv_pages_total", "kv_pages_free", "kv_pages_cached", "running", "waiting",
                  "queued_prefill_tokens", "queued_images", "embedding_slots_free", "embedding_slots_total")


class WorkerCollector(Collector):
    """Reads the workers' last Status at scrape time."""

    def __init__(self, handles: Callable[[], list[WorkerHandle]]) -> None:
        self._handles = handles

    def collect(self) -> Iterator[Metric]:
        labels = ["role", "worker"]
        up = GaugeMetricFamily("epd_worker_healthy", "1 while the worker is in rotation", labels=labels)
        counters = {f: CounterMetricFamily(f"epd_worker_{name}", text, labels=labels)
                    for name, f, text in _WORKER_COUNTERS}
        gauges = {f: GaugeMetricFamily(f"epd_worker_{f}", f"{f} in the worker's last Status", labels=labels)
                  for f in _WORKER_GAUGES}
        for handle in self._handles():
            state = handle.state
            key = [state.role, state.id]
            up.add_metric(key, 1.0 if state.healthy else 0.0)
            if state.status is None:
                continue
            for field, family in counters.items():
                family.add_metric(key, float(getattr(state.status, field)))
            for field, family in gauges.items():
                family.add_metric(key, float(getattr(state.status, field)))
        yield up
        yield from counters.values()
        yield from gauges.values()


class RouterMetrics:
    def __init__(self, handles: Callable[[], list[WorkerHandle]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("epd_router_requests", "requests by outcome", ["status"], registry=r)
        self.ttft = Histogram("epd_router_time_to_first_token_seconds", "arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("epd_router_inter_token_latency_seconds", "between two streamed chunks",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("epd_router_e2e_request_latency_seconds", "arrival to finish",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("epd_router_queue_time_seconds", "waiting for an admission slot",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("epd_router_prompt_tokens", "prompt tokens routed", registry=r)
        self.generation_tokens = Counter("epd_router_generation_tokens", "tokens generated", registry=r)
        self.cached_tokens = Counter("epd_router_prefix_cache_hit_tokens",
                                     "prompt tokens served from a prefix cache (from usage)", registry=r)
        self.retries = Counter("epd_router_decode_retries", "requests moved to another decode worker",
                               registry=r)
        self.running = Gauge("epd_router_requests_running", "requests holding a slot", registry=r)
        self.queued = Gauge("epd_router_requests_queued", "requests waiting for a slot", registry=r)
        r.register(WorkerCollector(handles))

    def render(self) -> bytes:
        return generate_latest(self.registry)
