"""Prefix-sharing plan of one decode step, found from the sequences' block tables.

Forked sequences share their common prefix by page id (a fork shares full pages and copies only
the partial tail page), so a trie over block-table page ids finds every shared prefix: a node is
a page, its count the number of decode queries whose table passes through it. Along a query's
path the count never grows; a maximal run of equal count is one segment, read once for all of its
queries by `tree_decode_attention`. Sharing has a fixed cost (one more partial result to merge per
query), so a run becomes a shared segment only when it has at least `min_queries` queries and
`min_tokens` tokens; everything else of a query (short or private runs and its partial tail page)
is folded into one-query segments.

Consecutive decode steps of the same sequences usually add one token to each sequence's own last
page and change nothing else: `vinekernels.grow_tree_plan` then derives the next step's plan from
the last one (and reuses its reference layout) instead of planning afresh.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TreeSegments:
    """Arguments of `plan_tree_decode`, plus how many segments are shared."""

    segment_pages: list[list[int]]
    segment_lens: list[int]
    query_segments: list[list[int]]
    num_shared: int

    @property
    def num_shared_tokens(self) -> int:
        """KV tokens each step no longer reads once per query."""
        return sum(
            self.segment_lens[s] * (n - 1)
            for s, n in enumerate(self._segment_query_counts()) if n > 1
        )

    def _segment_query_counts(self) -> list[int]:
        counts = [0] * len(self.segment_lens)
        for segs in self.query_segments:
            for s in segs:
                counts[s] += 1
        return counts


def build_tree_segments(block_tables: list[list[int]], seq_lens: list[int], page_size: int,
                        min_queries: int = 2, min_tokens: int = 1) -> TreeSegments:
    """Split each query's KV (`seq_lens[i]` tokens of `block_tables[i]`) into shared and private
    segments. Only full pages can be shared."""
    if len(block_tables) != len(seq_lens):
        raise ValueError("block_tables and seq_lens must have the same length")
    children: dict[tuple[int, int], int] = {}
    counts: list[int] = []
    paths: list[list[int]] = []
    for table, seq_len in zip(block_tables, seq_lens):
        if seq_len < 1 or -(-seq_len // page_size) > len(table):
            raise ValueError(f"block table of {len(table)} pages cannot hold {seq_len} tokens")
        node = -1
        path = []
        for page in table[: seq_len // page_size]:
            key = (node, page)
            node = children.get(key, -1)
            if node < 0:
                node = children[key] = len(counts)
                counts.append(0)
            counts[node] += 1
            path.append(node)
        paths.append(path)

    segment_pages: list[list[int]] = []
    segment_lens: list[int] = []
    query_segments: list[list[int]] = []
    shared_of_node: dict[int, int] = {}
    for table, seq_len, path in zip(block_tables, seq_lens, paths):
        segs: list[int] = []
        private_start = 0  # first token not yet in a segment of this query
        d = 0
        while d < len(path):
            c = counts[path[d]]
            end = d + 1
            while end < len(path) and counts[path[end]] == c:
                end += 1
            if c >= max(min_queries, 2) and (end - d) * page_size >= min_tokens:
                if d * page_size > private_start:
                    segs.append(_add(segment_pages, segment_lens, table, private_start,
                                     d * page_size, page_size))
                first = path[d]
                if first not in shared_of_node:
                    shared_of_node[first] = _add(segment_pages, segment_lens, table,
                                                 d * page_size, end * page_size, page_size)
                segs.append(shared_of_node[first])
                private_start = end * page_size
            d = end
        if seq_len > private_start:
            segs.append(_add(segment_pages, segment_lens, table, private_start, seq_len, page_size))
        query_segments.append(segs)
    return TreeSegments(segment_pages, segment_lens, query_segments, len(shared_of_node))


def _add(segment_pages, segment_lens, table, start: int, end: int, page_size: int) -> int:
    """New segment holding tokens [start, end) of `table` (start is page aligned)."""
    segment_pages.append(table[start // page_size: -(-end // page_size)])
    segment_lens.append(end - start)
    return len(segment_lens) - 1
