"""Scheduler without a model: budgets, chunked prefill, forks, preemption and eviction."""
import random

import pytest

from vineppo.engine.block_manager import BlockManager
from vineppo.engine.scheduler import Scheduler
from vineppo.engine.sequence import SamplingParams, Sequence, SequenceStatus


def make_seq(prompt_len, max_new, keep=False, start=0):
    return Sequence(list(range(start, start + prompt_len)), SamplingParams(), seed=0,
                    max_new=max_new, stop_ids=frozenset(), keep=keep)


def drive(sched, max_steps=10_000, on_step=None):
    """Run the scheduler like the engine does; the 'sampled' token is the sequence length."""
    steps = 0
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch, "no progress"
        assert batch.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        for seq, n in zip(batch.prefill_seqs, batch.prefill_lens):
            assert n >= 1 and seq.num_computed + n <= len(seq)
            assert len(seq.block_table) >= sched.bm.pages_for(seq.num_computed + n)
        for seq in batch.decode_seqs:
            assert seq.num_uncomputed == 1
        if on_step:
            on_step(batch)
        sampled = [s for s, n in zip(batch.prefill_seqs, batch.prefill_lens)
                   if s.num_computed + n == len(s)] + list(batch.decode_seqs)
        for seq, n in zip(batch.prefill_seqs, batch.prefill_lens):
            seq.num_computed += n
        for seq in batch.decode_seqs:
            seq.num_computed += 1
        for seq in sampled:
            seq.token_ids.append(len(seq))
            if seq.num_output >= seq.max_new:
                seq.finish_reason = "length"
                sched.finish(seq)
        tables = [s.block_table for s in sched.running] + [s.block_table for s in sched.kept.values()]
        sched.bm.check_consistency(tables)
        steps += 1
        assert steps < max_steps
    return steps


def test_token_and_seq_limits_and_chunked_prefill():
    bm = BlockManager(256, page_size=4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=10)
    seqs = [make_seq(25, 3), make_seq(5, 4), make_seq(7, 2), make_seq(3, 5)]
    sched.add(seqs)
    chunks = []
    drive(sched, on_step=lambda b: chunks.append(list(zip([s.seq_id for s in b.prefill_seqs], b.prefill_lens))))
    # the 25-token prompt was split into chunks of at most 10 tokens
    first = [n for step in chunks for sid, n in step if sid == seqs[0].seq_id]
    assert sum(first) == 25 and max(first) <= 10 and len(first) == 3
    for s in seqs:
        assert s.is_finished and s.num_output == s.max_new
    assert bm.num_free_pages == 256


def test_followers_fork_after_leader_prefill():
    bm = BlockManager(64, page_size=4)
    sched = Scheduler(bm)
    leader = make_seq(10, 3)
    followers = [make_seq(10, 3) for _ in range(3)]
    for f in followers:
        f.fork_source, f.fork_len = leader, 9
    sched.add([leader] + followers)
    b1 = sched.schedule()
    assert b1.prefill_seqs == [leader] and not b1.decode_seqs   # followers wait for the source
    leader.num_computed = 10
    leader.token_ids.append(99)
    b2 = sched.schedule()
    # followers forked: two shared full pages, the partial third page copied; a 1-token extend
    assert set(b2.decode_seqs) == {leader, *followers}
    assert len(b2.copy_src) == 3 and b2.copy_src == [leader.block_table[2]] * 3
    for f in followers:
        assert f.num_computed == 9 and f.block_table[:2] == leader.block_table[:2]
        assert f.block_table[2] != leader.block_table[2]
    assert bm.refcounts[leader.block_table[0]] == 4


def test_preemption_small_pool_finishes_everything():
    bm = BlockManager(12, page_size=4)   # 48 tokens for 6 sequences of up to 20 tokens
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    rng = random.Random(0)
    seqs = [make_seq(rng.randint(3, 10), rng.randint(5, 10), start=i) for i in range(6)]
    sched.add(seqs)
    drive(sched)
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.is_finished and s.num_output == s.max_new
        # recompute never changes the tokens: the 'sampled' token is a function of the position
        assert s.output_ids == list(range(s.prompt_len, s.prompt_len + s.max_new))
    assert bm.num_free_pages == 12


def test_kept_sequences_are_evicted_before_running_ones():
    bm = BlockManager(8, page_size=4)
    sched = Scheduler(bm)
    kept = [make_seq(6, 2, keep=True) for _ in range(3)]
    sched.add(kept)
    drive(sched)
    assert len(sched.kept) == 3 and bm.num_free_pages == 8 - 6
    big = make_seq(20, 8)                 # needs 7 pages
    sched.add([big])
    drive(sched)
    assert sched.num_evictions >= 2 and sched.num_preemptions == 0
    assert big.is_finished
    evicted = [s for s in kept if not s.block_table]
    assert all(s.num_computed == 0 for s in evicted)


def test_fork_from_evicted_source_recomputes_once_then_forks_siblings():
    bm = BlockManager(32, page_size=4)
    sched = Scheduler(bm)
    parent = make_seq(10, 4, keep=True)
    sched.add([parent])
    drive(sched)
    sched.drop(parent)                    # as if evicted: no pages, finished
    children = [Sequence(parent.token_ids[:12], SamplingParams(), 0, 3, frozenset()) for _ in range(3)]
    for c in children:
        c.fork_source, c.fork_len = parent, 11
    sched.add(children)
    b = sched.schedule()
    assert b.prefill_seqs == [children[0]] and b.prefill_lens == [12]
    assert children[1].fork_source is children[0]
    drive(sched)
    assert all(c.is_finished for c in children)
    assert bm.num_free_pages == 32


def test_pool_that_cannot_hold_a_sequence_raises():
    bm = BlockManager(2, page_size=4)
    sched = Scheduler(bm)
    sched.add([make_seq(12, 2)])
    with pytest.raises(RuntimeError, match="cannot hold"):
        sched.schedule()


def test_waiting_status_after_preemption():
    bm = BlockManager(4, page_size=4)
    sched = Scheduler(bm, max_num_batched_tokens=64)
    a, b = make_seq(7, 9), make_seq(7, 9)
    sched.add([a, b])
    sched.schedule()
    assert a.status is SequenceStatus.RUNNING and b.status is SequenceStatus.RUNNING
    a.num_computed = b.num_computed = 7
    a.token_ids.append(0)
    b.token_ids.append(0)
    a.token_ids += [0] * 1            # a needs a third page next step
    a.num_computed = 8
    batch = sched.schedule()
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed == 0
    assert batch.decode_seqs == [a]
