"""Sessions: a conversation's KV kept on the worker between its turns.

When a request of a session finishes, its KV stays attached to the session instead of
only going to the prefix cache. Its full pages are inserted into the radix cache as
usual (shared with every other request, published as KV events) and the session holds a
reference on that path, so none of it is evicted while held; the last, partly filled
page, which the cache cannot take (it caches full pages only), is held by the session
alone. The next turn restores the hold directly, by comparing the hold's tokens with
the new prompt (a list comparison, no tree walk), and computes only the tokens after
their common prefix: the new message, and the previous reply's last token, whose KV no
step had computed yet.

Bounds (each release does what finishing without a session would have done: the full
pages stay cached, evictable now; the partial page is freed):
- at most `max_sessions` holds; one more releases the least recently used;
- a hold idle for `idle_timeout_s` is released (`expire`, called by the worker);
- `close` releases one at once;
- memory pressure: before a request would wait for pages or a running one would be
  preempted, the scheduler releases holds, least recently used first, after the cache
  has evicted what it can on its own (`Scheduler._reserve`). Held pages never starve a
  request; they only outlive unheld cache entries.

Ownership: the store owns each hold's node references and its tail page; `restore`
hands them to a request (its `prefix_nodes` and the page after them), `hold` takes them
from a finishing one. This module is torch-free: the router imports `check_session_id`.
"""
from __future__ import annotations

import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from engine.page_pool import PagePool
    from engine.radix_cache import RadixCache
    from engine.request import Request

SESSION_ID_MAX_LEN = 128
_SESSION_ID = re.compile(r"[A-Za-z0-9._:\-]+")


def check_session_id(value: object) -> str:
    """A session id as given, or InvalidRequestError saying what is wrong with it."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"session_id must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidRequestError("session_id must not be empty")
    if len(value) > SESSION_ID_MAX_LEN:
        raise InvalidRequestError(f"session_id has {len(value)} characters; at most {SESSION_ID_MAX_LEN} are allowed")
    if not _SESSION_ID.fullmatch(value):
        raise InvalidRequestError("session_id may hold only ASCII letters, digits and . _ : -")
    return value


@dataclass
class SessionHold:
    """One session's kept KV: tokens [0, len(token_ids)), as the prefix cache keys them."""

    session_id: str
    token_ids: list[int]
    nodes: list[Any]  # radix nodes of the full pages, in order, referenced by this hold
    tail_page: int | None  # tokens [len(nodes) * page_size, len(token_ids)), held alone
    last_use: float


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:  # the usual case (the new turn extends the held tokens): one C compare
        return n
    return next(i for i in range(n) if a[i] != b[i])


class SessionStore:
    def __init__(self, pool: PagePool, cache: RadixCache, max_sessions: int, idle_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.cache = cache
        self.page_size = cache.page_size
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._holds: OrderedDict[str, SessionHold] = OrderedDict()  # least recently used first
        self.restores_total = 0
        self.restored_tokens_total = 0  # prompt tokens restores served (counted as prefix hits too)
        self.releases: Counter[str] = Counter()  # by reason

    @property
    def open(self) -> int:
        return len(self._holds)

    @property
    def held_pages(self) -> int:
        """Pages only the holds own (their tail pages); the rest are cached nodes."""
        return sum(1 for h in self._holds.values() if h.tail_page is not None)

    def hold(self, request: Request) -> bool:
        """Keep a finished request's KV for its session (False: nothing to keep, the
        caller releases the request's pages as usual). Takes the request's pages."""
        computed = min(request.num_computed_tokens, request.num_tokens - 1)
        if self.max_sessions == 0 or computed < 1:
            return False
        full = computed // self.page_size
        keys, pages = request.cache_token_ids[:computed], request.pages
        duplicates, nodes = self.cache.insert_held(keys[:full * self.page_size], pages[:full],
                                                   request.params.priority)
        tail = pages[full] if computed % self.page_size else None
        self.pool.free(duplicates + pages[full + (tail is not None):])
        self.cache.unlock(request.prefix_nodes)
        request.pages, request.prefix_nodes, request.num_computed_tokens = [], [], 0
        old = self._holds.pop(request.session_id, None)
        if old is not None:  # two turns of one session ran at once: the later one wins
            self._release(old, "replaced")
        self._holds[request.session_id] = SessionHold(request.session_id, keys, nodes, tail, self.clock())
        while len(self._holds) > self.max_sessions:
            self._release(self._holds.popitem(last=False)[1], "evicted")
        return True

    def restored_tokens(self, session_id: str, keys: list[int]) -> int | None:
        """Tokens of a prompt (cache keys) that `restore` would serve; None when the
        session has no hold that covers its full pages (the tree decides then)."""
        hold = self._holds.get(session_id)
        if hold is None:
            return None
        count = common_prefix(hold.token_ids, keys, len(keys) - 1)
        return count if count > 0 and count >= len(hold.nodes) * self.page_size else None

    def restore(self, request: Request) -> bool:
        """Give a waiting request its session's KV: its pages cover the common prefix of
        the hold and the request's tokens. False (the hold released) when there is no
        hold or the prompt diverges from it inside its full pages: the cache still holds
        those, and the tree match that follows finds them up to the divergence."""
        hold = self._holds.pop(request.session_id, None)
        if hold is None:
            return False
        count = common_prefix(hold.token_ids, request.cache_token_ids, request.num_tokens - 1)
        full_tokens = len(hold.nodes) * self.page_size
        if count == 0 or count < full_tokens:
            self._release(hold, "diverged")
            return False
        pages = [n.page for n in hold.nodes]
        if hold.tail_page is not None:
            if count > full_tokens:
                pages.append(hold.tail_page)  # the request writes its new tokens after `count`
            else:
                self.pool.free([hold.tail_page])
        request.pages, request.prefix_nodes, request.num_computed_tokens = pages, hold.nodes, count
        self.cache.touch_pins(hold.nodes)
        self.restores_total += 1
        self.restored_tokens_total += min(count, request.num_prompt_tokens)
        return True

    def close(self, session_id: str) -> bool:
        hold = self._holds.pop(session_id, None)
        if hold is not None:
            self._release(hold, "closed")
        return hold is not None

    def expire(self) -> int:
        """Release holds idle for `idle_timeout_s`; returns how many."""
        deadline, count = self.clock() - self.idle_timeout_s, 0
        while self._holds:
            hold = next(iter(self._holds.values()))
            if hold.last_use > deadline:
                break
            del self._holds[hold.session_id]
            self._release(hold, "expired")
            count += 1
        return count

    def release_oldest(self) -> bool:
        """Memory pressure: release the least recently used hold; False if none."""
        if not self._holds:
            return False
        self._release(self._holds.popitem(last=False)[1], "pressure")
        return True

    def _release(self, hold: SessionHold, reason: str) -> None:
        self.cache.unlock(hold.nodes)
        if hold.tail_page is not None:
            self.pool.free([hold.tail_page])
        self.releases[reason] += 1
