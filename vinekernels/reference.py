"""Pure-torch references for every vinekernels op; also the CPU execution path.

All attention math runs in float32 (float64 when the inputs are float64) on K/V gathered through
the page tables into padded tensors, with GQA handled by viewing the query heads as
[num_kv_heads, group_size]. Work is chunked so the score tensor stays bounded in memory; nothing
loops over tokens in Python. Inputs are assumed validated by the public wrappers.
"""

from __future__ import annotations

import torch

# Upper bound on elements of one score tensor; larger problems are processed in chunks.
_SCORE_BUDGET = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gather_kv(cache: torch.Tensor, page_table: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather tokens [0, max_len) of each row's pages: [N, max_pages] -> [N, max_len, Hkv, D]."""
    page_size = cache.shape[1]
    n_pages = (max_len + page_size - 1) // page_size
    pages = page_table[:, :n_pages].long()
    kv = cache[pages]  # [N, n_pages, page_size, Hkv, D]
    return kv.reshape(pages.shape[0], n_pages * page_size, *cache.shape[2:])[:, :max_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float):
    """Masked softmax attention with log-sum-exp.

    q: [N, M, Hkv, G, D]; k, v: [N, L, Hkv, D]; keep: bool [N, M, L] (True = attend).
    Returns out [N, M, Hkv, G, D] and lse [N, M, Hkv, G] (natural log of the scaled scores);
    rows that attend to nothing get out = 0 and lse = -inf.
    """
    s = torch.einsum("nmhgd,nlhd->nhgml", q, k) * scale
    s = s.masked_fill(~keep[:, None, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [N, Hkv, G, M]
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    out = torch.einsum("nhgml,nlhd->nmhgd", p, v)
    return out, lse.permute(0, 3, 1, 2)


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, scale: float):
    """Same as _attend without the lse, through torch's fused SDPA (faster on CPU).

    q: [N, M, Hq, D]; k, v: [N, L, Hkv, D]; keep: [N, M, L], every row keeping >= 1 token.
    """
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep[:, None], scale=scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _rows_per_chunk(per_row: int) -> int:
    return max(1, _SCORE_BUDGET // max(1, per_row))


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    page_size = k_cache.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    k_cache[pages, offsets] = k[keep].to(k_cache.dtype)
    v_cache[pages, offsets] = v[keep].to(v_cache.dtype)


def copy_pages_ref(k_caches, v_caches, src, dst) -> None:
    src, dst = src.long(), dst.long()
    for cache in list(k_caches) + list(v_caches):
        cache[dst] = cache[src]


def paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, return_lse: bool = False):
    """One query per sequence: q [B, Hq, D] -> out [B, Hq, D] (and lse [B, Hq] float32/64)."""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    lse_all = torch.empty(num_seqs, num_q_heads, dtype=cdt, device=q.device)
    if num_seqs == 0:
        return (out, lse_all) if return_lse else out
    lens = seq_lens.long()
    max_len = int(lens.max())
    step = _rows_per_chunk(max_len * num_q_heads)
    for s0 in range(0, num_seqs, step):
        sl = slice(s0, min(num_seqs, s0 + step))
        chunk_max = int(lens[sl].max())
        k = gather_kv(k_cache, block_tables[sl], chunk_max).to(cdt)
        v = gather_kv(v_cache, block_tables[sl], chunk_max).to(cdt)
        keep = (torch.arange(chunk_max, device=q.device)[None, :] < lens[sl, None])[:, None, :]
        if not return_lse:
            out[sl] = _attend_sdpa(q[sl, None].to(cdt), k, v, keep, scale)[:, 0].to(q.dtype)
            continue
        qs = q[sl].to(cdt).view(-1, 1, num_kv_heads, group, head_dim)
        o, lse = _attend(qs, k, v, keep, scale)
        out[sl] = o.reshape(-1, num_q_heads, head_dim).to(q.dtype)
        lse_all[sl] = lse.reshape(-1, num_q_heads)
    return (out, lse_all) if return_lse else out


def paged_prefill_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
    """Varlen causal attention of new tokens over cached pages: q [T, Hq, D] -> [T, Hq, D]."""
    num_tokens, num_q_heads = q.shape[0], q.shape[1]
    cdt = _compute_dtype(q.dtype)
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    starts = query_start_loc[:-1].long()
    q_lens = query_start_loc[1:].long() - starts
    lens = seq_lens.long()
    for b0, b1 in _seq_chunks(q_lens.tolist(), lens.tolist(), num_q_heads):
        sl = slice(b0, b1)
        max_q, max_len = int(q_lens[sl].max()), int(lens[sl].max())
        if max_q == 0:
            continue
        j = torch.arange(max_q, device=q.device)
        valid = j[None, :] < q_lens[sl, None]  # [b, max_q]
        tok = (starts[sl, None] + j[None, :]).clamp(max=num_tokens - 1)
        pos = (lens[sl] - q_lens[sl])[:, None] + j[None, :]  # absolute position of each new token
        keep = torch.arange(max_len, device=q.device)[None, None, :] <= pos[:, :, None]
        k = gather_kv(k_cache, block_tables[sl], max_len).to(cdt)
        v = gather_kv(v_cache, block_tables[sl], max_len).to(cdt)
        o = _attend_sdpa(q[tok].to(cdt), k, v, keep, scale)
        out[tok[valid]] = o[valid].to(q.dtype)
    return out


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
    """Prefix-shared decode: per-(run, query) partials over the plan's runs, merged per query."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    cdt = _compute_dtype(q.dtype)
    entry_run, entry_query, table, lens, order, indptr = _tree_ref_tensors(plan, q.device)
    if plan.reference_cache["one_run_per_query"] and not return_lse:
        # nothing to merge: each query is plain paged decode over its single run
        runs = entry_run[order]
        return paged_decode_ref(q, k_cache, v_cache, table[runs], lens[runs], scale)
    num_entries = entry_run.shape[0]
    part_out = torch.empty(num_entries, num_q_heads, head_dim, dtype=cdt, device=q.device)
    part_lse = torch.empty(num_entries, num_q_heads, dtype=cdt, device=q.device)
    shared = plan.host.run_shared
    run_entries = plan.reference_cache["run_entries"]
    # shared runs: gather the run once, attend with all its queries stacked as rows
    for r in (r for r in range(len(shared)) if shared[r]):
        e0, e1 = run_entries[r], run_entries[r + 1]
        n = int(lens[r])
        k = gather_kv(k_cache, table[r: r + 1], n).to(cdt)
        v = gather_kv(v_cache, table[r: r + 1], n).to(cdt)
        qs = q[entry_query[e0:e1]].to(cdt).view(1, e1 - e0, num_kv_heads, group, head_dim)
        keep = torch.ones(1, e1 - e0, n, dtype=torch.bool, device=q.device)
        o, lse = _attend(qs, k, v, keep, scale)
        part_out[e0:e1] = o.reshape(-1, num_q_heads, head_dim)
        part_lse[e0:e1] = lse.reshape(-1, num_q_heads)
    # private runs (one query each): batched like plain decode
    private = plan.reference_cache["private_entries"]
    if private.numel():
        max_run = int(lens[entry_run[private]].max())
        step = _rows_per_chunk(max_run * num_q_heads)
        for c0 in range(0, private.numel(), step):
            ents = private[c0: c0 + step]
            runs = entry_run[ents]
            chunk_max = int(lens[runs].max())
            k = gather_kv(k_cache, table[runs], chunk_max).to(cdt)
            v = gather_kv(v_cache, table[runs], chunk_max).to(cdt)
            keep = (torch.arange(chunk_max, device=q.device)[None, :] < lens[runs, None])[:, None, :]
            qs = q[entry_query[ents]].to(cdt).view(-1, 1, num_kv_heads, group, head_dim)
            o, lse = _attend(qs, k, v, keep, scale)
            part_out[ents] = o.reshape(-1, num_q_heads, head_dim)
            part_lse[ents] = lse.reshape(-1, num_q_heads)
    # Entries are grouped by run; the merge wants each query's partials contiguous, in the order
    # of its segments, which is the (query, position) order recorded by the plan.
    out, lse = merge_lse_ref(part_out[order], part_lse[order], indptr, out_dtype=q.dtype)
    return (out, lse) if return_lse else out


def _tree_ref_tensors(plan, device):
    """Index tensors of a plan for the reference, built once per plan (a plan serves every layer)."""
    cache = plan.reference_cache
    if "tensors" not in cache:
        host = plan.host
        max_pages = max((len(p) for p in host.run_pages), default=1)
        table = torch.zeros(len(host.run_lens), max_pages, dtype=torch.long)
        for r, pages in enumerate(host.run_pages):
            table[r, : len(pages)] = torch.tensor(pages, dtype=torch.long)

        def t(x):
            return torch.tensor(x, dtype=torch.long, device=device)

        run_entries = [0] * (len(host.run_lens) + 1)
        for r in host.entry_run:
            run_entries[r + 1] += 1
        for r in range(len(host.run_lens)):
            run_entries[r + 1] += run_entries[r]
        cache["run_entries"] = run_entries
        cache["one_run_per_query"] = len(host.entry_run) == len(host.query_entry_indptr) - 1
        cache["private_entries"] = t([e for e, r in enumerate(host.entry_run) if not host.run_shared[r]])
        cache["tensors"] = (t(host.entry_run), t(host.entry_query), table.to(device), t(host.run_lens),
                            t(host.entry_merge_order), t(host.query_entry_indptr))
    return cache["tensors"]
