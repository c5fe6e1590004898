"""Triton kernels of vinekernels. Launched from launch.py; loaded by _triton.kernels_for().

Conventions: caches are [num_pages, page_size, Hkv, D] with a unit stride on D; page ids are
widened to int64 before multiplying by a stride (caches can exceed 2**31 elements). Softmax runs
in base 2 (scores pre-multiplied by scale * log2(e)); every lse written to memory is a natural
log, so partials from any kernel can be merged together. Accumulation is always fp32.

The kernels call no @triton.jit function of triton.language (tl.max, tl.sum, tl.zeros, tl.cdiv):
those are compiled or interpreted depending on how triton itself was first imported, which would
tie this module to that choice. Reductions go through tl.reduce with triton's own combine
functions instead, which both the compiler and the interpreter's fast paths recognise.
"""

import triton
import triton.language as tl
from triton.language.standard import _elementwise_max, _sum_combine

LOG2E = 1.4426950408889634  # host-side: scores are scaled by scale * LOG2E before exp2


@triton.jit
def store_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slot_ptr, page_size, row_elems,
                    stride_kt, stride_vt, stride_kcp, stride_kcs, stride_vcp, stride_vcs,
                    BLOCK: tl.constexpr):
    """One program per (token, BLOCK elements of its [Hkv, D] row); rows are contiguous."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        page = slot // page_size
        offset = slot % page_size
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < row_elems
        t64 = t.to(tl.int64)
        k = tl.load(k_ptr + t64 * stride_kt + offs, mask=mask)
        v = tl.load(v_ptr + t64 * stride_vt + offs, mask=mask)
        tl.store(k_cache + page * stride_kcp + offset * stride_kcs + offs, k, mask=mask)
        tl.store(v_cache + page * stride_vcp + offset * stride_vcs + offs, v, mask=mask)


@triton.jit
def copy_pages_kernel(k_cache, v_cache, src_ptr, dst_ptr, page_stride, page_elems, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    part = tl.program_id(1)
    src = tl.load(src_ptr + i)
    dst = tl.load(dst_ptr + i)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    k = tl.load(k_cache + src * page_stride + offs, mask=mask)
    tl.store(k_cache + dst * page_stride + offs, k, mask=mask)
    v = tl.load(v_cache + src * page_stride + offs, mask=mask)
    tl.store(v_cache + dst * page_stride + offs, v, mask=mask)


@triton.jit
def _attend_range(q, k_cache, v_cache, pages_ptr, start, end, page_size, kv_head, head_dim,
                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Online softmax of the query tile q [BLOCK_M, BLOCK_D] over tokens [start, end) of a page list.

    Requires start < end. Returns the unnormalised accumulator, the running max (base 2) and sum.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for tok0 in range(start, end, BLOCK_N):
        tok = tok0 + offs_n
        tok_ok = tok < end
        page = tl.load(pages_ptr + tok // page_size, mask=tok_ok, other=0).to(tl.int64)
        slot = tok % page_size
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache + (page * stride_kp + slot * stride_ks + kv_head * stride_kh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _elementwise_max))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.reduce(p, 1, _sum_combine)
        v = tl.load(v_cache + (page * stride_vp + slot * stride_vs + kv_head * stride_vh)[:, None] + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return acc, m, l


@triton.jit
def decode_kernel(q_ptr, k_cache, v_cache, part_out, part_lse,
                  block_tables, seq_lens, max_splits,
                  items, run_pages, run_page_start, run_lens, entry_query, entry_partial,
                  direct, qk_scale, page_size, head_dim, group, heads_per_block, head_blocks, queries_per_block,
                  stride_qb, stride_qh, stride_bt, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                  stride_pn, stride_ph, stride_ln, chunk,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """Decode attention partials; one program per (work unit, KV head x head block, row block).

    direct != 0 (plain paged decode): the work unit is (sequence b = program 0, split = program 2)
    over block_tables[b]; partial slot b * max_splits + split.
    direct == 0 (tree decode): the work unit is items[program 0] = (run, chunk start, first entry,
    num entries): one chunk of one run for up to `num entries` of the run's queries, whose heads
    of this KV head are stacked as the rows of the tile, so each K/V tile is loaded once for all
    of them. Partial slot entry_partial[entry] + chunk index.
    Both modes share every line of the attention math, so a private run gives exactly the same
    bits as plain decode of the same tokens.
    """
    kv_head = tl.program_id(1) // head_blocks
    hb = tl.program_id(1) % head_blocks
    rows = tl.arange(0, BLOCK_M)
    g = hb * heads_per_block + rows % heads_per_block
    head = kv_head * group + g
    unit = tl.program_id(0)
    # variables assigned in both branches (Triton only keeps those after an if)
    if direct != 0:
        start = tl.program_id(2) * chunk
        run_len = tl.load(seq_lens + unit)
        num_entries = (start < run_len).to(tl.int32)
        entry0 = unit * 0
        first_query = unit * 0
        pages = block_tables + unit.to(tl.int64) * stride_bt
    else:
        run = tl.load(items + unit * 4)
        start = tl.load(items + unit * 4 + 1)
        entry0 = tl.load(items + unit * 4 + 2)
        num_entries = tl.load(items + unit * 4 + 3)
        first_query = tl.program_id(2) * queries_per_block
        run_len = tl.load(run_lens + run)
        pages = run_pages + tl.load(run_page_start + run)
    if first_query < num_entries:
        end = tl.minimum(run_len, start + chunk)
        local = first_query + rows // heads_per_block
        row_ok = (rows < queries_per_block * heads_per_block) & (local < num_entries) & (g < group)
        if direct != 0:
            query = tl.full([BLOCK_M], 0, tl.int64) + unit
            slot = tl.full([BLOCK_M], 0, tl.int64) + unit.to(tl.int64) * max_splits + tl.program_id(2)
        else:
            entry = entry0 + local
            query = tl.load(entry_query + entry, mask=row_ok, other=0).to(tl.int64)
            slot = (tl.load(entry_partial + entry, mask=row_ok, other=0) + start // chunk).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
        q = tl.load(q_ptr + query[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                    mask=mask, other=0.0)
        acc, m, l = _attend_range(q, k_cache, v_cache, pages, start, end, page_size, kv_head, head_dim,
                                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                  qk_scale, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PRECISION)
        tl.store(part_out + slot[:, None] * stride_pn + head[:, None] * stride_ph + offs_d[None, :],
                 acc / l[:, None], mask=mask)
        tl.store(part_lse + slot * stride_ln + head, (m + tl.log2(l)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def merge_kernel(part_out, part_lse, indptr, seq_lens, out_ptr, out_lse, num_heads, max_splits,
                 head_dim, from_seq_lens, split, write_lse,
                 stride_pn, stride_ph, stride_ln, stride_ob, stride_oh, stride_lb,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge output b's partials, in order, for a block of heads.

    from_seq_lens != 0: partials are rows b * max_splits + [0, cdiv(seq_len, split)) (decode);
    otherwise rows indptr[b] .. indptr[b+1] - 1. Modes are runtime flags (one compile serves all).
    """
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = heads < num_heads
    mask = h_ok[:, None] & (offs_d[None, :] < head_dim)
    if from_seq_lens != 0:
        first = b * max_splits
        last = first + (tl.load(seq_lens + b) + split - 1) // split
    else:
        first = tl.load(indptr + b)
        last = tl.load(indptr + b + 1)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, tl.float32)
    lse_ptr = part_lse + first.to(tl.int64) * stride_ln + heads
    o_ptr = part_out + first.to(tl.int64) * stride_pn + heads[:, None] * stride_ph + offs_d[None, :]
    for _ in range(first, last):
        lse = tl.load(lse_ptr, mask=h_ok, other=float("-inf"))
        o = tl.load(o_ptr, mask=mask, other=0.0)
        lse_ptr += stride_ln
        o_ptr += stride_pn
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o.to(tl.float32)
        total = total * alpha + w
        m = m_new
    has = total > 0
    denom = tl.where(has, total, 1.0)
    result = tl.where(has[:, None], acc / denom[:, None], 0.0)
    b64 = b.to(tl.int64)
    tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             result.to(out_ptr.dtype.element_ty), mask=mask)
    if write_lse != 0:
        m_out = tl.where(m == float("-inf"), 0.0, m)
        tl.store(out_lse + b64 * stride_lb + heads, tl.where(has, m_out + tl.log(denom), float("-inf")), mask=h_ok)


@triton.jit
def prefill_kernel(q_ptr, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out_ptr,
                   qk_scale, page_size, head_dim, group, num_seqs,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """One program per (block of BLOCK_M new tokens of one sequence, query head).

    Sequence b's blocks are programs query_start_loc[b] // BLOCK_M + b + [0, cdiv(q_len, BLOCK_M)):
    these ranges never overlap and all fit in T // BLOCK_M + B programs, so the grid needs no
    host-side lengths; each program finds its sequence by binary search.
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_loc + mid) // BLOCK_M + mid <= pid:
            lo = mid
        else:
            hi = mid - 1
    b = lo
    q_start = tl.load(query_start_loc + b)
    q_len = tl.load(query_start_loc + b + 1) - q_start
    block = pid - (q_start // BLOCK_M + b)
    if block * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens + b)
        context = seq_len - q_len
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        pos = context + rows
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        tok_rows = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tok_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        pages_ptr = block_tables + b.to(tl.int64) * stride_bt
        end = tl.minimum(seq_len, context + (block + 1) * BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.full([BLOCK_M], 0.0, tl.float32)
        acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
        for tok0 in range(0, end, BLOCK_N):
            tok = tok0 + offs_n
            tok_ok = tok < end
            page = tl.load(pages_ptr + tok // page_size, mask=tok_ok, other=0).to(tl.int64)
            slot = tok % page_size
            kv_mask = tok_ok[:, None] & d_ok[None, :]
            k = tl.load(k_cache + (page * stride_kp + slot * stride_ks + kv_head * stride_kh)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(tok_ok[None, :] & (tok[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.reduce(s, 1, _elementwise_max))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.reduce(p, 1, _sum_combine)
            v = tl.load(v_cache + (page * stride_vp + slot * stride_vs + kv_head * stride_vh)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + tok_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
