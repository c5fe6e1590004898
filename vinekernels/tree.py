"""Prefix-shared ("tree" / "cascade") decode attention.

Many decode queries share KV prefixes (K branches forked from one trajectory). A plan describes
the KV of every query as a list of segments; the planner turns them into *runs*:

* a **shared run** is one segment used by >= 2 queries and at least ``min_shared_len`` tokens
  long. Its K/V tiles are loaded once per chunk and multiplied against all of its queries at once
  (their query heads stacked as the rows of one ``tl.dot``);
* a **private run** is everything else: consecutive segments of one query that are not shared
  (its own suffix, plus shared segments too short to pay for sharing), concatenated while they
  stay page-aligned. A private run is processed exactly like plain paged decode.

Fallback rule (why tree decode is never much slower than plain decode): sharing a segment adds
one partial result per query (write + merge, ~2 * Hq * D * 4 bytes) and a kernel program with a
mostly empty tile, and saves (n - 1) re-reads of the segment. Below one KV tile (64 tokens) the
saving does not cover that cost, so ``min_shared_len`` defaults to 64 and such segments are read
privately. With nothing shared, the work is identical to ``paged_decode_attention`` (same chunk
size, same tile shapes, same merge).

Every run is cut into chunks (``chunk_size`` tokens for private runs, ``shared_chunk_size`` for
shared ones); each (run, chunk, query) produces an
(out, lse) partial, and each query's partials are merged in the order of its segments, so a query's
result depends only on its own segment structure, never on the other queries in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from . import _checks
from .configs import DECODE_SPLIT_SIZE
from .reference import merge_lse_ref, share_reference_layout, tree_decode_ref

DEFAULT_MIN_SHARED_LEN = 64
# Shared runs are cut into longer chunks than private ones: each chunk costs every query of the
# run one fp32 partial (Hq * D * 4 bytes written and read back), which for GQA models is worth
# several KV tokens, while 512-token chunks still give ~Hkv * row blocks * P / 512 programs.
DEFAULT_SHARED_CHUNK_SIZE = 512
# A shared run's queries are processed in items of at most this many queries; each item's
# program grid covers them in row blocks, so this only bounds the size of one work item.
SHARED_QUERIES_PER_ITEM = 64


@dataclass
class TreePlanHost:
    """Host-side description of a plan (used by the torch reference and for inspection)."""

    run_pages: list[list[int]]       # pages of each run, in token order
    run_lens: list[int]              # tokens in each run
    run_shared: list[bool]           # True for shared runs
    entry_run: list[int]             # entries (run, query) grouped by run
    entry_query: list[int]
    entry_merge_order: list[int]     # entries of query 0 in segment order, then query 1, ...
    query_entry_indptr: list[int]    # query i's entries are entry_merge_order[indptr[i]:indptr[i+1]]


@dataclass
class TreePlan:
    """A tree-decode plan on a device; build it with :func:`plan_tree_decode`.

    Device tensors (int32, views into one buffer):
      run_pages       [total pages]  page ids of every run, run after run
      run_page_start  [R]            offset of each run's pages in run_pages
      run_lens        [R]            tokens in each run
      entry_query     [E]            query of each (run, query) entry, entries grouped by run
      entry_partial   [E]            partial slot of the entry's first chunk (chunk c uses slot + c)
      private_items   [Wp, 4]        (run, chunk start token, first entry, 1) for private runs
      shared_items    [Ws, 4]        (run, chunk start token, first entry, num entries) for shared runs
      partial_indptr  [num_queries + 1]  query i's partials are slots indptr[i]:indptr[i+1], in order
    """

    num_queries: int
    page_size: int
    chunk_size: int                  # tokens per chunk of a private run
    shared_chunk_size: int           # tokens per chunk of a shared run
    min_shared_len: int
    num_runs: int
    num_shared_runs: int
    num_partials: int
    max_page: int                    # largest page id referenced, -1 if none
    max_item_queries: int            # most queries in one shared work item (0 if none)
    query_lens: list[int]            # total KV tokens of each query
    kv_tokens_read: int              # KV tokens loaded per layer and KV head (sum of run lengths)
    device: torch.device
    run_pages: torch.Tensor
    run_page_start: torch.Tensor
    run_lens: torch.Tensor
    entry_query: torch.Tensor
    entry_partial: torch.Tensor
    private_items: torch.Tensor
    shared_items: torch.Tensor
    partial_indptr: torch.Tensor
    host: TreePlanHost = field(repr=False)
    reference_cache: dict = field(default_factory=dict, repr=False)  # index tensors of the torch path


def plan_tree_decode(segment_pages: list[list[int]], segment_lens: list[int], query_segments: list[list[int]],
                     page_size: int, device, *, min_shared_len: int = DEFAULT_MIN_SHARED_LEN,
                     chunk_size: int = DECODE_SPLIT_SIZE,
                     shared_chunk_size: int = DEFAULT_SHARED_CHUNK_SIZE) -> TreePlan:
    """Plan prefix-shared decode.

    Segment s is tokens [0, segment_lens[s]) of pages segment_pages[s] (in order). Query i's KV is
    the concatenation of the segments query_segments[i] (shared prefixes first, private suffix
    last); empty segments are allowed and ignored. See the module docstring for the rule that
    decides which segments are read once for all their queries. Private runs are processed in
    chunks of `chunk_size` tokens (the decode split size), shared runs in `shared_chunk_size`.
    """
    _validate_plan_inputs(segment_pages, segment_lens, query_segments, page_size, min_shared_len, chunk_size)
    if not isinstance(shared_chunk_size, int) or shared_chunk_size < 1:
        raise ValueError(f"shared_chunk_size must be a positive int, got {shared_chunk_size!r}")
    users = [0] * len(segment_lens)
    for segs in query_segments:
        for s in segs:
            users[s] += 1
    shared = [users[s] >= 2 and segment_lens[s] >= min_shared_len for s in range(len(segment_lens))]

    run_pages: list[list[int]] = []
    run_lens: list[int] = []
    run_shared: list[bool] = []
    run_queries: list[list[int]] = []
    shared_run_of: dict[int, int] = {}
    query_runs: list[list[int]] = []

    def new_run(pages, length, is_shared):
        run_pages.append(list(pages))
        run_lens.append(length)
        run_shared.append(is_shared)
        run_queries.append([])
        return len(run_lens) - 1

    for i, segs in enumerate(query_segments):
        runs: list[int] = []
        open_run = -1  # private run that may still be extended
        for s in segs:
            length = segment_lens[s]
            if length == 0:
                continue
            pages = segment_pages[s][: -(-length // page_size)]
            if shared[s]:
                if s not in shared_run_of:
                    shared_run_of[s] = new_run(pages, length, True)
                runs.append(shared_run_of[s])
                open_run = -1
            elif open_run >= 0 and run_lens[open_run] % page_size == 0:
                run_pages[open_run].extend(pages)
                run_lens[open_run] += length
            else:
                open_run = new_run(pages, length, False)
                runs.append(open_run)
        for r in runs:
            run_queries[r].append(i)
        query_runs.append(runs)

    run_chunk = [shared_chunk_size if sh else chunk_size for sh in run_shared]
    chunks = [-(-n // c) for n, c in zip(run_lens, run_chunk)]
    entry_run, entry_query, run_entry_start = [], [], []
    entry_of: dict[tuple[int, int], int] = {}
    for r, queries in enumerate(run_queries):
        run_entry_start.append(len(entry_run))
        for i in queries:
            entry_of[(r, i)] = len(entry_run)
            entry_run.append(r)
            entry_query.append(i)
    entry_partial = [0] * len(entry_run)
    merge_order, indptr, partial_indptr = [], [0], [0]
    for i, runs in enumerate(query_runs):
        slot = partial_indptr[-1]
        for r in runs:
            e = entry_of[(r, i)]
            merge_order.append(e)
            entry_partial[e] = slot
            slot += chunks[r]
        indptr.append(len(merge_order))
        partial_indptr.append(slot)

    private_items, shared_items = [], []
    for r, queries in enumerate(run_queries):
        for c in range(chunks[r]):
            if run_shared[r]:
                for q0 in range(0, len(queries), SHARED_QUERIES_PER_ITEM):
                    n = min(SHARED_QUERIES_PER_ITEM, len(queries) - q0)
                    shared_items.append((r, c * shared_chunk_size, run_entry_start[r] + q0, n))
            else:
                private_items.append((r, c * chunk_size, run_entry_start[r], 1))

    run_page_start, flat_pages = [], []
    for pages in run_pages:
        run_page_start.append(len(flat_pages))
        flat_pages.extend(pages)
    parts = [flat_pages, run_page_start, run_lens, entry_query, entry_partial,
             [x for item in private_items for x in item], [x for item in shared_items for x in item],
             partial_indptr]
    buffer = torch.tensor([x for p in parts for x in p], dtype=torch.int32).to(device)
    views, offset = [], 0
    for p in parts:
        views.append(buffer[offset: offset + len(p)])
        offset += len(p)
    views[5] = views[5].view(-1, 4)
    views[6] = views[6].view(-1, 4)
    host = TreePlanHost(run_pages, run_lens, run_shared, entry_run, entry_query, merge_order, indptr)
    query_lens = [sum(segment_lens[s] for s in segs) for segs in query_segments]
    return TreePlan(
        num_queries=len(query_segments), page_size=page_size, chunk_size=chunk_size,
        shared_chunk_size=shared_chunk_size,
        min_shared_len=min_shared_len, num_runs=len(run_lens), num_shared_runs=sum(run_shared),
        num_partials=partial_indptr[-1], max_page=max(flat_pages, default=-1),
        max_item_queries=max((item[3] for item in shared_items), default=0), query_lens=query_lens,
        kv_tokens_read=sum(run_lens), device=buffer.device, run_pages=views[0], run_page_start=views[1],
        run_lens=views[2], entry_query=views[3], entry_partial=views[4], private_items=views[5],
        shared_items=views[6], partial_indptr=views[7], host=host,
    )


def tree_plan_tails(plan: TreePlan) -> list[int]:
    """The run holding each query's newest token: the last run of its merge order (the argument
    `grow_tree_plan` takes; a decoding sequence's last page is its own, so it is a private run)."""
    host = plan.host
    ptr = host.query_entry_indptr
    return [host.entry_run[host.entry_merge_order[ptr[i + 1] - 1]] for i in range(len(ptr) - 1)]


def grow_tree_plan(plan: TreePlan, tails: list[int]) -> TreePlan | None:
    """The plan of the next decode step of the same queries when each grew by one token inside its
    last page (no new pages): the same runs, each query's tail run (`tails`, from
    `tree_plan_tails`) one token longer. Returns None when that is not a pure length change (a
    tail run is shared, or would need another chunk or page), and the caller plans afresh. The new
    plan shares the old one's reference layout, so a decode step that stays within its pages
    costs no planning on the host."""
    host = plan.host
    run_lens = list(host.run_lens)
    for r in tails:
        n = run_lens[r]
        if (host.run_shared[r] or n % plan.chunk_size == 0
                or n + 1 > len(host.run_pages[r]) * plan.page_size):
            return None
        run_lens[r] = n + 1
    new = replace(plan, run_lens=torch.tensor(run_lens, dtype=torch.int32).to(plan.device),
                  query_lens=[n + 1 for n in plan.query_lens],
                  kv_tokens_read=plan.kv_tokens_read + len(tails),
                  host=replace(host, run_lens=run_lens), reference_cache={})
    share_reference_layout(plan, new)
    return new


def _validate_plan_inputs(segment_pages, segment_lens, query_segments, page_size, min_shared_len, chunk_size):
    if not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(min_shared_len, int) or min_shared_len < 0:
        raise ValueError(f"min_shared_len must be a non-negative int, got {min_shared_len!r}")
    if len(segment_pages) != len(segment_lens):
        raise ValueError(f"segment_pages has {len(segment_pages)} segments but segment_lens has {len(segment_lens)}")
    for s, (pages, length) in enumerate(zip(segment_pages, segment_lens)):
        if not isinstance(length, int) or length < 0:
            raise ValueError(f"segment_lens[{s}] must be a non-negative int, got {length!r}")
        needed = -(-length // page_size)
        if len(pages) < needed:
            raise ValueError(f"segment {s} has {length} tokens and needs {needed} pages, got {len(pages)}")
        for p in pages[:needed]:
            if not isinstance(p, int) or p < 0:
                raise ValueError(f"segment {s} has an invalid page id {p!r}")
    if len(query_segments) == 0:
        raise ValueError("query_segments is empty: a plan needs at least one query")
    for i, segs in enumerate(query_segments):
        if len(set(segs)) != len(segs):
            raise ValueError(f"query {i} lists a segment more than once: {segs}")
        total = 0
        for s in segs:
            if not isinstance(s, int) or not 0 <= s < len(segment_lens):
                raise ValueError(f"query {i} references segment {s!r}, not in [0, {len(segment_lens)})")
            total += segment_lens[s]
        if total == 0:
            raise ValueError(f"query {i} has no KV tokens (its segments are all empty)")


def tree_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: TreePlan,
                          scale: float, impl: str = "auto") -> torch.Tensor:
    """Decode attention of q [num_queries, Hq, D] over the plan's segments; returns [num_queries, Hq, D]."""
    backend = _checks.resolve_impl(impl, q)
    _checks.check_tensor("q", q, 3, None, None)
    num_pages, page_size, _, _ = _checks.check_kv_caches(k_cache, v_cache, q.device, backend)
    _checks.check_query(q, k_cache)
    scale = _checks.check_scale(scale)
    if not isinstance(plan, TreePlan):
        raise ValueError(f"plan must be a TreePlan, got {type(plan).__name__}")
    if q.shape[0] != plan.num_queries:
        raise ValueError(f"q has {q.shape[0]} queries but the plan has {plan.num_queries}")
    if plan.page_size != page_size:
        raise ValueError(f"plan page_size {plan.page_size} does not match the KV cache page size {page_size}")
    if plan.max_page >= num_pages:
        raise ValueError(f"plan references page {plan.max_page} but the KV cache has {num_pages} pages")
    if plan.device != q.device:
        raise ValueError(f"plan is on {plan.device} but q is on {q.device}")
    if backend == "torch":
        return tree_decode_ref(q, k_cache, v_cache, plan, scale)
    from ._triton import launch

    return launch.tree_decode(q, k_cache, v_cache, plan, scale)


def merge_lse(partial_out: torch.Tensor, partial_lse: torch.Tensor, indptr: torch.Tensor,
              out_dtype: torch.dtype | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention partials by log-sum-exp, in order.

    partial_out [N, H, D] (any float dtype), partial_lse float32 [N, H] (natural log of the sum of
    exp(scaled scores) of each partial), indptr int32 [B + 1]: output b merges partial rows
    indptr[b] .. indptr[b+1]-1 in that order. Returns (out [B, H, D] in out_dtype, default
    partial_out.dtype; lse float32 [B, H]). An empty row range gives out = 0 and lse = -inf.
    """
    backend = _checks.resolve_impl(impl, partial_out)
    dtypes = _checks.KERNEL_DTYPES if backend == "triton" else _checks.REFERENCE_DTYPES
    _checks.check_tensor("partial_out", partial_out, 3, dtypes, None)
    device = partial_out.device
    _checks.check_tensor("partial_lse", partial_lse, 2, (torch.float32, torch.float64) if backend == "torch"
                         else (torch.float32,), device)
    _checks.check_tensor("indptr", indptr, 1, (torch.int32,), device)
    if partial_lse.shape != partial_out.shape[:2]:
        raise ValueError(f"partial_lse shape {tuple(partial_lse.shape)} must be partial_out's first two dims "
                         f"{tuple(partial_out.shape[:2])}")
    if indptr.shape[0] < 1:
        raise ValueError("indptr must have at least one entry (B + 1 offsets)")
    out_dtype = out_dtype or partial_out.dtype
    if out_dtype not in dtypes:
        raise ValueError(f"out_dtype {out_dtype} is not supported")
    if _checks.value_checks_enabled(indptr):
        ptr = indptr.to("cpu", torch.int64)
        if int(ptr[0]) != 0 or bool((ptr[1:] < ptr[:-1]).any()) or int(ptr[-1]) > partial_out.shape[0]:
            raise ValueError(f"indptr must start at 0, be non-decreasing and end <= {partial_out.shape[0]}")
    if backend == "torch":
        return merge_lse_ref(partial_out, partial_lse, indptr, out_dtype)
    from ._triton import launch

    return launch.merge_lse(partial_out, partial_lse, indptr, out_dtype)
