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


def _oracle_eviction(cache: RadixCache, count: int) -> list[int]:
    """The eviction order by definition, from a walk of the whole tree each time: the
    lowest (priority, last use) unheld leaf, repeatedly (a parent joins once bare)."""
    children: dict[int, set[int]] = {}
    info: dict[int, tuple[tuple[int, int], bool, int]] = {}  # node id -> (key, held, page)
    parent_of: dict[int, int] = {}
    stack = [(cache._root, None)]
    while stack:
        node, parent = stack.pop()
        if parent is not None:
            info[id(node)] = (node.eviction_key(), node.held, node.page)
            parent_of[id(node)] = id(parent)
            children.setdefault(id(parent), set()).add(id(node))
        children.setdefault(id(node), set())
        stack.extend((child, node) for child in node.children.values())
    freed: list[int] = []
    while len(freed) < count:
        leaves = [n for n, (_, held, _) in info.items() if not held and not children[n]]
        if not leaves:
            break
        leaf = min(leaves, key=lambda n: info[n][0])
        freed.append(info.pop(leaf)[2])
        children[parent_of[leaf]].discard(leaf)
    return freed


def test_eviction_order_matches_a_full_walk_under_random_use() -> None:
    """The cache keeps its eviction candidates as nodes change instead of walking the
    tree per eviction: over random inserts, matches, releases, pins and evictions, every
    eviction frees exactly the pages a full walk would pick, in its order."""
    import random
    rng = random.Random(7)
    cache, next_page, held = RadixCache(P, max_pinned_pages=6), 0, []
    for _ in range(3000):
        op = rng.random()
        tokens = [rng.randrange(3) for _ in range(P * rng.randrange(1, 6))]
        if op < 0.45:
            match = cache.match(tokens, rng.randrange(3))
            pages = match.pages + list(range(next_page, next_page + len(tokens) // P - match.num_pages))
            next_page += len(tokens) // P
            for page in cache.insert(tokens, pages, rng.randrange(3)):
                assert page >= next_page - len(tokens) // P  # only pages this insert brought
            if rng.random() < 0.3:
                held.append(match.nodes)  # a request still running on its prefix
            else:
                cache.unlock(match.nodes)
        elif op < 0.6 and held:
            cache.unlock(held.pop(rng.randrange(len(held))))
        elif op < 0.65:
            try:
                cache.pin(tokens)
            except PinError:
                pass
        elif op < 0.7:
            cache.unpin(tokens)
        else:
            count = rng.randrange(1, 5)
            expected = _oracle_eviction(cache, count)
            assert cache.evict(count) == expected
    for nodes in held:
        cache.unlock(nodes)
    cache.set_pin_cap(0)  # unpins everything
    expected = _oracle_eviction(cache, cache.cached_pages)
    assert len(expected) == cache.cached_pages == cache.evictable_pages
    assert cache.evict(cache.cached_pages) == expected
    assert cache.cached_pages == 0
