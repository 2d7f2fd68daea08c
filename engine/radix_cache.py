"""Radix prefix cache over full KV pages.

Each node stands for one full page of tokens and owns that page id. A request that
matched a path holds a reference on every node of it; nodes with no references are
evictable. Eviction takes leaves in order of (priority of their last user, last use):
lower priority first, least recently used first among equals. Every node carries a
chained hash of its tokens (parent's hash + this page's tokens) so workers can publish
which prefixes they hold as KV events without sending tokens.

Pinned prefixes (a system prompt, tool definitions) are never evicted: a pin names the
chained hashes of a prefix's full pages, so pages that land later are pinned as they are
inserted. Pinned pages are capped (`max_pinned_pages`); a pin over the cap is refused,
and shrinking the cap unpins the least recently pinned-or-hit prefixes until it holds.
Invariant: a held node (referenced or pinned) has only held ancestors, because
references and pins both cover whole paths from the root.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

PageKey = tuple[int, ...]


def chain_hash(parent: int, tokens: PageKey) -> int:
    """blake2b-64 of the parent's hash (8 bytes) and the page's tokens (4 bytes each),
    little-endian."""
    digest = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    digest.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return int.from_bytes(digest.digest(), "little")


def page_hashes(tokens: list[int], page_size: int) -> list[int]:
    """Chained hashes of every full page of `tokens`, as the cache would name them."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) - page_size + 1, page_size):
        parent = chain_hash(parent, tuple(tokens[start:start + page_size]))
        hashes.append(parent)
    return hashes


@dataclass(eq=False)
class _Node:
    key: PageKey
    page: int
    parent: _Node | None
    hash: int
    children: dict[PageKey, _Node] = field(default_factory=dict)
    ref_count: int = 0
    last_access: int = 0
    priority: int = 0  # of the request that used it last: lower evicts first
    pinned: bool = False

    @property
    def held(self) -> bool:
        return self.ref_count > 0 or self.pinned

    def eviction_key(self) -> tuple[int, int]:
        return (self.priority, self.last_access)


class PinError(ValueError):
    """A pin the cache cannot take: over the cap (`over_cap`), or shorter than one page."""

    def __init__(self, message: str, over_cap: bool = False) -> None:
        super().__init__(message)
        self.over_cap = over_cap


@dataclass
class _Pin:
    hashes: tuple[int, ...]
    last_use: int


class PrefixMatch(NamedTuple):
    pages: list[int]
    nodes: list[_Node]  # held until released through `unlock`

    @property
    def num_pages(self) -> int:
        return len(self.pages)


class KVEvent(NamedTuple):
    kind: str  # "stored" or "removed"
    hashes: list[int]


class RadixCache:
    def __init__(self, page_size: int, max_pinned_pages: int = 0) -> None:
        self.page_size = page_size
        self.max_pinned_pages = max_pinned_pages
        self._root = _Node(key=(), page=-1, parent=None, hash=0)
        self._clock = itertools.count(1)
        self._num_nodes = 0
        self._num_held = 0
        self._events: list[KVEvent] = []
        self._pins: dict[tuple[int, ...], _Pin] = {}
        self._pinned_hashes: Counter[int] = Counter()  # hash -> pins naming it
        self._nodes_by_hash: dict[int, _Node] = {}
        # Eviction candidates, kept as nodes change instead of walking the tree on every
        # eviction: (eviction key, push order, node), pushed whenever a node may have become
        # an unheld leaf or changed its key while one. Entries go stale (the node got a
        # child, was held, re-keyed or evicted); `evict` skips those, and the heap is
        # rebuilt from the tree once stale entries outnumber the nodes.
        self._leaf_heap: list[tuple[tuple[int, int], int, _Node]] = []
        self._pushes = itertools.count()

    @property
    def cached_pages(self) -> int:
        return self._num_nodes

    @property
    def evictable_pages(self) -> int:
        # An unheld node has no held descendants (the invariant above), so every unheld
        # node is eventually evictable.
        return self._num_nodes - self._num_held

    @property
    def pinned_pages(self) -> int:
        """Pages pinned prefixes name (also those not cached yet)."""
        return len(self._pinned_hashes)

    @property
    def resident_pinned_pages(self) -> int:
        return sum(1 for h in self._pinned_hashes if h in self._nodes_by_hash)

    def pin_tails(self) -> list[int]:
        """The last page hash of each pinned prefix (names the pins, for status)."""
        return [pin.hashes[-1] for pin in self._pins.values()]

    def match(self, tokens: list[int], priority: int | None = None) -> PrefixMatch:
        """Longest cached prefix of `tokens` in full pages, with a reference on each node.
        `priority`: the user's (None, e.g. a peek, leaves each node's as it is)."""
        node, nodes = self._root, []
        now = next(self._clock)
        for key in self._page_keys(tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            if priority is not None:
                child.priority = priority
            nodes.append(child)
            node = child
        for n in nodes:
            self._ref(n)
        if nodes and self._pins:
            self._touch_pins(nodes, now)
        return PrefixMatch([n.page for n in nodes], nodes)

    def unlock(self, nodes: list[_Node]) -> None:
        for n in nodes:
            n.ref_count -= 1
            if n.ref_count == 0 and not n.pinned:
                self._num_held -= 1
                self._candidate(n)

    def insert(self, tokens: list[int], pages: list[int], priority: int = 0) -> list[int]:
        """Cache the full pages of `tokens` held in `pages`; return the pages the caller
        must free because the cache already held the same tokens in another page."""
        return self._insert(tokens, pages, priority)[0]

    def insert_held(self, tokens: list[int], pages: list[int], priority: int = 0) -> tuple[list[int], list[_Node]]:
        """`insert`, then a reference on every node of the path (a session keeps them):
        (pages the caller must free, the nodes now held, to release through `unlock`)."""
        duplicates, path = self._insert(tokens, pages, priority)
        for n in path:
            self._ref(n)
        return duplicates, path

    def touch_pins(self, nodes: list[_Node]) -> None:
        """Count a use of `nodes` (taken without `match`, e.g. a session's restore) for
        the pins they cover."""
        if nodes and self._pins:
            self._touch_pins(nodes, next(self._clock))

    def _insert(self, tokens: list[int], pages: list[int], priority: int) -> tuple[list[int], list[_Node]]:
        node, duplicates, stored, path = self._root, [], [], []
        now = next(self._clock)
        for key, page in zip(self._page_keys(tokens), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(key=key, page=page, parent=node, hash=chain_hash(node.hash, key))
                node.children[key] = child
                self._num_nodes += 1
                self._nodes_by_hash[child.hash] = child
                stored.append(child.hash)
                if child.hash in self._pinned_hashes:
                    self._set_pinned(child, True)
            elif child.page != page:
                duplicates.append(page)
            child.last_access, child.priority = now, priority
            path.append(child)
            node = child
        if path:  # the only node of the path that can be a leaf
            self._candidate(path[-1])
        if stored:
            self._events.append(KVEvent("stored", stored))
        return duplicates, path

    def evict(self, count: int) -> list[int]:
        """Free up to `count` unheld pages: leaves by (priority, last use), lowest first;
        a parent becomes a candidate once its last child is gone."""
        freed: list[int] = []
        removed: list[int] = []
        if len(self._leaf_heap) > 2 * self._num_nodes + 64:
            self._rebuild_leaf_heap()
        heap = self._leaf_heap
        while heap and len(freed) < count:
            key, _, leaf = heapq.heappop(heap)
            if not self._evictable_leaf(leaf) or key != leaf.eviction_key():
                continue  # stale: a newer entry names it if it is a candidate now
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key]
            del self._nodes_by_hash[leaf.hash]
            self._num_nodes -= 1
            freed.append(leaf.page)
            removed.append(leaf.hash)
            if parent is not self._root:
                self._candidate(parent)
        if removed:
            self._events.append(KVEvent("removed", removed))
        return freed

    # -- pins --------------------------------------------------------------------------

    def pin(self, tokens: list[int]) -> int:
        """Pin the full pages of `tokens` (cached now or when they land); returns the pages
        the pin adds to the pinned count. Raises PinError over the cap."""
        hashes = tuple(page_hashes(tokens, self.page_size))
        if not hashes:
            raise PinError(f"a pinned prefix needs at least one full page ({self.page_size} tokens)")
        added = [h for h in hashes if h not in self._pinned_hashes]
        if hashes in self._pins:
            self._pins[hashes].last_use = next(self._clock)
            return 0
        if self.pinned_pages + len(added) > self.max_pinned_pages:
            raise PinError(f"pinning {len(added)} more page(s) would exceed the cap of "
                           f"{self.max_pinned_pages} pinned pages ({self.pinned_pages} pinned)", over_cap=True)
        self._pins[hashes] = _Pin(hashes, next(self._clock))
        for h in hashes:
            self._pinned_hashes[h] += 1
            node = self._nodes_by_hash.get(h)
            if node is not None:
                self._set_pinned(node, True)
        return len(added)

    def unpin(self, tokens: list[int]) -> bool:
        """Drop the pin of exactly this prefix; False if there was none."""
        pin = self._pins.pop(tuple(page_hashes(tokens, self.page_size)), None)
        if pin is None:
            return False
        self._release_pin(pin)
        return True

    def set_pin_cap(self, max_pinned_pages: int) -> list[tuple[int, ...]]:
        """Change the cap; unpins least recently used prefixes until the pinned pages fit.
        Returns the hash chains of the prefixes unpinned."""
        self.max_pinned_pages = max_pinned_pages
        dropped = []
        for pin in sorted(self._pins.values(), key=lambda p: p.last_use):
            if self.pinned_pages <= max_pinned_pages:
                break
            del self._pins[pin.hashes]
            self._release_pin(pin)
            dropped.append(pin.hashes)
        return dropped

    def _release_pin(self, pin: _Pin) -> None:
        for h in pin.hashes:
            self._pinned_hashes[h] -= 1
            if self._pinned_hashes[h] == 0:
                del self._pinned_hashes[h]
                node = self._nodes_by_hash.get(h)
                if node is not None:
                    self._set_pinned(node, False)

    def _set_pinned(self, node: _Node, pinned: bool) -> None:
        was_held = node.held
        node.pinned = pinned
        self._num_held += int(node.held) - int(was_held)
        self._candidate(node)

    def _touch_pins(self, nodes: list[_Node], now: int) -> None:
        """A match that covers a pin's prefix, or ends inside it, counts as a use."""
        matched, last = {n.hash for n in nodes}, nodes[-1].hash
        for pin in self._pins.values():
            if pin.hashes[-1] in matched or last in pin.hashes:
                pin.last_use = now

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def all_hashes(self) -> list[int]:
        out, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            out.append(node.hash)
            stack.extend(node.children.values())
        return out

    def _ref(self, node: _Node) -> None:
        if not node.held:
            self._num_held += 1
        node.ref_count += 1

    def _page_keys(self, tokens: list[int]) -> list[PageKey]:
        size = self.page_size
        return [tuple(tokens[i:i + size]) for i in range(0, len(tokens) - size + 1, size)]

    def _evictable_leaf(self, node: _Node) -> bool:
        """In the tree (not evicted), no children, neither referenced nor pinned."""
        return not node.children and not node.held and self._nodes_by_hash.get(node.hash) is node

    def _candidate(self, node: _Node) -> None:
        if self._evictable_leaf(node):
            heapq.heappush(self._leaf_heap, (node.eviction_key(), next(self._pushes), node))

    def _rebuild_leaf_heap(self) -> None:
        heap, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif not node.held:
                heap.append((node.eviction_key(), next(self._pushes), node))
        heapq.heapify(heap)
        self._leaf_heap = heap
