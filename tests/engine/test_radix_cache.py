"""RadixCache eviction order, priorities and pinned prefixes, with exact page ids.

Page size 2 throughout: tokens [a, b, c, d] are two pages."""
from __future__ import annotations

import pytest

from engine.radix_cache import PinError, RadixCache

P = 2


def cached(cache: RadixCache, tokens: list[int], pages: list[int], priority: int = 0) -> None:
    """Insert as a finished request does: match (reference), insert, unlock."""
    match = cache.match(tokens, priority)
    assert cache.insert(tokens, pages, priority) == []
    cache.unlock(match.nodes)


def test_unpinned_entries_evict_least_recently_used_leaves_first() -> None:
    cache = RadixCache(P)
    cached(cache, [1, 1, 2, 2], [10, 11])
    cached(cache, [3, 3, 4, 4], [20, 21])
    cached(cache, [5, 5], [30])
    cache.unlock(cache.match([1, 1, 2, 2]).nodes)  # the oldest entry is used again
    assert cache.evict(1) == [21]  # leaf of the least recently used path
    assert cache.evict(2) == [20, 30]  # its parent is now a leaf, older than [5, 5]
    assert cache.evict(9) == [11, 10]
    assert cache.cached_pages == 0


def test_lower_priority_evicts_first_then_lru_among_equals() -> None:
    cache = RadixCache(P)
    cached(cache, [1, 1], [10], priority=5)  # oldest, but important
    cached(cache, [2, 2], [20], priority=0)
    cached(cache, [3, 3], [30], priority=0)
    cached(cache, [4, 4], [40], priority=1)
    assert cache.evict(3) == [20, 30, 40]
    assert cache.evict(1) == [10]


def test_referenced_pages_are_never_evicted() -> None:
    cache = RadixCache(P)
    cached(cache, [1, 1, 2, 2], [10, 11])
    held = cache.match([1, 1, 2, 2])
    assert cache.evictable_pages == 0
    assert cache.evict(5) == []
    cache.unlock(held.nodes)
    assert cache.evictable_pages == 2 and cache.evict(5) == [11, 10]


def test_pinned_prefix_stays_resident_under_pressure_and_is_hit_by_every_session() -> None:
    system = [7, 7, 8, 8]  # two pages of "system prompt"
    cache = RadixCache(P, max_pinned_pages=4)
    cached(cache, system + [1, 1], [10, 11, 12])
    assert cache.pin(system) == 2
    assert (cache.pinned_pages, cache.resident_pinned_pages, cache.evictable_pages) == (2, 2, 1)
    for turn, page in enumerate((20, 30, 40)):  # sessions share the system prompt, churn their tails
        match = cache.match(system + [turn + 2, turn + 2])
        assert match.pages == [10, 11]  # every session hits the pinned pages
        cache.insert(system + [turn + 2, turn + 2], [10, 11, page])
        cache.unlock(match.nodes)
        assert cache.evict(100) == ([12, page] if turn == 0 else [page])  # pressure: all but pins
    assert cache.cached_pages == 2 and cache.evict(100) == []
    assert cache.unpin(system) and cache.evict(100) == [11, 10]


def test_pin_lands_on_pages_inserted_later() -> None:
    cache = RadixCache(P, max_pinned_pages=2)
    cache.pin([7, 7, 8, 8])
    assert cache.resident_pinned_pages == 0
    cached(cache, [7, 7, 8, 8, 9, 9], [10, 11, 12])
    assert cache.resident_pinned_pages == 2
    assert cache.evict(100) == [12]


def test_pins_over_the_cap_are_refused_and_shared_pages_count_once() -> None:
    cache = RadixCache(P, max_pinned_pages=3)
    cache.pin([7, 7, 8, 8])
    assert cache.pin([7, 7, 8, 8, 9, 9]) == 1  # shares two pages with the first pin
    assert cache.pinned_pages == 3
    with pytest.raises(PinError, match="cap of 3"):
        cache.pin([1, 1])
    with pytest.raises(PinError, match="full page"):
        cache.pin([1])
    assert cache.pinned_pages == 3


def test_shrinking_the_cap_unpins_least_recently_used_prefixes() -> None:
    cache = RadixCache(P, max_pinned_pages=4)
    cached(cache, [1, 1, 2, 2], [10, 11])
    cached(cache, [3, 3, 4, 4], [20, 21])
    cache.pin([1, 1, 2, 2])
    cache.pin([3, 3, 4, 4])
    cache.unlock(cache.match([1, 1, 2, 2]).nodes)  # the first pin is hit: now the newest use
    dropped = cache.set_pin_cap(2)
    assert len(dropped) == 1 and cache.pinned_pages == 2
    assert cache.evict(100) == [21, 20]  # the unpinned prefix goes; the hit one stays
    assert cache.cached_pages == 2


def test_request_priority_reaches_the_cache(tiny_model_path) -> None:  # noqa: ANN001
    """The engine caches a finished request's pages under its priority: the low-priority
    prompt's pages are evicted before the older, high-priority one's."""
    from engine import LLM, SamplingParams
    from engine.errors import InvalidRequestError
    llm = LLM(tiny_model_path, page_size=4)
    important, cheap = list(range(10, 30)), list(range(40, 60))
    llm.generate([important], SamplingParams(max_tokens=1, temperature=0, priority=3))
    llm.generate([cheap], SamplingParams(max_tokens=1, temperature=0))
    cache = llm.engine.scheduler.cache
    important_pages, cheap_pages = (llm.engine.scheduler.cache.match(p).pages for p in (important, cheap))
    for prompt in (important, cheap):
        nodes = cache.match(prompt).nodes
        cache.unlock(nodes)
        cache.unlock(nodes)
    assert cache.evictable_pages == cache.cached_pages
    freed = cache.evict(len(cheap_pages))
    assert len(cheap_pages) >= 4 and sorted(freed) == sorted(cheap_pages)
    assert not set(freed) & set(important_pages)
    with pytest.raises(InvalidRequestError, match="priority"):
        SamplingParams(priority=2**31)
