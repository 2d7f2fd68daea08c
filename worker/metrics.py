"""A worker's Prometheus /metrics: the runtime's status snapshot plus per-peer counts
and latency histograms that the role services keep (remote prefill attempts on decode,
KV shipping on prefill, every KV transfer write).

Naming: `epd_worker_` + what is measured, in base units (seconds, bytes); counters end
in `_total`, nothing else does. Every family carries the worker's `pool`, `worker` and
`model` labels (the model's directory name), then its own (a peer's address, the
transfer `backend`).

Per-peer counts and histograms are owned by the worker's event loop; the HTTP server
thread only copies them (a ``dict(...)`` copy of a plain dict is one C call under the
GIL)."""
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from engine.spec.stats import SpecStats

PREFIX = "epd_worker_"
# A worker's requests: decode streams last seconds to minutes, prefill and encode calls
# milliseconds to tens of seconds.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# One KV transfer write: a chunk's pages, from tens of microseconds (shared memory) to seconds.
TRANSFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 10.0)


@dataclass(frozen=True)
class Sample:
    """One value. Counters are named ``..._total`` (exposed as such by Prometheus)."""

    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()
    counter: bool = False


@dataclass(frozen=True)
class HistogramSample:
    """One labelled histogram: cumulative counts per upper bound (the last is +Inf)."""

    name: str
    buckets: tuple[tuple[str, float], ...]
    total: float  # the sum of the observed values
    labels: tuple[tuple[str, str], ...] = ()


MetricSource = Callable[[], Iterable[Sample | HistogramSample]]


class CountsBy:
    """Counts keyed by one label value (e.g. a peer's address)."""

    def __init__(self, name: str, label: str, counter: bool) -> None:
        self.name = name
        self.label = label
        self.counter = counter
        self._counts: dict[str, int] = {}

    def add(self, key: str, amount: int = 1) -> None:
        self._counts[key] = self._counts.get(key, 0) + amount

    def get(self, key: str) -> int:
        return self._counts.get(key, 0)

    def total(self) -> int:
        return sum(dict(self._counts).values())

    @contextmanager
    def held(self, key: str) -> Iterator[None]:
        """A gauge: +1 for the duration of the block."""
        self.add(key)
        try:
            yield
        finally:
            self.add(key, -1)

    def samples(self) -> list[Sample]:
        return [Sample(self.name, float(v), ((self.label, k),), self.counter)
                for k, v in dict(self._counts).items()]


class DurationHistogram:
    """Observed durations in seconds, bucketed, per value of one optional label."""

    def __init__(self, name: str, buckets: tuple[float, ...], label: str | None = None) -> None:
        self.name = name
        self.bounds = tuple(sorted(buckets))
        self.label = label
        self._counts: dict[str, list[int]] = {}  # per key: one count per bound, then +Inf
        self._sums: dict[str, float] = {}

    def observe(self, seconds: float, key: str = "") -> None:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = [0] * (len(self.bounds) + 1)
        counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self._sums[key] = self._sums.get(key, 0.0) + seconds

    def count(self, key: str = "") -> int:
        return sum(self._counts.get(key, ()))

    def samples(self) -> list[HistogramSample]:
        out = []
        for key, counts in list(self._counts.items()):
            counts = list(counts)
            cumulative, running = [], 0
            for bound, count in zip([*(f"{b:g}" for b in self.bounds), "+Inf"], counts):
                running += count
                cumulative.append((bound, float(running)))
            labels = ((self.label, key),) if self.label else ()
            out.append(HistogramSample(self.name, tuple(cumulative), self._sums.get(key, 0.0), labels))
        return out


def families(samples: Iterable[Sample | HistogramSample], base_labels: dict[str, str]) -> list[Metric]:
    """Prometheus families, one per name; labels are ``base_labels`` then the sample's."""
    by_name: dict[str, Metric] = {}
    for sample in samples:
        extra = dict(sample.labels)
        family = by_name.get(sample.name)
        if family is None:
            family = _family(sample, [*base_labels, *extra])
            by_name[sample.name] = family
        values = [*base_labels.values(), *extra.values()]
        if isinstance(sample, HistogramSample):
            family.add_metric(values, list(sample.buckets), sample.total)
        else:
            family.add_metric(values, float(sample.value))
    return list(by_name.values())


def _family(sample: Sample | HistogramSample, labels: list[str]) -> Metric:
    text = sample.name.replace("_", " ")
    if isinstance(sample, HistogramSample):
        return HistogramMetricFamily(PREFIX + sample.name, text, labels=labels)
    kind = CounterMetricFamily if sample.counter else GaugeMetricFamily
    return kind(PREFIX + sample.name.removesuffix("_total"), text, labels=labels)


# WorkerStatus field -> metric name, where the field's name would break the naming rules
# (a gauge ending in _total) or say too little ("running" what).
_STATUS_RENAMES = {"kv_pages_total": "kv_pages_capacity", "embedding_slots_total": "embedding_slots_capacity",
                   "running": "requests_running", "waiting": "requests_waiting"}
# Status fields that are about the KV transfer backend: labelled with its name.
_TRANSFER_FIELDS = frozenset({"kv_bytes_sent_total", "kv_bytes_received_total", "kv_transfer_seconds_total"})


def status_samples(snapshot: dict[str, float], counters: Iterable[str], backend: str | None) -> list[Sample]:
    """Samples of a worker's status counts: counters are the fields named in `counters`;
    KV transfer fields carry `backend`; page counts add `kv_pages_used` (held by
    requests) and `kv_page_utilization` (its share of the pool; cached pages are
    evictable and not counted)."""
    counted = frozenset(counters)
    out = []
    for field, value in snapshot.items():
        labels = (("backend", backend),) if field in _TRANSFER_FIELDS and backend else ()
        out.append(Sample(_STATUS_RENAMES.get(field, field), float(value), labels, field in counted))
    capacity = snapshot.get("kv_pages_total")
    if capacity:
        used = capacity - snapshot.get("kv_pages_free", 0) - snapshot.get("kv_pages_cached", 0)
        out += [Sample("kv_pages_used", float(used)), Sample("kv_page_utilization", used / capacity)]
    return out


def _cumulative(bounds: Iterable[float], counts: list[int]) -> tuple[tuple[str, float], ...]:
    out, running = [], 0
    for bound, count in zip([*(f"{b:g}" for b in bounds), "+Inf"], list(counts)):
        running += count
        out.append((bound, float(running)))
    return tuple(out)


def spec_samples(stats: SpecStats) -> list[Sample | HistogramSample]:
    """Speculative decoding (engine/spec/stats.py), read live from the engine's counts:
    `spec_acceptance_length` (tokens a verify step emitted per request, 1 .. K+1),
    `spec_accepted_tokens_per_step` (drafts accepted over one engine step's batch),
    `spec_drafter_seconds` (the drafter's time per engine step), and counters."""
    from engine.spec.stats import ACCEPTED_PER_STEP_BOUNDS, DRAFTER_SECONDS_BOUNDS
    lengths = list(stats.acceptance_length_counts)
    length_bounds = range(1, len(lengths) - 1)  # bucket n counts steps that emitted n tokens (0 is unused)
    length_sum = float(sum(n * c for n, c in enumerate(lengths)))
    per_step = list(stats.accepted_per_step_counts)
    return [
        HistogramSample("spec_acceptance_length", _cumulative(length_bounds, lengths[1:]), length_sum),
        HistogramSample("spec_accepted_tokens_per_step", _cumulative(ACCEPTED_PER_STEP_BOUNDS, per_step),
                        float(stats.accepted_tokens_total)),
        HistogramSample("spec_drafter_seconds", _cumulative(DRAFTER_SECONDS_BOUNDS, list(stats.drafter_seconds_counts)),
                        stats.drafter_seconds_total),
        Sample("spec_draft_tokens_total", float(stats.draft_tokens_total), counter=True),
        Sample("spec_accepted_tokens_total", float(stats.accepted_tokens_total), counter=True),
        Sample("spec_verify_steps_total", float(stats.verify_steps_total), counter=True),
        Sample("spec_mean_acceptance_length", stats.mean_acceptance_length),
    ]
