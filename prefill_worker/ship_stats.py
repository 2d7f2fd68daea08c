"""What the prefill worker counts about shipping KV, per destination (the decode
worker's transfer address), for its /metrics.

`kv_ship_jobs` is a gauge of Prefill calls that hold pages for a destination; it drops
only after the call gave its pages back, so 0 for a dead decode worker means nothing is
held for it any more. Each call then ends as delivered, failed (transfer error or
timeout) or cancelled (the decode worker hung up or aborted). Owned by the event loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from worker.metrics import CountsBy, Sample


def _counts(name: str, counter: bool = True) -> CountsBy:
    return CountsBy(name, "decode", counter)


@dataclass
class ShipStats:
    jobs: CountsBy = field(default_factory=lambda: _counts("kv_ship_jobs", counter=False))
    delivered: CountsBy = field(default_factory=lambda: _counts("kv_ship_delivered_total"))
    failed: CountsBy = field(default_factory=lambda: _counts("kv_ship_failed_total"))
    cancelled: CountsBy = field(default_factory=lambda: _counts("kv_ship_cancelled_total"))

    def seen(self, destination: str) -> None:
        """Start the destination's outcome series at 0 (dashboards need them before the
        first failure)."""
        for outcome in (self.delivered, self.failed, self.cancelled):
            outcome.add(destination, 0)

    def samples(self) -> list[Sample]:
        return [*self.jobs.samples(), *self.delivered.samples(), *self.failed.samples(),
                *self.cancelled.samples()]
