"""Prefix-sharing plan from block tables: segments cover each query's KV exactly, in order."""
import random

from vineppo.engine.block_manager import BlockManager
from vineppo.engine.tree_plan import build_tree_segments


def slots(pages, length, ps):
    return [pages[i // ps] * ps + i % ps for i in range(length)]


def check_cover(segs, tables, lens, ps):
    for q, (table, n) in enumerate(zip(tables, lens)):
        got = []
        for s in segs.query_segments[q]:
            got += slots(segs.segment_pages[s], segs.segment_lens[s], ps)
        assert got == slots(table, n, ps)


def random_forest(rng, ps=4):
    bm = BlockManager(4096, ps)
    tables, lens = [], []
    for _ in range(rng.randint(1, 4)):           # roots
        root = []
        n = rng.randint(1, 60)
        bm.grow(root, n)
        tables.append(root)
        lens.append(n)
    for _ in range(rng.randint(0, 30)):          # forks of forks, then growth
        i = rng.randrange(len(tables))
        at = rng.randint(1, lens[i])
        f = bm.fork(tables[i], at)
        n = at + rng.randint(0, 20)
        bm.grow(f.block_table, max(n, 1))
        tables.append(f.block_table)
        lens.append(max(n, 1))
    return tables, lens


def test_random_forests_cover_exactly_and_share_only_identical_pages():
    rng = random.Random(7)
    ps = 4
    for _ in range(200):
        tables, lens = random_forest(rng, ps)
        for min_q, min_t in [(2, 1), (3, 8), (100, 1)]:
            segs = build_tree_segments(tables, lens, ps, min_queries=min_q, min_tokens=min_t)
            check_cover(segs, tables, lens, ps)
            users = [0] * len(segs.segment_lens)
            for qs in segs.query_segments:
                for s in qs:
                    users[s] += 1
            for s, u in enumerate(users):
                assert u >= 1
                if u > 1:
                    assert u >= min_q and segs.segment_lens[s] >= min_t
                    assert segs.segment_lens[s] % ps == 0
            assert segs.num_shared == sum(u > 1 for u in users)


def test_branches_of_one_prefix_share_one_segment():
    ps = 16
    bm = BlockManager(64, ps)
    parent = []
    bm.grow(parent, 100)                       # 6 full pages + 4 tokens
    kids = [bm.fork(parent, 99).block_table for _ in range(5)]
    for k in kids:
        bm.grow(k, 103)
    segs = build_tree_segments(kids, [103] * 5, ps, min_queries=4, min_tokens=64)
    assert segs.num_shared == 1
    shared = segs.query_segments[0][0]
    assert all(q[0] == shared for q in segs.query_segments)
    assert segs.segment_lens[shared] == 96 and segs.segment_pages[shared] == parent[:6]
    assert all(len(q) == 2 for q in segs.query_segments)
    assert segs.num_shared_tokens == 96 * 4
    # below the thresholds nothing is shared
    assert build_tree_segments(kids, [103] * 5, ps, min_queries=6).num_shared == 0
    assert build_tree_segments(kids, [103] * 5, ps, min_tokens=97).num_shared == 0
