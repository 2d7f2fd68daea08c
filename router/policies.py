"""Routing policies: which decode worker owns a request, and which prefill workers it
should try, best first. A policy only ranks; the caller filters out unhealthy workers
and does the bookkeeping (leases, prefix predictions).

Policies register by name (`@register_policy`); `create_policy(name)` builds one.
"""
from __future__ import annotations

import itertools
from collections import Counter, OrderedDict
import random
from abc import ABC, abstractmethod
from typing import Callable, ClassVar, Sequence

from engine.radix_cache import page_hashes
from router.worker_state import WorkerState

# A full page pool counts like this many extra running requests on a decode worker.
PAGE_PRESSURE_WEIGHT = 4.0
# An uncached prompt token costs twice: once to compute it now, and once more later for
# whichever cached prefix its pages evict. Without this, a worker holding a prefix loses
# it to a slightly shorter queue elsewhere and the caches thrash under load.
MISS_WEIGHT = 2
OWNER_TABLE_SIZE = 4096


class RouteRequest:
    """A prompt being routed, with its chained page hashes computed once per page size."""

    def __init__(self, prompt_token_ids: Sequence[int], cache_keys: Sequence[int] | None = None,
                 session_id: str = "") -> None:
        self.prompt_token_ids = list(prompt_token_ids)
        self.session_id = session_id  # a turn of this session ("" for none): router/sessions.py
        # What the workers' prefix caches key on: the prompt, with image positions keyed
        # by image hash (engine.multimodal.cache_keys) when it has images.
        self.cache_keys = list(cache_keys) if cache_keys is not None else self.prompt_token_ids
        self._hashes: dict[int, list[int]] = {}

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    def page_hashes(self, page_size: int) -> list[int]:
        if page_size not in self._hashes:
            self._hashes[page_size] = page_hashes(self.cache_keys, page_size)
        return self._hashes[page_size]

    def cached_tokens(self, worker: WorkerState) -> int:
        """Prompt tokens the worker holds as a cached prefix (0 before it reports a page size)."""
        page_size = worker.load.page_size
        if page_size <= 0:
            return 0
        return worker.prefix.matched_pages(self.page_hashes(page_size)) * page_size

    def uncached_tokens(self, worker: WorkerState) -> int:
        return self.prompt_len - self.cached_tokens(worker)


class RoutingPolicy(ABC):
    """Ranks healthy workers for one request. Rankings list every given worker."""

    name: ClassVar[str]

    @abstractmethod
    def rank_decode(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        """Decode workers, best first."""

    @abstractmethod
    def rank_prefill(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        """Prefill workers, best first."""


_POLICIES: dict[str, type[RoutingPolicy]] = {}


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    _POLICIES[cls.name] = cls
    return cls


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def create_policy(name: str, seed: int | None = None) -> RoutingPolicy:
    if name not in _POLICIES:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {policy_names()}")
    return _POLICIES[name](seed)


class _Rotation:
    """Breaks ties between equally good workers by rotating which one comes first."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def rank(self, workers: Sequence[WorkerState], score: Callable[[WorkerState], tuple]) -> list[WorkerState]:
        if not workers:
            return []
        offset = next(self._counter) % len(workers)
        order = {id(w): (i - offset) % len(workers) for i, w in enumerate(workers)}
        return sorted(workers, key=lambda w: (score(w), order[id(w)]))


def decode_load(worker: WorkerState) -> float:
    """Requests on the worker plus page-pool pressure; lower is better."""
    load = worker.load
    used = 1.0 - load.kv_pages_free / load.kv_pages_total if load.kv_pages_total else 0.0
    return worker.effective_requests() + PAGE_PRESSURE_WEIGHT * used


def prefill_cost(request: RouteRequest, worker: WorkerState) -> int:
    """Tokens of work this prompt costs on the worker: its uncached part (weighted by
    MISS_WEIGHT) plus the prefill work already queued there (the worker's own count, or
    what the router has in flight to it when that is more)."""
    return MISS_WEIGHT * request.uncached_tokens(worker) + worker.effective_queued_tokens()


@register_policy
class PrefixAwarePolicy(RoutingPolicy):
    """Decode by load (prefix overlap breaks ties); prefill by prefix overlap against
    queued prefill work, ties going to the worker with the most free pages (a new
    prefix evicts nothing there). The default."""

    name = "prefix_aware"

    def __init__(self, seed: int | None = None) -> None:
        self._decode = _Rotation()
        self._prefill = _Rotation()
        # First-page hash of recent prompts -> prefill worker it went to, LRU-bounded.
        # A prefix nobody holds goes to the worker owning the fewest recent prefixes, so
        # distinct prefixes spread evenly instead of following momentary queue lengths.
        self._owners: OrderedDict[int, str] = OrderedDict()

    def rank_decode(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._decode.rank(workers, lambda w: (decode_load(w), -request.cached_tokens(w)))

    def rank_prefill(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        root = self._root(request, workers)
        owned = Counter(self._owners.values())
        owner = self._owners.get(root) if root is not None else None

        def miss_penalty(w: WorkerState) -> int:
            # Only when the prompt is a miss everywhere: keep to its owner, else spread.
            if owner is not None:
                return 0 if w.id == owner else 1
            return owned[w.id]

        all_miss = all(request.cached_tokens(w) == 0 for w in workers)
        ranked = self._prefill.rank(workers, lambda w: (
            prefill_cost(request, w) + (request.prompt_len * miss_penalty(w) if all_miss else 0),
            -w.load.kv_pages_free, w.inflight_requests))
        if root is not None and ranked:
            self._owners[root] = ranked[0].id
            self._owners.move_to_end(root)
            while len(self._owners) > OWNER_TABLE_SIZE:
                self._owners.popitem(last=False)
        return ranked

    @staticmethod
    def _root(request: RouteRequest, workers: Sequence[WorkerState]) -> int | None:
        page_size = next((w.load.page_size for w in workers if w.load.page_size > 0), 0)
        hashes = request.page_hashes(page_size) if page_size else []
        return hashes[0] if hashes else None


@register_policy
class LoadPolicy(RoutingPolicy):
    """Load only: decode by load, prefill by queued prefill tokens; ignores prefixes."""

    name = "load"

    def __init__(self, seed: int | None = None) -> None:
        self._decode = _Rotation()
        self._prefill = _Rotation()

    def rank_decode(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._decode.rank(workers, lambda w: (decode_load(w),))

    def rank_prefill(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._prefill.rank(workers, lambda w: (w.effective_queued_tokens(), w.inflight_requests))


@register_policy
class RoundRobinPolicy(RoutingPolicy):
    """Each role's workers in turn, whatever their load (a baseline for comparison)."""

    name = "round_robin"

    def __init__(self, seed: int | None = None) -> None:
        self._decode = itertools.count()
        self._prefill = itertools.count()

    @staticmethod
    def _rotate(workers: Sequence[WorkerState], counter: itertools.count) -> list[WorkerState]:
        if not workers:
            return []
        start = next(counter) % len(workers)
        return list(workers[start:]) + list(workers[:start])

    def rank_decode(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._rotate(workers, self._decode)

    def rank_prefill(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._rotate(workers, self._prefill)


@register_policy
class RandomPolicy(RoutingPolicy):
    """A uniformly random order (a baseline for comparison)."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def _shuffle(self, workers: Sequence[WorkerState]) -> list[WorkerState]:
        out = list(workers)
        self._rng.shuffle(out)
        return out

    def rank_decode(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._shuffle(workers)

    def rank_prefill(self, request: RouteRequest, workers: Sequence[WorkerState]) -> list[WorkerState]:
        return self._shuffle(workers)
