"""What the router knows about one worker: its last reported load, the prefix pages it
holds (from its KV events), and the work the router itself has sent it.

Ownership: the health monitor writes `healthy`, `status` and the prefix index's events;
the request path writes the in-flight counters and the index's predictions. Everything
runs on one event loop, so no locks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from router.breaker import CircuitBreaker

Clock = Callable[[], float]


class StatusLike(Protocol):
    """The fields of `epd_pb2.WorkerStatus` the prefix index reads."""

    event_seq: int
    events_reset: bool
    stored: Sequence[int]
    removed: Sequence[int]


class PrefixIndex:
    """The set of chained page hashes a worker holds, mirrored from its KV events, plus
    the router's own predictions: pages of prompts routed there and not yet reported
    (so a burst of one prefix sticks to one worker before its events come back).

    A prediction lives while a request that will compute those pages is in flight to
    the worker, and `grace` seconds after (time for the next Status to confirm it)."""

    def __init__(self, grace: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.cursor = 0  # event_seq of the last event applied; sent as after_event
        self._hashes: set[int] = set()
        self._holders: dict[int, int] = {}  # predicted hash -> requests in flight computing it
        self._expiry: dict[int, float] = {}  # predicted hash with no holder -> when it lapses
        self._grace = grace
        self._clock = clock
        self._next_sweep = 0.0  # when unpredict next drops lapsed entries from _expiry

    @property
    def num_pages(self) -> int:
        return len(self._hashes)

    @property
    def num_predicted(self) -> int:
        """Predicted pages still counted: held by a request in flight, or in their grace."""
        return len(self._holders) + len(self._expiry)

    def apply(self, status: StatusLike) -> None:
        """Apply one Status reply. Within a reply the worker reports net effects, so a
        hash is never in both lists; `removed` is applied last to stay conservative."""
        if status.events_reset:
            self._hashes = set(status.stored)
        else:
            self._hashes.update(status.stored)
        self._hashes.difference_update(status.removed)
        for h in status.stored:
            self._expiry.pop(h, None)  # confirmed
        self.cursor = status.event_seq

    def reset(self) -> None:
        """Forget the reported pages (the worker went away); the next poll asks from event 0."""
        self._hashes.clear()
        self._expiry.clear()
        self.cursor = 0

    def predict(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._holders[h] = self._holders.get(h, 0) + 1
            self._expiry.pop(h, None)

    def unpredict(self, hashes: Sequence[int]) -> None:
        """The request that would compute these pages is done with this worker."""
        now = self._clock()
        self._sweep(now)
        lapse = now + self._grace
        for h in hashes:
            count = self._holders.get(h, 0) - 1
            if count > 0:
                self._holders[h] = count
                continue
            self._holders.pop(h, None)
            if h not in self._hashes:
                self._expiry[h] = lapse

    def _sweep(self, now: float) -> None:
        """Drop lapsed predictions, at most once per grace period. Lookups drop the ones
        they meet, but a prediction the worker never confirms (decode prefilled the
        prompt itself, or the pages were evicted before a Status reported them) is met
        again only by a prompt with the same prefix: without this sweep, one entry per
        such page stayed for the router's lifetime. With it, _expiry holds about two
        grace periods' worth of pages."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._grace
        self._expiry = {h: t for h, t in self._expiry.items() if t >= now}

    def _predicted(self, h: int, now: float) -> bool:
        if h in self._holders:
            return True
        expiry = self._expiry.get(h)
        if expiry is None:
            return False
        if expiry < now:
            del self._expiry[h]
            return False
        return True

    def matched_pages(self, hashes: Sequence[int]) -> int:
        """How many leading pages of a prompt (its chained hashes) this worker holds."""
        now = self._clock()
        count = 0
        for h in hashes:
            if h not in self._hashes and not self._predicted(h, now):
                break
            count += 1
        return count


@dataclass
class WorkerLoad:
    """A worker's load as last reported by its Status (zeros before the first reply)."""

    kv_pages_total: int = 0
    kv_pages_free: int = 0
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    page_size: int = 0
    max_model_len: int = 0
    queued_images: int = 0  # encode workers: accepted, not yet encoded


@dataclass
class WorkerState:
    role: str  # "encode", "prefill" or "decode"
    id: str
    address: str
    static: bool = False  # named on the command line (never forgotten)
    healthy: bool = False  # in rotation; false until the first Status succeeds
    draining: bool = False  # leaving its pool: no new requests (router/pools.py, or its own Status)
    load: WorkerLoad = field(default_factory=WorkerLoad)
    prefix: PrefixIndex = field(default_factory=PrefixIndex)
    last_ok: float | None = None  # monotonic time of the last successful Status
    down_since: float | None = None  # monotonic time it was taken out of rotation
    status: object | None = None  # the last WorkerStatus message, for /cluster
    last_error: str = ""  # why it last left rotation (/cluster, /dashboard)
    last_error_at: float | None = None  # wall-clock time of that
    # Fed by the request path (router/breaker.py); the registry gives it the configured limits.
    breaker: CircuitBreaker = field(default_factory=lambda: CircuitBreaker(""))
    # Router-side work in flight: requests streaming from a decode worker, and prompt
    # tokens routed to a prefill worker whose first token has not come back yet.
    inflight_requests: int = 0
    inflight_prefill_tokens: int = 0
    inflight_images: int = 0  # encode workers: images routed here whose prefill is not done
    routed_total: int = 0

    def effective_requests(self) -> int:
        """Requests on the worker: its own count, or the router's when that is higher
        (requests just sent, not yet in the worker's last Status)."""
        return max(self.load.running + self.load.waiting, self.inflight_requests)

    def effective_queued_images(self) -> int:
        return max(self.load.queued_images, self.inflight_images)

    def effective_queued_tokens(self) -> int:
        return max(self.load.queued_prefill_tokens, self.inflight_prefill_tokens)

    def lease(self, prefill_tokens: int = 0, predicted: Sequence[int] = ()) -> Lease:
        """Count one routed request until released: its uncached prompt tokens (prefill
        work queued here) and the prefix pages it will leave cached here."""
        self.inflight_requests += 1
        self.inflight_prefill_tokens += prefill_tokens
        self.routed_total += 1
        self.prefix.predict(predicted)
        return Lease(self, prefill_tokens, predicted)


class Lease:
    """One request's share of a worker's in-flight counters; every release is idempotent
    so a request's share leaves the counters exactly once, however it ends."""

    def __init__(self, worker: WorkerState, prefill_tokens: int, predicted: Sequence[int]) -> None:
        self.worker = worker
        self._prefill_tokens = prefill_tokens
        self._predicted = predicted
        self._open = True

    def prefill_done(self) -> None:
        """The prompt is computed (first token arrived): its tokens are no longer queued."""
        self.worker.inflight_prefill_tokens -= self._prefill_tokens
        self._prefill_tokens = 0
        self.worker.prefix.unpredict(self._predicted)
        self._predicted = ()

    def close(self) -> None:
        self.prefill_done()
        if self._open:
            self.worker.inflight_requests -= 1
            self._open = False
