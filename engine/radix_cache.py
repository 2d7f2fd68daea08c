"""Radix prefix cache over full KV pages.

Each node stands for one full page of tokens and owns that page id. A request that
matched a path holds a reference on every node of it; nodes with no references are
evictable, least recently used leaves first. Every node carries a chained hash of its
tokens (parent's hash + this page's tokens) so workers can publish which prefixes they
hold as KV events without sending tokens.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

PageKey = tuple[int, ...]


def chain_hash(parent: int, tokens: PageKey) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(parent.to_bytes(8, "little"))
    digest.update(b"".join(t.to_bytes(4, "little") for t in tokens))
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
    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._root = _Node(key=(), page=-1, parent=None, hash=0)
        self._clock = itertools.count(1)
        self._num_nodes = 0
        self._num_referenced = 0
        self._events: list[KVEvent] = []

    @property
    def cached_pages(self) -> int:
        return self._num_nodes

    @property
    def evictable_pages(self) -> int:
        # A node with no references has no referenced descendants (references cover whole
        # paths from the root), so every unreferenced node is eventually evictable.
        return self._num_nodes - self._num_referenced

    def match(self, tokens: list[int]) -> PrefixMatch:
        """Longest cached prefix of `tokens` in full pages, with a reference on each node."""
        node, nodes = self._root, []
        now = next(self._clock)
        for key in self._page_keys(tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            nodes.append(child)
            node = child
        for n in nodes:
            self._ref(n)
        return PrefixMatch([n.page for n in nodes], nodes)

    def unlock(self, nodes: list[_Node]) -> None:
        for n in nodes:
            n.ref_count -= 1
            if n.ref_count == 0:
                self._num_referenced -= 1

    def insert(self, tokens: list[int], pages: list[int]) -> list[int]:
        """Cache the full pages of `tokens` held in `pages`; return the pages the caller
        must free because the cache already held the same tokens in another page."""
        node, duplicates, stored = self._root, [], []
        now = next(self._clock)
        for key, page in zip(self._page_keys(tokens), pages):
            child = node.children.get(key)
            if child is None:
                child = _Node(key=key, page=page, parent=node, hash=chain_hash(node.hash, key))
                node.children[key] = child
                self._num_nodes += 1
                stored.append(child.hash)
            elif child.page != page:
                duplicates.append(page)
            child.last_access = now
            node = child
        if stored:
            self._events.append(KVEvent("stored", stored))
        return duplicates

    def evict(self, count: int) -> list[int]:
        """Free up to `count` unreferenced pages, least recently used leaves first."""
        freed: list[int] = []
        leaves = sorted(self._evictable_leaves(), key=lambda n: n.last_access)
        removed: list[int] = []
        while leaves and len(freed) < count:
            leaf = leaves.pop(0)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key]
            self._num_nodes -= 1
            freed.append(leaf.page)
            removed.append(leaf.hash)
            if parent is not self._root and not parent.children and parent.ref_count == 0:
                leaves.append(parent)
                leaves.sort(key=lambda n: n.last_access)
        if removed:
            self._events.append(KVEvent("removed", removed))
        return freed

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
        if node.ref_count == 0:
            self._num_referenced += 1
        node.ref_count += 1

    def _page_keys(self, tokens: list[int]) -> list[PageKey]:
        size = self.page_size
        return [tuple(tokens[i:i + size]) for i in range(0, len(tokens) - size + 1, size)]

    def _evictable_leaves(self) -> list[_Node]:
        out, stack = [], list(self._root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.ref_count == 0:
                out.append(node)
        return out
