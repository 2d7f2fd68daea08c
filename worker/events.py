"""The prefix-cache event log a worker publishes through Status.

Events carry chained page hashes (engine.radix_cache.page_hashes). A reader passes
the sequence number it has seen; when the log no longer reaches back that far (or the
worker restarted and counts from zero again) it gets a full snapshot instead.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from engine.radix_cache import KVEvent


class EventBatch(NamedTuple):
    seq: int
    reset: bool
    stored: list[int]
    removed: list[int]


class KVEventLog:
    def __init__(self, capacity: int = 4096) -> None:
        self._events: deque[tuple[int, KVEvent]] = deque(maxlen=capacity)
        self.seq = 0

    def extend(self, events: list[KVEvent]) -> None:
        for event in events:
            self.seq += 1
            self._events.append((self.seq, event))

    def since(self, after: int, snapshot: list[int]) -> EventBatch:
        """Events after `after`; a snapshot (`snapshot` = every cached hash) when the
        log cannot answer from there."""
        oldest = self._events[0][0] if self._events else self.seq + 1
        if after > self.seq or after < oldest - 1:
            return EventBatch(self.seq, True, snapshot, [])
        # Net effect in order: a page evicted then stored again within the window is stored.
        final: dict[int, str] = {}
        for seq, event in self._events:
            if seq > after:
                final.update(dict.fromkeys(event.hashes, event.kind))
        stored = [h for h, kind in final.items() if kind == "stored"]
        removed = [h for h, kind in final.items() if kind == "removed"]
        return EventBatch(self.seq, False, stored, removed)
