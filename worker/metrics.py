"""A worker's Prometheus /metrics: the runtime's status snapshot plus per-peer counts
that the role services keep (remote prefill attempts on decode, KV shipping on prefill).

Per-peer counts are owned by the worker's event loop; the HTTP server thread only
copies them (a ``dict(...)`` copy of a plain dict is one C call under the GIL)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "epd_worker_"


@dataclass(frozen=True)
class Sample:
    """One value. Counters are named ``..._total`` (exposed as such by Prometheus)."""

    name: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()
    counter: bool = False


MetricSource = Callable[[], Iterable[Sample]]


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


def families(samples: Iterable[Sample], base_labels: dict[str, str]) -> list[Metric]:
    """Prometheus families, one per name; labels are ``base_labels`` then the sample's."""
    by_name: dict[str, Metric] = {}
    for sample in samples:
        extra = dict(sample.labels)
        family = by_name.get(sample.name)
        if family is None:
            kind = CounterMetricFamily if sample.counter else GaugeMetricFamily
            family = kind(PREFIX + sample.name.removesuffix("_total"), sample.name.replace("_", " "),
                          labels=[*base_labels, *extra])
            by_name[sample.name] = family
        family.add_metric([*base_labels.values(), *extra.values()], float(sample.value))
    return list(by_name.values())
