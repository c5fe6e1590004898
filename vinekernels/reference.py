"""Pure-torch references for every vinekernels op; also the CPU execution path.

All attention math runs in float32 (float64 when the inputs are float64) on K/V gathered through
the page tables into padded tensors, with GQA handled by viewing the query heads as
[num_kv_heads, group_size]. Work is chunked so the score tensor stays bounded in memory; nothing
loops over tokens in Python. Inputs are assumed validated by the public wrappers.

Decode-style attention (paged decode and prefix-shared tree decode) shares one primitive,
`_attend_pages`: whole pages are gathered with `index_select` (a plain row copy, several times
faster on CPU than advanced indexing), queries are laid out heads-major, each KV head's keys are
read in place by one batched matmul, padded keys are masked with an additive -inf bias, and rows
are processed in cache-sized chunks. Tree decode gathers each shared run once for all of its
queries, batching runs of similar shape (see `_TreeRefLayout`).
"""

from __future__ import annotations

import torch

# Upper bound on elements of one score tensor; larger problems are processed in chunks.
_SCORE_BUDGET = 1 << 24
# Elements of gathered K (or of scores) per chunk of decode-style attention (see _attend_pages).
_CHUNK_ELEMS = 1 << 18


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_kv(cache: torch.Tensor, page_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather tokens [0, max_len) of each row's pages: [N, max_pages] -> [N, max_len, Hkv, D]."""
    page_size = cache.shape[1]
    n_pages = (max_len + page_size - 1) // page_size
    pages = page_table[:, :n_pages].reshape(-1).long()
    kv = cache.index_select(0, pages)  # [N * n_pages, page_size, Hkv, D]
    return kv.view(page_table.shape[0], n_pages * page_size, *cache.shape[2:])[:, :max_len]


def _attend_pages(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pages: torch.Tensor,
                  key_bias: torch.Tensor, row_pages: list[int] | None = None):
    """Attention with log-sum-exp of pre-scaled queries over whole gathered pages.

    q: [Hkv, N, M, D], heads-major, already multiplied by the scale, in the compute dtype;
    pages: long [N, P]; key_bias: [N, 1, P * page_size], 0 on keys to attend and -inf on padding
    (every row must keep at least one key). Returns out [Hkv, N, M, D] and lse [Hkv, N, M].
    row_pages (optional, non-increasing): pages row n needs; each chunk then gathers only as many
    pages as its first row needs instead of P.

    Rows are processed in chunks of about `_CHUNK_ELEMS` gathered K elements (or score
    elements): small enough for each chunk's K, V and scores to stay in cache and be served by
    the allocator without fresh pages, which on CPU matters more than the per-chunk op overhead.
    """
    num_kv_heads, n, m, head_dim = q.shape
    page_size = k_cache.shape[1]
    full = pages.shape[1]
    per_page = num_kv_heads * page_size * max(head_dim, m)
    if row_pages is None and _CHUNK_ELEMS // (per_page * full) >= n:
        return _attend_pages_chunk(q, k_cache, v_cache, pages, key_bias)
    outs, lses = [], []
    r0 = 0
    while r0 < n:
        p = full if row_pages is None else row_pages[r0]
        r1 = min(n, r0 + max(1, _CHUNK_ELEMS // (per_page * p)))
        o, lse = _attend_pages_chunk(q[:, r0:r1], k_cache, v_cache, pages[r0:r1, :p],
                                     key_bias[r0:r1, :, : p * page_size])
        outs.append(o)
        lses.append(lse)
        r0 = r1
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _attend_pages_chunk(q, k_cache, v_cache, pages, key_bias):
    num_kv_heads, n, m, head_dim = q.shape
    length = pages.shape[1] * k_cache.shape[1]
    # index_select of whole pages is a plain row copy (several times faster on CPU than advanced
    # indexing); the gathered [N, L, Hkv, D] tensor is used in place, one KV head at a time: each
    # head's [N, L, D] slice is a strided matrix batch that bmm reads without a transposed copy.
    k = k_cache.index_select(0, pages.reshape(-1)).view(n, length, num_kv_heads, head_dim).to(q.dtype)
    v = v_cache.index_select(0, pages.reshape(-1)).view(n, length, num_kv_heads, head_dim).to(q.dtype)
    s = torch.empty(num_kv_heads, n, m, length, dtype=q.dtype, device=q.device)
    for h in range(num_kv_heads):
        torch.bmm(q[h], k[:, :, h].transpose(1, 2), out=s[h])
    s.add_(key_bias)
    # softmax in place with a single exp pass; normalise the [M, D] output, not the [M, L] weights
    m_row = s.amax(dim=-1, keepdim=True)
    p = s.sub_(m_row).exp_()
    total = p.sum(dim=-1, keepdim=True)
    out = torch.empty_like(q)
    for h in range(num_kv_heads):
        torch.bmm(p[h], v[:, :, h], out=out[h])
    return out.div_(total), (m_row + total.log()).squeeze(-1)


def _key_bias(key_lens: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, 1, length] additive mask: 0 for key positions < key_lens[n], -inf after."""
    pad = torch.arange(length, device=key_lens.device)[None, :] >= key_lens[:, None]
    bias = torch.zeros(pad.shape, dtype=dtype, device=key_lens.device).masked_fill_(pad, float("-inf"))
    return bias[:, None, :]


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float):
    """Masked attention (no lse) through torch's fused SDPA.

    q: [N, M, Hq, D]; k, v: [N, Hkv, L, D] (contiguous); keep: [N, M, L], every row keeping >= 1
    token. Returns [N, M, Hq, D].
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).contiguous(), k, v, attn_mask=keep[:, None], scale=scale,
        enable_gqa=q.shape[2] != k.shape[1])
    return out.transpose(1, 2)


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    # index_copy_ into the caches viewed as [num_pages * page_size, Hkv, D] (slot = row): a row
    # copy, much cheaper on CPU than advanced-index assignment through (page, offset) pairs.
    if slot_mapping.numel() and bool(slot_mapping.min() < 0):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def copy_pages_ref(k_caches, v_caches, src, dst) -> None:
    src, dst = src.long(), dst.long()
    for cache in list(k_caches) + list(v_caches):
        cache[dst] = cache[src]


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, return_lse: bool = False):
    """One query per sequence: q [B, Hq, D] -> out [B, Hq, D] (and lse [B, Hq] float32/64)."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    cdt = _compute_dtype(q.dtype)
    if num_seqs == 0:
        out = torch.empty_like(q)
        lse = torch.empty(0, num_q_heads, dtype=cdt, device=q.device)
        return (out, lse) if return_lse else out
    # Rows sorted by length, longest first: each chunk gathers only the pages its rows need
    # rather than the batch's longest table (decode batches mix lengths widely).
    lens, order = torch.sort(seq_lens.long(), descending=True, stable=True)
    row_pages = [-(-n // page_size) for n in lens.tolist()]
    n_pages = row_pages[0]
    qs = _heads_major(q.index_select(0, order), num_kv_heads, scale, cdt)
    o, lse = _attend_pages(qs, k_cache, v_cache, block_tables.index_select(0, order)[:, :n_pages].long(),
                           _key_bias(lens, n_pages * page_size, cdt), row_pages)
    out = torch.empty_like(q).index_copy_(
        0, order, o.transpose(0, 1).reshape(num_seqs, num_q_heads, head_dim).to(q.dtype))
    if not return_lse:
        return out
    lse_out = torch.empty(num_seqs, num_q_heads, dtype=cdt, device=q.device)
    return out, lse_out.index_copy_(0, order, lse.transpose(0, 1).reshape(num_seqs, num_q_heads))


def _heads_major(q: torch.Tensor, num_kv_heads: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """q [B, Hq, D] -> scale * q as [Hkv, B, group, D] (contiguous, compute dtype)."""
    b, num_q_heads, head_dim = q.shape
    out = torch.empty(num_kv_heads, b, num_q_heads // num_kv_heads, head_dim, dtype=dtype, device=q.device)
    return torch.mul(q.view(b, num_kv_heads, -1, head_dim).transpose(0, 1), scale, out=out)


def paged_prefill_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
    """Varlen causal attention of new tokens over cached pages: q [T, Hq, D] -> [T, Hq, D]."""
    num_tokens, num_q_heads = q.shape[0], q.shape[1]
    cdt = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts
    if num_tokens == q_lens.shape[0] and bool((q_lens == 1).all()):
        # one new token per sequence (e.g. the first token of forked continuations) is decode
        return paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    lens = seq_lens.long()
    page_size = k_cache.shape[1]
    for b0, b1 in _seq_chunks(q_lens.tolist(), lens.tolist(), num_q_heads):
        sl = slice(b0, b1)
        max_q, max_len = int(q_lens[sl].max()), int(lens[sl].max())
        if max_q == 0:
            continue
        j = torch.arange(max_q, device=q.device)
        valid = j[None, :] < q_lens[sl, None]  # [b, max_q]
        tok = (starts[sl, None] + j[None, :]).clamp(max=num_tokens - 1)
        pos = (lens[sl] - q_lens[sl])[:, None] + j[None, :]  # absolute position of each new token
        n_pages = -(-max_len // page_size)
        keep = torch.arange(n_pages * page_size, device=q.device)[None, None, :] <= pos[:, :, None]
        pages = block_tables[sl, :n_pages].long()
        o = _attend_sdpa(q[tok].to(cdt), _gather_heads_major(k_cache, pages, cdt),
                         _gather_heads_major(v_cache, pages, cdt), keep, scale)
        out[tok[valid]] = o[valid].to(q.dtype)
    return out


def _gather_heads_major(cache: torch.Tensor, pages: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whole pages of each row as one contiguous [N, Hkv, pages * page_size, D] tensor (SDPA's
    layout: its CPU kernels are several times slower on strided inputs)."""
    n, p = pages.shape
    page_size, num_kv_heads, head_dim = cache.shape[1:]
    kv = cache.index_select(0, pages.reshape(-1)).view(n, p * page_size, num_kv_heads, head_dim)
    out = torch.empty(n, num_kv_heads, p * page_size, head_dim, dtype=dtype, device=cache.device)
    return out.copy_(kv.transpose(1, 2))


def _seq_chunks(q_lens: list[int], lens: list[int], num_q_heads: int):
    """Split sequences into consecutive groups whose padded score tensor fits the budget.

    A single sequence larger than the budget is still one group; its score tensor is
    q_len * seq_len * heads, the same as any unfused attention.
    """
    b0, max_q, max_len = 0, 0, 0
    for b, (ql, sl) in enumerate(zip(q_lens, lens)):
        nq, nl = max(max_q, ql), max(max_len, sl)
        if b > b0 and (b - b0 + 1) * nq * nl * num_q_heads > _SCORE_BUDGET:
            yield b0, b
            b0, nq, nl = b, ql, sl
        max_q, max_len = nq, nl
    if b0 < len(q_lens):
        yield b0, len(q_lens)


def merge_lse_ref(partial_out, partial_lse, indptr, out_dtype=None):
    """Merge partial attention results: rows indptr[i]:indptr[i+1] of the partials make output i.

    partial_out [N, H, D], partial_lse [N, H] -> (out [B, H, D] in out_dtype, lse [B, H]).
    A row set that is empty, or whose lse are all -inf, gives out = 0 and lse = -inf.
    """
    cdt = _compute_dtype(partial_lse.dtype)
    out_dtype = out_dtype or partial_out.dtype
    num_out = indptr.shape[0] - 1
    num_heads, head_dim = partial_out.shape[1], partial_out.shape[2]
    device = partial_out.device
    indptr = indptr.long()
    counts = indptr[1:] - indptr[:-1]
    owner = torch.repeat_interleave(torch.arange(num_out, device=device), counts)
    lse = partial_lse.to(cdt)
    m = torch.full((num_out, num_heads), float("-inf"), dtype=cdt, device=device)
    m = m.scatter_reduce(0, owner[:, None].expand(-1, num_heads), lse, reduce="amax")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe[owner])  # [N, H], 0 for -inf partials
    total = torch.zeros(num_out, num_heads, dtype=cdt, device=device).index_add_(0, owner, w)
    acc = torch.zeros(num_out, num_heads, head_dim, dtype=cdt, device=device)
    acc.index_add_(0, owner, w[..., None] * partial_out.to(cdt))
    has = total > 0
    out = torch.where(has[..., None], acc / torch.where(has, total, torch.ones_like(total))[..., None],
                      torch.zeros_like(acc))
    out_lse = torch.where(has, m_safe + torch.log(torch.where(has, total, torch.ones_like(total))),
                          torch.full_like(m, float("-inf")))
    return out.to(out_dtype), out_lse


def tree_decode_ref(q, k_cache, v_cache, plan, scale, return_lse: bool = False):
    """Prefix-shared decode: each run of the plan is gathered once and attended by all of its
    queries at once; the (run, query) partials are merged per query in segment order.

    Runs are batched in a few groups of similar shape (see `_TreeRefLayout`): a group gathers
    its runs' pages once and stacks each run's queries (padded to the group's most) as the rows
    of one matmul per KV head, so there is no Python loop over runs.
    """
    num_queries, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    layout = _tree_ref_layout(plan, num_q_heads, num_kv_heads, k_cache.shape[1], q.device)
    qs = _heads_major(q, num_kv_heads, scale, cdt)  # [Hkv, B, group, D]
    outs, lses = [], []
    for g, bias in zip(layout.groups, layout.key_biases(plan, cdt)):
        qg = qs.index_select(1, g.queries).view(num_kv_heads, g.num_runs, g.num_queries * group, head_dim)
        o, lse = _attend_pages(qg, k_cache, v_cache, g.pages, bias, g.row_pages)
        outs.append(o.view(-1, group, head_dim))    # rows (kv head, run, query slot)
        lses.append(lse.view(-1, group))
    if layout.max_partials == 1:
        out_all, lse_all = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
        out = out_all.index_select(0, layout.merge_rows)
        lse = lse_all.index_select(0, layout.merge_rows)
    else:
        out, lse = _merge_padded(outs, lses, layout, cdt)
    out = out.view(num_queries, num_q_heads, head_dim).to(q.dtype)
    return (out, lse.view(num_queries, num_q_heads)) if return_lse else out


def _merge_padded(outs, lses, layout, cdt):
    """LSE-merge of each query's partials, padded to the plan's most partials per query.

    Padding points at an extra row with out = 0 and lse = -inf, whose weight is exactly 0; the
    partials of a query are combined in its segment order.
    """
    group, head_dim = outs[0].shape[1], outs[0].shape[2]
    device = outs[0].device
    out_all = torch.cat(outs + [torch.zeros(1, group, head_dim, dtype=cdt, device=device)])
    lse_all = torch.cat(lses + [torch.full((1, group), float("-inf"), dtype=cdt, device=device)])
    n = layout.max_partials
    o = out_all.index_select(0, layout.merge_rows).view(-1, n, layout.num_kv_heads, group, head_dim)
    lse = lse_all.index_select(0, layout.merge_rows).view(-1, n, layout.num_kv_heads, group)
    m = lse.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m)
    total = w.sum(dim=1)
    out = (w[..., None] * o).sum(dim=1) / total[..., None]
    return out, m[:, 0] + torch.log(total)


# Grouping of runs: a group may pad its score tensor (queries x pages of its largest run, for
# each run) to this many times the unpadded work, or by up to _GROUP_SLACK_ELEMS score elements:
# another group costs a dozen more ops per layer, worth about that much padded arithmetic on CPU.
_GROUP_PADDING = 2.0
_GROUP_SLACK_ELEMS = 1 << 12


class _RunGroup:
    """Runs of a tree plan batched together by the reference: `num_runs` runs padded to
    `num_pages` pages and `num_queries` queries each. Holds no run lengths, so plans that differ
    only in their runs' lengths (decode steps that stay within the same pages) can share it."""

    def __init__(self, runs, run_pages, run_queries, page_size, device):
        runs = sorted(runs, key=lambda r: -len(run_pages[r]))  # longest first, see _attend_pages
        self.run_ids = runs
        self.row_pages = [len(run_pages[r]) for r in runs]
        self.num_runs = len(runs)
        self.num_pages = self.row_pages[0]
        self.num_queries = max(len(run_queries[r]) for r in runs)
        pages = [run_pages[r] + [0] * (self.num_pages - len(run_pages[r])) for r in runs]
        # padding query slots repeat the run's first query: finite rows that are never merged
        queries = [run_queries[r] + [run_queries[r][0]] * (self.num_queries - len(run_queries[r]))
                   for r in runs]
        self.runs = torch.tensor(runs, dtype=torch.long).to(device)
        self.pages = torch.tensor(pages, dtype=torch.long).to(device)
        self.queries = torch.tensor(queries, dtype=torch.long).flatten().to(device)
        self.length = self.num_pages * page_size


class _TreeRefLayout:
    """How the reference batches a plan: groups of runs, and for every (query, partial, kv head)
    the row of the concatenated group outputs that holds it (`merge_rows`, padded to
    `max_partials` per query with the index of one extra row past the end).

    It depends only on the plan's structure (runs' pages, queries, merge order), not on the
    runs' lengths, which `key_biases` reads from the plan."""

    def __init__(self, plan, num_q_heads: int, num_kv_heads: int, page_size: int, device):
        host = plan.host
        num_runs = len(host.run_lens)
        run_queries: list[list[int]] = [[] for _ in range(num_runs)]
        run_first_entry = [0] * num_runs
        for e, (r, i) in enumerate(zip(host.entry_run, host.entry_query)):
            if not run_queries[r]:
                run_first_entry[r] = e
            run_queries[r].append(i)
        self.num_kv_heads = num_kv_heads
        score_row = page_size * num_q_heads  # score elements per (query, page)
        members: list[list[int]] = []
        q_max = p_max = work = 0
        for r in sorted(range(num_runs), key=lambda r: (-len(run_queries[r]), -len(host.run_pages[r]))):
            nq, npg = len(run_queries[r]), len(host.run_pages[r])
            if members:
                padded = (len(members[-1]) + 1) * q_max * max(p_max, npg)
                unpadded = work + nq * npg
                if (padded <= _GROUP_PADDING * unpadded or (padded - unpadded) * score_row <= _GROUP_SLACK_ELEMS) \
                        and padded * score_row <= _SCORE_BUDGET:
                    members[-1].append(r)
                    p_max, work = max(p_max, npg), unpadded
                    continue
            members.append([r])
            q_max, p_max, work = nq, npg, nq * npg
        # row of the concatenated outputs holding (run, first query slot, kv head 0), and the
        # step between kv heads; entry e of run r sits at slot e - run_first_entry[r]
        run_row = [0] * num_runs
        run_head_stride = [0] * num_runs
        self.groups: list[_RunGroup] = []
        row0 = 0
        for runs in members:
            grp = _RunGroup(runs, host.run_pages, run_queries, page_size, device)
            for idx, r in enumerate(grp.run_ids):
                run_row[r] = row0 + idx * grp.num_queries - run_first_entry[r]
                run_head_stride[r] = grp.num_runs * grp.num_queries
            self.groups.append(grp)
            row0 += grp.num_runs * num_kv_heads * grp.num_queries
        self.num_rows = row0
        indptr = host.query_entry_indptr
        self.max_partials = max(b - a for a, b in zip(indptr[:-1], indptr[1:]))
        rows = []
        pad = [row0] * num_kv_heads
        heads = range(num_kv_heads)
        for a, b in zip(indptr[:-1], indptr[1:]):
            for e in host.entry_merge_order[a:b]:
                r = host.entry_run[e]
                base, stride = run_row[r] + e, run_head_stride[r]
                rows.extend([base + h * stride for h in heads])
            rows.extend(pad * (self.max_partials - (b - a)))
        self.merge_rows = torch.tensor(rows, dtype=torch.long).to(device)

    def key_biases(self, plan, dtype) -> list[torch.Tensor]:
        """Each group's [runs, 1, length] key mask for this plan's run lengths (once per plan)."""
        key = ("key_bias", id(self), dtype)
        biases = plan.reference_cache.get(key)
        if biases is None:
            lens = plan.run_lens.long()
            biases = [_key_bias(lens.index_select(0, g.runs), g.length, dtype) for g in self.groups]
            plan.reference_cache[key] = biases
        return biases


def _tree_ref_layout(plan, num_q_heads: int, num_kv_heads: int, page_size: int, device) -> _TreeRefLayout:
    """The reference's batching of a plan, built once per plan structure (a plan serves every
    layer of a step; `share_reference_layout` hands it to the next step's plan)."""
    key = ("layout", num_q_heads, num_kv_heads, page_size, str(device))
    layout = plan.reference_cache.get(key)
    if layout is None:
        layout = plan.reference_cache[key] = _TreeRefLayout(plan, num_q_heads, num_kv_heads, page_size, device)
    return layout


def share_reference_layout(old_plan, new_plan) -> None:
    """Let `new_plan` reuse `old_plan`'s reference layouts. Only valid when the two plans have the
    same runs (pages, queries, merge order) and differ at most in run lengths."""
    for key, value in old_plan.reference_cache.items():
        if key[0] == "layout":
            new_plan.reference_cache[key] = value
