"""Continuous batching: which sequences run in the next forward, and with how many tokens.

Every step, running sequences go first, in admission order: one token for a sequence that is
decoding, a chunk of its remaining tokens for one that is still prefilling (chunked prefill), all
under `max_num_batched_tokens` and `max_num_seqs`. Waiting sequences are then admitted in order
while pages and budget last. A waiting sequence with a resident `fork_source` starts from a fork
of the source's pages (sharing full pages, copying the partial tail page) instead of a prefill.

When a running sequence needs a page and none is free, the scheduler first evicts the pages of
kept (finished, keep-alive) sequences, least recently used first, then preempts the most recently
admitted running sequence: its pages are released and it is recomputed later from its tokens.
Because every random draw is a function of (seed, token offset), recomputing changes no output.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from vineppo.engine.block_manager import BlockManager
from vineppo.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step: prefill chunks first (`prefill_lens[i]` tokens of `prefill_seqs[i]`), then one
    token for each of `decode_seqs`; `copy_src -> copy_dst` page copies run before the forward."""

    prefill_seqs: list[Sequence] = field(default_factory=list)
    prefill_lens: list[int] = field(default_factory=list)
    decode_seqs: list[Sequence] = field(default_factory=list)
    copy_src: list[int] = field(default_factory=list)
    copy_dst: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.prefill_lens) + len(self.decode_seqs)

    def __bool__(self) -> bool:
        return bool(self.prefill_seqs or self.decode_seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Finished keep-alive sequences whose pages are resident, least recently used first.
        self.kept: OrderedDict[int, Sequence] = OrderedDict()
        self.num_preemptions = 0
        self.num_evictions = 0

    # ------------------------------------------------------------------ queue management
    def add(self, seqs: list[Sequence]) -> None:
        """Queue new sequences; each one with an `owner` (a kept sequence it continues) counts as a
        pending child of it until it finishes or is aborted."""
        for seq in seqs:
            seq.status = SequenceStatus.WAITING
            self.waiting.append(seq)
            if seq.owner is not None:
                seq.owner.num_pending_children += 1

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def keep(self, seq: Sequence) -> None:
        """Register a finished sequence whose pages stay resident for later forks."""
        self.kept[seq.seq_id] = seq

    def drop(self, seq: Sequence) -> None:
        """Release a kept sequence's pages for good."""
        self.kept.pop(seq.seq_id, None)
        self.bm.release(seq.block_table)
        seq.num_computed = 0

    def finish(self, seq: Sequence) -> None:
        """Take a sequence that just finished out of the running set; keep or free its pages."""
        seq.status = SequenceStatus.FINISHED
        self.running.remove(seq)
        if seq.owner is not None:
            seq.owner.num_pending_children -= 1
        if seq.keep:
            self.keep(seq)
        else:
            self.bm.release(seq.block_table)

    def abort(self, seqs: list[Sequence]) -> None:
        """Take the sequences of an interrupted run out of the queues and free all their pages
        (kept ones included), so the scheduler stays usable."""
        ids = {s.seq_id for s in seqs}
        for seq in list(self.running):
            if seq.seq_id in ids:
                self.running.remove(seq)
                self.bm.release(seq.block_table)
        self.waiting = deque(s for s in self.waiting if s.seq_id not in ids)
        for seq in seqs:
            if seq.status is not SequenceStatus.FINISHED and seq.owner is not None:
                seq.owner.num_pending_children -= 1
            if seq.seq_id in self.kept:
                self.drop(seq)

    def postprocess(self, batch: ScheduledBatch) -> None:
        """After the forward of `batch`: its prefill chunks and decode tokens are computed."""
        for seq, n in zip(batch.prefill_seqs, batch.prefill_lens):
            seq.num_computed += n
        for seq in batch.decode_seqs:
            seq.num_computed += 1

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        preemptions_before = self.num_preemptions
        prefill: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if not self._reserve(seq, seq.num_computed + n, scheduled):
                # Nothing left to preempt but `seq` itself: it waits for pages.
                self._preempt(seq)
                continue
            scheduled.add(seq.seq_id)
            budget -= n
            if seq.num_uncomputed == 1:
                batch.decode_seqs.append(seq)
            else:
                prefill.append((seq, n))
            i += 1

        # Admitting while running sequences are being preempted would only thrash.
        if self.num_preemptions == preemptions_before:
            budget = self._admit(batch, prefill, budget)
        batch.prefill_seqs = [s for s, _ in prefill]
        batch.prefill_lens = [n for _, n in prefill]
        if not batch and self.waiting:
            raise RuntimeError(
                f"the KV pool ({self.bm.num_pages} pages of {self.bm.page_size} tokens) cannot hold "
                f"the next waiting sequence ({len(self.waiting[0])} tokens)"
            )
        return batch

    def _admit(self, batch: ScheduledBatch, prefill: list, budget: int) -> int:
        """Move waiting sequences into the batch, in order, while seats, tokens and pages last."""
        skipped: list[Sequence] = []
        # Sources forked this step keep their pages until the copies have run.
        sources: set[int] = set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            src = seq.fork_source
            can_fork = (src is not None and src.block_table and src.num_computed >= seq.fork_len)
            if src is not None and not can_fork and self._will_compute(src, seq.fork_len):
                # The source is still prefilling: fork from it later instead of recomputing.
                skipped.append(self.waiting.popleft())
                continue
            start = seq.fork_len if can_fork else 0
            n = min(len(seq) - start, budget)
            need = self.bm.pages_for(start + n) - self.bm.pages_for(start)
            if can_fork:
                need += self.bm.fork_cost(start)
            if not self._make_room(need, sources | ({src.seq_id} if can_fork else set())):
                break
            self.waiting.popleft()
            if can_fork:
                fork = self.bm.fork(src.block_table, start)
                seq.block_table = fork.block_table
                batch.copy_src += fork.copy_src
                batch.copy_dst += fork.copy_dst
                sources.add(src.seq_id)
                if src.seq_id in self.kept:
                    self.kept.move_to_end(src.seq_id)
            elif src is not None:
                # The source's pages are gone: later siblings fork from this sequence instead.
                for other in self.waiting:
                    if other.fork_source is src and other.fork_len == seq.fork_len:
                        other.fork_source = seq
            seq.num_computed = start
            self.bm.grow(seq.block_table, start + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            budget -= n
            if seq.num_uncomputed == 1:
                batch.decode_seqs.append(seq)
            else:
                prefill.append((seq, n))
        self.waiting.extendleft(reversed(skipped))
        return budget

    @staticmethod
    def _will_compute(src: Sequence, num_tokens: int) -> bool:
        """True when `src` is queued or running and will have `num_tokens` cached before it ends."""
        return src.status is not SequenceStatus.FINISHED and len(src) > num_tokens

    # ------------------------------------------------------------------ pages
    def _reserve(self, seq: Sequence, num_tokens: int, scheduled: set[int]) -> bool:
        """Give `seq` pages for `num_tokens` tokens, evicting or preempting others as needed."""
        need = self.bm.pages_for(num_tokens) - len(seq.block_table)
        while not self.bm.can_allocate(need):
            if self._evict_kept(set()):
                continue
            victim = self.running[-1]
            if victim is seq or victim.seq_id in scheduled:
                return False
            self._preempt(victim)
        self.bm.grow(seq.block_table, num_tokens)
        return True

    def _make_room(self, need: int, protect: set[int]) -> bool:
        while not self.bm.can_allocate(need):
            if not self._evict_kept(protect):
                return False
        return True

    def _evict_kept(self, protect: set[int]) -> bool:
        """Release the pages of the least recently used kept sequence not in `protect`."""
        candidates = [s for s in self.kept.values() if s.seq_id not in protect]
        if not candidates:
            return False
        # Prefer sequences no queued continuation still wants to fork from.
        victim = next((s for s in candidates if s.num_pending_children == 0), candidates[0])
        self.kept.pop(victim.seq_id)
        self.bm.release(victim.block_table)
        victim.num_computed = 0
        self.num_evictions += 1
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.release(seq.block_table)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
