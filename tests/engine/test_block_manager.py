"""Page pool: allocation, refcounts, fork with copy of the partial tail page, release."""
import random

import pytest

from vineppo.engine.block_manager import BlockManager, OutOfPages


def test_allocate_release_roundtrip():
    bm = BlockManager(8, page_size=4)
    table = []
    bm.grow(table, 9)                     # 9 tokens -> 3 pages
    assert len(table) == 3 and bm.num_free_pages == 5
    assert all(bm.refcounts[p] == 1 for p in table)
    bm.grow(table, 12)                    # still 3 pages
    assert len(table) == 3
    bm.release(table)
    assert table == [] and bm.num_free_pages == 8 and sum(bm.refcounts) == 0


def test_out_of_pages():
    bm = BlockManager(2, page_size=4)
    with pytest.raises(OutOfPages):
        bm.allocate(3)
    assert bm.num_free_pages == 2          # a failed allocation takes nothing


@pytest.mark.parametrize("num_tokens,shared,copied", [(8, 2, 0), (10, 2, 1), (3, 0, 1), (0, 0, 0)])
def test_fork_shares_full_pages_and_copies_partial_tail(num_tokens, shared, copied):
    bm = BlockManager(16, page_size=4)
    parent = []
    bm.grow(parent, 14)                   # 4 pages, last one partial
    fork = bm.fork(parent, num_tokens)
    assert fork.block_table[:shared] == parent[:shared]
    assert len(fork.block_table) == shared + copied
    assert fork.copy_src == parent[shared:shared + copied]
    assert len(fork.copy_dst) == copied and fork.copy_dst == fork.block_table[shared:]
    for p in parent[:shared]:
        assert bm.refcounts[p] == 2
    for p in parent[shared:]:
        assert bm.refcounts[p] == 1
    for p in fork.copy_dst:
        assert p not in parent and bm.refcounts[p] == 1
    bm.check_consistency([parent, fork.block_table])
    bm.release(parent)
    # the child's shared pages survive the parent's release
    for p in fork.block_table:
        assert bm.refcounts[p] == 1
    bm.release(fork.block_table)
    assert bm.num_free_pages == 16


def test_fork_past_table_is_an_error():
    bm = BlockManager(8, page_size=4)
    parent = []
    bm.grow(parent, 4)
    with pytest.raises(ValueError):
        bm.fork(parent, 5)


def test_release_twice_is_detected():
    bm = BlockManager(4, page_size=4)
    table = bm.allocate(1)
    alias = list(table)
    bm.release(table)
    with pytest.raises(RuntimeError):
        bm.release(alias)


def test_random_fork_release_keeps_refcounts_exact():
    rng = random.Random(1234)
    bm = BlockManager(64, page_size=4)
    tables: list[list[int]] = []
    lens: list[int] = []
    for _ in range(2000):
        op = rng.random()
        if op < 0.35 and bm.num_free_pages >= 4:
            t, n = [], rng.randint(1, 16)
            bm.grow(t, n)
            tables.append(t)
            lens.append(n)
        elif op < 0.6 and tables and bm.num_free_pages >= 1:
            i = rng.randrange(len(tables))
            at = rng.randint(0, lens[i])
            f = bm.fork(tables[i], at)
            tables.append(f.block_table)
            lens.append(at)
        elif op < 0.8 and tables:
            i = rng.randrange(len(tables))
            new_len = lens[i] + rng.randint(1, 4)
            if bm.pages_for(new_len) - len(tables[i]) <= bm.num_free_pages:
                # growing writes only into private pages: shared pages are always full
                if lens[i] % 4:
                    assert bm.refcounts[tables[i][-1]] == 1
                bm.grow(tables[i], new_len)
                lens[i] = new_len
        elif tables:
            i = rng.randrange(len(tables))
            bm.release(tables.pop(i))
            lens.pop(i)
        bm.check_consistency(tables)
    for t in tables:
        bm.release(t)
    assert bm.num_free_pages == 64
