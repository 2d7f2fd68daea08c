"""What the decode worker counts about remote prefills, per prefill worker address, for
its /metrics: attempts, failures, attempts in flight, and what a failure led to (a retry
on the next candidate, or prefilling locally once every candidate failed).

Invariant once no request is in flight and none was cancelled mid-prefill:
sum(failures) == retries_total + local_fallbacks_total (each failed attempt is
followed by exactly one of the two). Owned by the worker's event loop.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from worker.metrics import REQUEST_BUCKETS, CountsBy, DurationHistogram, HistogramSample, Sample


@dataclass
class RemotePrefillStats:
    attempts: CountsBy = field(default_factory=lambda: CountsBy("remote_prefill_attempts_total", "prefill", True))
    failures: CountsBy = field(default_factory=lambda: CountsBy("remote_prefill_failures_total", "prefill", True))
    inflight: CountsBy = field(default_factory=lambda: CountsBy("remote_prefills_inflight", "prefill", False))
    # A successful remote prefill: the call until the last KV chunk landed here.
    durations: DurationHistogram = field(
        default_factory=lambda: DurationHistogram("remote_prefill_seconds", REQUEST_BUCKETS))
    retries_total: int = 0  # attempts made because the previous candidate failed
    local_fallbacks_total: int = 0  # requests prefilled here after every candidate failed

    @contextmanager
    def attempt(self, address: str, after_failure: bool) -> Iterator[None]:
        self.attempts.add(address)
        self.failures.add(address, 0)  # the series exists (at 0) from the first attempt on
        if after_failure:
            self.retries_total += 1
        with self.inflight.held(address):
            yield

    def samples(self) -> list[Sample | HistogramSample]:
        return [*self.attempts.samples(), *self.failures.samples(), *self.inflight.samples(), *self.durations.samples(),
                Sample("prefill_retries_total", self.retries_total, counter=True),
                Sample("local_prefill_fallbacks_total", self.local_fallbacks_total, counter=True)]
