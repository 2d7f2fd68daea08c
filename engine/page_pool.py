"""Free-list of KV pages. Owns only the set of free page ids; callers own what they hold."""
from __future__ import annotations


class OutOfPagesError(RuntimeError):
    """More pages were asked for than are free."""


class PagePool:
    def __init__(self, num_pages: int) -> None:
        self.total_pages = num_pages
        # Popped from the end: fresh pools hand out 0, 1, 2, ... so early runs coalesce.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._is_free = [True] * num_pages

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfPagesError(f"asked for {count} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(count)]
        for page in pages:
            self._is_free[page] = False
        return pages

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if self._is_free[page]:
                raise RuntimeError(f"page {page} freed twice")
            self._is_free[page] = True
        # Keep low page ids at the end so they are reused first.
        self._free.extend(sorted(pages, reverse=True))

    def is_free(self, page: int) -> bool:
        return self._is_free[page]
