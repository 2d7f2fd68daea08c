"""The circuit breaker's states on a fake clock (router/breaker.py)."""
from __future__ import annotations

from router.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_failures_in_a_row_open_it_and_a_success_resets_the_count() -> None:
    breaker = CircuitBreaker("w", threshold=3, cooldown=5.0, clock=Clock())
    breaker.record_failure("a")
    breaker.record_failure("b")
    breaker.record_success()
    breaker.record_failure("c")
    breaker.record_failure("d")
    assert breaker.state == CLOSED and breaker.allows() and breaker.failures == 2
    breaker.record_failure("e")
    assert breaker.state == OPEN and not breaker.allows() and breaker.opened_total == 1


def test_one_probe_after_the_cooldown() -> None:
    clock = Clock()
    breaker = CircuitBreaker("w", threshold=1, cooldown=5.0, clock=clock)
    breaker.record_failure("down")
    clock.now += 4.9
    assert breaker.state == OPEN and breaker.begin() is None
    clock.now += 0.2
    assert breaker.state == HALF_OPEN and breaker.allows()
    probe = breaker.begin()
    assert probe is not None
    assert not breaker.allows() and breaker.begin() is None  # one probe at a time
    breaker.end_probe(probe)  # it went elsewhere: another may probe
    second = breaker.begin()
    assert second is not None and second != probe
    breaker.end_probe(probe)  # a stale probe's end frees nothing
    assert not breaker.allows()
    breaker.record_failure("still down")  # the probe failed: open again, cooldown anew
    assert breaker.state == OPEN and breaker.opened_total == 2
    clock.now += 5.0
    assert breaker.begin() is not None
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.failures == 0 and breaker.allows()
