"""Page pool of the paged KV cache: allocation, per-page refcounts and forking.

A sequence's KV lives in a list of page ids (its block table). Pages are shared between sequences
by id: forking a sequence at a token offset shares every *full* page before the offset and gives
the child a private copy of the partial tail page, so a page that is shared is always full and is
never written again (copy-on-write happens eagerly, at fork time). A page returns to the free list
when its last owner releases it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than an allocation needs."""


@dataclass
class ForkResult:
    """The child's block table and the page copies that must run before the child writes."""

    block_table: list[int]
    copy_src: list[int] = field(default_factory=list)
    copy_dst: list[int] = field(default_factory=list)


class BlockManager:
    """Fixed pool of `num_pages` KV pages of `page_size` tokens each, with refcounts."""

    def __init__(self, num_pages: int, page_size: int = 16):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcounts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Number of pages that hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """Take `num_pages` free pages (refcount 1 each); raises OutOfPages when too few are free."""
        if num_pages > len(self._free):
            raise OutOfPages(f"need {num_pages} pages, {len(self._free)} free")
        pages = [self._free.popleft() for _ in range(num_pages)]
        for p in pages:
            self.refcounts[p] = 1
        return pages

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Append pages to `block_table` (in place) until it holds `num_tokens` tokens."""
        missing = self.pages_for(num_tokens) - len(block_table)
        if missing > 0:
            block_table.extend(self.allocate(missing))

    def release(self, block_table: list[int]) -> None:
        """Drop one reference to each page; pages whose refcount reaches 0 become free."""
        for p in block_table:
            rc = self.refcounts[p]
            if rc <= 0:
                raise RuntimeError(f"page {p} released more often than it was referenced")
            self.refcounts[p] = rc - 1
            if rc == 1:
                self._free.append(p)
        block_table.clear()

    def fork_cost(self, num_tokens: int) -> int:
        """Free pages a fork at `num_tokens` needs (the copy of the partial tail page, if any)."""
        return 1 if num_tokens % self.page_size else 0

    def fork(self, block_table: list[int], num_tokens: int) -> ForkResult:
        """Share the first `num_tokens` tokens of `block_table` with a new sequence.

        Full pages are shared (refcount + 1); the partial tail page, if any, is copied into a fresh
        page because both sequences will write after the fork point. The caller runs the returned
        copies (copy_pages) before the child's next forward.
        """
        if num_tokens < 0 or self.pages_for(num_tokens) > len(block_table):
            raise ValueError(
                f"cannot fork {num_tokens} tokens from a block table of {len(block_table)} pages"
            )
        num_full = num_tokens // self.page_size
        shared = block_table[:num_full]
        result = ForkResult(block_table=list(shared))
        if num_tokens % self.page_size:
            (tail,) = self.allocate(1)
            result.copy_src.append(block_table[num_full])
            result.copy_dst.append(tail)
            result.block_table.append(tail)
        for p in shared:
            self.refcounts[p] += 1
        return result

    def check_consistency(self, block_tables: list[list[int]]) -> None:
        """Raise if the refcounts do not equal the references held by `block_tables`."""
        expected = [0] * self.num_pages
        for table in block_tables:
            for p in table:
                expected[p] += 1
        if expected != self.refcounts:
            bad = [p for p in range(self.num_pages) if expected[p] != self.refcounts[p]][:8]
            raise RuntimeError(f"refcount mismatch on pages {bad}")
        free = set(self._free)
        if len(free) != len(self._free) or free != {p for p in range(self.num_pages) if expected[p] == 0}:
            raise RuntimeError("free list does not match the pages with refcount 0")
