"""Continuous batching with token-budget chunked prefill, prefix caching and
preemption by recompute.

Each step first gives every running request the tokens it still needs (one for a
decoding request, a chunk for one still in prefill), then admits waiting requests while
the token budget, `max_num_seqs` and free pages allow. When pages run out for a running
request, the most recently admitted request is preempted: its computed full pages go
to the prefix cache (so the recompute is mostly cache hits) and it waits again.

A request of a session (`Request.session_id`) leaves its KV attached to the session when
it finishes, and the session's next turn starts from it (engine/sessions.py); holds are
released before any request waits for pages or is preempted.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

from engine.batch import Batch, ScheduledRequest
from engine.config import EngineConfig
from engine.page_pool import PagePool
from engine.radix_cache import RadixCache
from engine.request import Request, RequestStatus
from engine.sessions import SessionStore

# A session keeps the KV of a turn that ended normally; an aborted or failed one gives
# its pages back as usual.
_HOLD_REASONS = ("stop", "length")


class PageAccounting(NamedTuple):
    total: int
    free: int
    cached: int  # held by the radix cache (some may also be in use by requests)
    evictable: int  # cached and unreferenced
    held_by_requests: int  # in requests' page tables and not in the cache
    held_by_sessions: int = 0  # sessions' partial last pages (their full pages are cached)


class _RunningScheduled(NamedTuple):
    preempted: bool  # a running request lost its pages this step
    budget_left: int  # tokens the step can still give to waiting requests


class Scheduler:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.page_size = config.page_size
        self.pool = PagePool(config.num_pages)
        self.cache: RadixCache | None = None
        self.sessions: SessionStore | None = None  # needs the cache: holds are paths of it
        if config.enable_prefix_cache:
            self.cache = RadixCache(config.page_size, int(config.max_pinned_fraction * config.num_pages))
            self.sessions = SessionStore(self.pool, self.cache, config.max_sessions, config.session_idle_timeout_s)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Out of the batch but holding pages: KV arriving from a remote prefill, or a
        # finished prefill whose KV is still being shipped.
        self.parked: dict[str, Request] = {}
        self.num_preemptions = 0
        self.prefix_hit_tokens_total = 0  # prompt tokens first admissions took from the cache

    @property
    def available_pages(self) -> int:
        """Pages a new request could get: free plus evictable cache pages."""
        return self.pool.free_pages + (self.cache.evictable_pages if self.cache else 0)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted, budget = self._schedule_running(scheduled, budget)
        if not preempted:
            self._schedule_waiting(scheduled, budget)
        return Batch(scheduled)

    def finish(self, request: Request) -> None:
        """Release a request's pages (cached where possible), wherever it is; a session's
        request that ended normally leaves them to its session instead."""
        self._detach(request)
        held = (request.session_id and self.sessions is not None and request.finish_reason in _HOLD_REASONS
                and self.sessions.hold(request))
        if not held:
            self._release(request)
        request.status = RequestStatus.FINISHED

    def park(self, request: Request) -> None:
        """Take a request out of the batch while it keeps its pages."""
        self._detach(request)
        self.parked[request.request_id] = request

    def reserve_prompt(self, request: Request) -> bool:
        """Match the prefix cache and allocate pages for the whole prompt, for KV that
        another worker computes; the request is parked. False: not enough pages now."""
        self._match_prefix(request)
        remaining = request.num_tokens - request.num_computed_tokens
        if not self._reserve(self._pages_needed(request, remaining)):
            self._release(request)
            return False
        self._grow(request, remaining)
        self.prefix_hit_tokens_total += request.num_cached_tokens
        self.parked[request.request_id] = request
        return True

    def resume(self, request: Request) -> None:
        """A parked request whose prompt KV has landed joins the running batch."""
        del self.parked[request.request_id]
        self.running.append(request)
        request.status = RequestStatus.RUNNING

    def queued_prefill_tokens(self) -> int:
        return sum(max(0, r.num_prompt_tokens - r.num_computed_tokens)
                   for r in [*self.waiting, *self.running])

    def _detach(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.parked.pop(request.request_id, None)

    def free_cache(self) -> int:
        """Evict every unreferenced cached page; returns how many were freed."""
        if self.cache is None:
            return 0
        freed = self.cache.evict(self.cache.evictable_pages)
        self.pool.free(freed)
        return len(freed)

    def accounting(self) -> PageAccounting:
        cached = self.cache.cached_pages if self.cache else 0
        evictable = self.cache.evictable_pages if self.cache else 0
        holders = [*self.running, *self.parked.values()]
        held = sum(len(r.pages) - len(r.prefix_nodes) for r in holders)
        sessions = self.sessions.held_pages if self.sessions else 0
        return PageAccounting(self.pool.total_pages, self.pool.free_pages, cached, evictable, held, sessions)

    # -- internals ---------------------------------------------------------------------

    def _schedule_running(self, scheduled: list[ScheduledRequest], budget: int) -> _RunningScheduled:
        """Decode first: requests that need one token go before those still in prefill, so
        a long prompt's chunk never takes the budget that running decodes need (a request
        resumed after a remote prefill joins `running` behind prompts being chunked here).
        The hot loop of a decode step: pages are asked for only when a request crosses
        into a new page (`_reserve(0)` and `_grow` by 0 pages change nothing)."""
        preempted, index, page_size = False, 0, self.page_size
        pending = self._decode_first()
        while index < len(pending) and budget > 0:
            request = pending[index]
            computed = request.num_computed_tokens
            remaining = request.num_tokens - computed
            count = remaining if remaining <= budget else budget
            drafts = request.draft_token_ids
            if drafts:  # only a decoding request (remaining 1) has drafts: verify them too
                if len(drafts) >= budget:
                    del drafts[budget - 1:]
                count += len(drafts)
            needed = -(-(computed + count) // page_size) - len(request.pages)  # as _pages_needed
            if needed > 0:
                if not self._reserve(needed):
                    # The victim is the last request not scheduled yet: this step never
                    # holds a request whose pages were just released.
                    preempted = True
                    victim = pending.pop()
                    self._preempt(victim)
                    if victim is request:
                        break
                    continue
                request.pages.extend(self.pool.allocate(needed))
            scheduled.append(ScheduledRequest(request, count, count >= remaining, len(drafts)))
            budget -= count
            index += 1
        return _RunningScheduled(preempted, budget)

    def _decode_first(self) -> list[Request]:
        """`running` with requests still in prefill moved behind the decoding ones (each
        group keeps its order); the list itself when nothing is in prefill."""
        running = self.running
        prefilling = [r for r in running if r.num_tokens - r.num_computed_tokens > 1]
        if not prefilling:
            return list(running)
        return [r for r in running if r.num_tokens - r.num_computed_tokens <= 1] + prefilling

    def _schedule_waiting(self, scheduled: list[ScheduledRequest], budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            self._match_prefix(request)
            count = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._reserve(self._pages_needed(request, count)):
                self._release(request)
                return
            self._grow(request, count)
            if request.num_preemptions == 0:
                self.prefix_hit_tokens_total += request.num_cached_tokens
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            scheduled.append(ScheduledRequest.of(request, count))
            budget -= count

    def _match_prefix(self, request: Request) -> None:
        if self.cache is None or request.pages:
            return
        restored = bool(request.session_id) and self.sessions is not None and self.sessions.restore(request)
        if not restored:
            # At least the last token is recomputed: its logits produce the next token.
            match = self.cache.match(request.cache_token_ids[: request.num_tokens - 1], request.params.priority)
            request.pages, request.prefix_nodes = list(match.pages), match.nodes
            request.num_computed_tokens = match.num_pages * self.page_size
        if request.num_preemptions == 0 and len(request.output_token_ids) == request.num_resumed_tokens:
            # First admission (a resumed request's too): the prompt tokens the cache served.
            request.num_cached_tokens = min(request.num_computed_tokens, request.num_prompt_tokens)

    def _pages_needed(self, request: Request, count: int) -> int:
        tokens = request.num_computed_tokens + count
        return max(0, -(-tokens // self.page_size) - len(request.pages))

    def _reserve(self, count: int) -> bool:
        shortfall = count - self.pool.free_pages
        if shortfall > 0 and self.cache is not None:
            self.pool.free(self.cache.evict(shortfall))
            # Still short: session holds go (least recently used first) before the
            # caller makes a request wait or preempts one.
            while self.pool.free_pages < count and self.sessions is not None and self.sessions.release_oldest():
                self.pool.free(self.cache.evict(count - self.pool.free_pages))
        return self.pool.free_pages >= count

    def _grow(self, request: Request, count: int) -> None:
        request.pages.extend(self.pool.allocate(self._pages_needed(request, count)))

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.draft_token_ids = []
        self._release(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _release(self, request: Request) -> None:
        """Give back a request's pages: computed full pages to the cache, the rest free."""
        pages = request.pages
        if self.cache is not None:
            full = request.num_computed_tokens // self.page_size
            tokens = request.cache_token_ids[: full * self.page_size]
            duplicates = self.cache.insert(tokens, pages[:full], request.params.priority)
            self.pool.free(duplicates + pages[full:])
            self.cache.unlock(request.prefix_nodes)
        else:
            self.pool.free(pages)
        request.pages, request.prefix_nodes = [], []
        request.num_computed_tokens = 0
