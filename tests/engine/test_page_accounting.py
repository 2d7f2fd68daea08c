"""Page pool and radix cache: counts, reference counting, LRU eviction, and the engine's
page invariant after workloads."""
from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from engine.page_pool import OutOfPagesError, PagePool
from engine.radix_cache import RadixCache, page_hashes


def test_page_pool_allocates_and_frees() -> None:
    pool = PagePool(8)
    pages = pool.allocate(3)
    assert pages == [0, 1, 2] and pool.free_pages == 5
    with pytest.raises(OutOfPagesError):
        pool.allocate(6)
    pool.free(pages)
    assert pool.free_pages == 8
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([1])


def test_radix_match_insert_and_refcounts() -> None:
    cache = RadixCache(page_size=2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert cache.insert(tokens, [10, 11, 12]) == []  # 3 full pages; token 7 is partial
    assert cache.cached_pages == 3 and cache.evictable_pages == 3
    match = cache.match([1, 2, 3, 4, 9, 9])
    assert match.pages == [10, 11]
    assert cache.evictable_pages == 1
    # Same tokens already cached in another page: the caller's page comes back to free.
    assert cache.insert([1, 2, 3, 4], [10, 20]) == [20]
    assert cache.evict(10) == [12]  # referenced pages are never evicted
    cache.unlock(match.nodes)
    assert sorted(cache.evict(10)) == [10, 11]
    assert cache.cached_pages == 0


def test_radix_eviction_is_lru_and_leaf_first() -> None:
    cache = RadixCache(page_size=1)
    cache.insert([1, 2], [0, 1])
    cache.insert([5, 6], [2, 3])
    cache.unlock(cache.match([1, 2]).nodes)  # touch [1, 2]: now most recent
    assert cache.evict(2) == [3, 2]  # the older branch goes first, leaf before parent
    events = cache.drain_events()
    assert events[-1].kind == "removed" and events[-1].hashes == page_hashes([5, 6], 1)[::-1]
    assert events[0].kind == "stored" and events[0].hashes == page_hashes([1, 2], 1)


def test_pages_return_after_random_workloads(tiny_model_path) -> None:  # noqa: ANN001
    rng = random.Random(0)
    llm = LLM(tiny_model_path, num_pages=64, page_size=4, max_num_batched_tokens=64)
    base = [rng.randrange(500) for _ in range(60)]
    for round_ in range(3):
        prompts = [base[: rng.randrange(1, 60)] + [rng.randrange(500) for _ in range(rng.randrange(1, 40))]
                   for _ in range(12)]
        params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randrange(1, 30), seed=i)
                  for i in range(12)]
        llm.generate(prompts, params)
        acct = llm.engine.check_page_invariants()
        assert acct.held_by_requests == 0
        assert acct.free + acct.cached == acct.total and acct.evictable == acct.cached
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.free_cache() > 0
    assert llm.engine.page_accounting().free == 64


def test_abort_releases_pages(tiny_model_path) -> None:  # noqa: ANN001
    llm = LLM(tiny_model_path, num_pages=64, page_size=4)
    engine = llm.engine
    rid = engine.add_request(list(range(1, 50)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.page_accounting().held_by_requests > 0
    assert engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    acct = engine.check_page_invariants()
    assert acct.held_by_requests == 0 and acct.free + acct.cached == 64
