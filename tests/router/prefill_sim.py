"""A simulated prefill pool for policy tests: workers with an LRU page cache of limited
capacity that process routed prompts in FIFO order at a fixed token rate, publishing
KV events the way real workers do (chained page hashes, polled like Status)."""
from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from engine.radix_cache import page_hashes
from router.policies import RouteRequest, RoutingPolicy
from router.worker_state import Lease, PrefixIndex, WorkerLoad, WorkerState


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimStatus:
    event_seq: int
    events_reset: bool
    stored: list[int]
    removed: list[int]


@dataclass
class Job:
    tokens: list[int]
    lease: Lease
    remaining: int | None = None  # set when the worker starts it


@dataclass
class SimWorker:
    state: WorkerState
    capacity_pages: int
    page_size: int
    rate: int  # tokens computed per tick
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    queue: deque[Job] = field(default_factory=deque)
    hit_tokens: int = 0
    requests: int = 0
    event_seq: int = 0
    _stored: set[int] = field(default_factory=set)
    _removed: set[int] = field(default_factory=set)

    def _start(self, job: Job) -> None:
        hashes = page_hashes(job.tokens, self.page_size)
        matched = 0
        for h in hashes:
            if h not in self.cache:
                break
            matched += 1
        self.hit_tokens += matched * self.page_size
        job.remaining = len(job.tokens) - matched * self.page_size
        for h in reversed(hashes):  # root most recent: evict leaves first, like the radix cache
            self._insert(h)

    def _insert(self, h: int) -> None:
        if h in self.cache:
            self.cache.move_to_end(h)
            return
        self.cache[h] = None
        self._note(h, stored=True)
        while len(self.cache) > self.capacity_pages:
            old, _ = self.cache.popitem(last=False)
            self._note(old, stored=False)

    def _note(self, h: int, stored: bool) -> None:
        self.event_seq += 1
        (self._removed if stored else self._stored).discard(h)
        (self._stored if stored else self._removed).add(h)

    def tick(self) -> None:
        budget = self.rate
        while budget > 0 and self.queue:
            job = self.queue[0]
            if job.remaining is None:
                self._start(job)
            used = min(budget, job.remaining)
            job.remaining -= used
            budget -= used
            if job.remaining == 0:
                self.queue.popleft()
                job.lease.close()

    def poll(self) -> None:
        """What a Status poll delivers to the router."""
        queued = sum(len(j.tokens) if j.remaining is None else j.remaining for j in self.queue)
        self.state.load = WorkerLoad(kv_pages_total=self.capacity_pages, page_size=self.page_size,
                                     kv_pages_free=self.capacity_pages - len(self.cache),
                                     queued_prefill_tokens=queued)
        self.state.prefix.apply(SimStatus(self.event_seq, False, list(self._stored), list(self._removed)))
        self._stored, self._removed = set(), set()


@dataclass
class SimResult:
    hit_tokens: int
    requests_per_worker: list[int]


def group_workload(groups: int = 8, per_group: int = 25, prefix_pages: int = 32, page_size: int = 16,
                   seed: int = 0) -> list[list[int]]:
    """`groups` long shared prefixes, `per_group` prompts each with a short unique tail,
    in random order."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(500) for _ in range(prefix_pages * page_size)] for _ in range(groups)]
    prompts = [p + [rng.randrange(500) for _ in range(rng.randrange(8, 40))]
               for p in prefixes for _ in range(per_group)]
    rng.shuffle(prompts)
    return prompts


def simulate(policy: RoutingPolicy, prompts: list[list[int]], workers: int = 4, capacity_pages: int = 80,
             page_size: int = 16, rate: int = 400, arrivals_per_tick: int = 2) -> SimResult:
    clock = SimClock()  # one tick is one second; Status is polled every tick
    sims = [SimWorker(WorkerState("prefill", f"p{i}", f"sim:{i}", healthy=True,
                                  prefix=PrefixIndex(grace=1.0, clock=clock)),
                      capacity_pages, page_size, rate)
            for i in range(workers)]
    by_state = {id(s.state): s for s in sims}
    pending = deque(prompts)
    for sim in sims:
        sim.poll()
    while pending or any(s.queue for s in sims):
        for _ in range(min(arrivals_per_tick, len(pending))):
            request = RouteRequest(pending.popleft())
            chosen = policy.rank_prefill(request, [s.state for s in sims])[0]
            lease = chosen.lease(request.uncached_tokens(chosen), request.page_hashes(page_size))
            sim = by_state[id(chosen)]
            sim.requests += 1
            sim.queue.append(Job(request.prompt_token_ids, lease))
        for sim in sims:
            sim.tick()
            sim.poll()
        clock.now += 1.0
    return SimResult(sum(s.hit_tokens for s in sims), [s.requests for s in sims])
