"""A circuit breaker per worker: the router stops sending work to a worker whose calls
keep failing, even while its Status still answers (a prefill worker whose transfers
stall, a decode worker whose streams break), and tries it again carefully.

    closed     every call may go; `threshold` failures in a row open it
    open       no call goes, for `cooldown` seconds
    half_open  one call goes (the probe): success closes it, failure opens it again

Fed by the request path (router/dispatch.py): decode streams (a success once a stream
gives its first token or finishes, a failure when it breaks, times out or errors) and the
remote prefill attempts that decode reports back (proto `PrefillAttempt`). Refusals for
load (RESOURCE_EXHAUSTED) and bad requests count neither way. Owned by the event loop.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Callable

log = logging.getLogger("router.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUES = {CLOSED: 0.0, HALF_OPEN: 1.0, OPEN: 2.0}  # the metric's encoding


class CircuitBreaker:
    def __init__(self, name: str, threshold: int = 3, cooldown: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0  # consecutive
        self.opened_total = 0
        self._clock = clock
        self._open_since: float | None = None  # None: closed
        self._probe: int | None = None  # the half-open probe that is out
        self._probes = itertools.count(1)

    @property
    def state(self) -> str:
        if self._open_since is None:
            return CLOSED
        return HALF_OPEN if self._clock() - self._open_since >= self.cooldown else OPEN

    def allows(self) -> bool:
        """Whether new work may be routed to the worker now."""
        state = self.state
        return state == CLOSED or (state == HALF_OPEN and self._probe is None)

    def begin(self) -> int | None:
        """Work was routed to the worker; when it is the half-open probe, the probe's
        number (the caller ends it with an outcome or `end_probe`), else None."""
        if self.state == HALF_OPEN and self._probe is None:
            self._probe = next(self._probes)
            return self._probe
        return None

    def end_probe(self, probe: int) -> None:
        """That probe ended without an outcome (the request went elsewhere or away)."""
        if self._probe == probe:
            self._probe = None

    def record_success(self) -> None:
        if self._open_since is not None:
            log.info("circuit breaker of %s closed: a call succeeded", self.name)
        self.failures, self._open_since, self._probe = 0, None, None

    def record_failure(self, reason: str) -> None:
        self.failures += 1
        state = self.state
        if state == HALF_OPEN or (state == CLOSED and self.failures >= self.threshold):
            self.opened_total += 1
            log.warning("circuit breaker of %s open for %.1f s after %d failure(s) in a row: %s",
                        self.name, self.cooldown, self.failures, reason)
            self._open_since = self._clock()
            self._probe = None
