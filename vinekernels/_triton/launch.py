"""Launchers for the Triton kernels (inputs already validated by the public wrappers).

Tile choices come from ``vinekernels.configs`` (decode_config, tree_config, prefill_config,
merge_config, STORE_BLOCK, COPY_BLOCK) so tests can enumerate exactly what a launch may compile.
CUDA tensors use compiled kernels; CPU tensors use the Triton interpreter.
"""

from __future__ import annotations

import torch

from . import kernels_for
from ..configs import (COPY_BLOCK, DECODE_SPLIT_SIZE, STORE_BLOCK, decode_config, merge_config, prefill_config,
                       tree_config)
from ..reference import store_kv_ref

# Tests set this to fill every output and workspace with NaN before a launch, so an element a
# kernel fails to write cannot go unnoticed.
POISON_OUTPUTS = False

LOG2E = 1.4426950408889634


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _kernels(t: torch.Tensor):
    return kernels_for(interpret=not t.is_cuda)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are a correctness mode: keep full precision instead of TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_heads, head_dim = k.shape
    row = num_heads * head_dim
    packed = (k_cache.stride()[1:] == (row, head_dim, 1) and v_cache.stride()[1:] == (row, head_dim, 1))
    if not packed:  # cache rows are not contiguous: let torch scatter them
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    k = k if k.stride()[1:] == (head_dim, 1) else k.contiguous()
    v = v if v.stride()[1:] == (head_dim, 1) else v.contiguous()
    grid = (num_tokens, triton_cdiv(row, STORE_BLOCK))
    _kernels(k).store_kv_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1], row,
        k.stride(0), v.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        BLOCK=STORE_BLOCK,
    )


def copy_pages(k_caches, v_caches, src, dst) -> None:
    for kc, vc in zip(k_caches, v_caches):
        page_elems = kc.shape[1] * kc.shape[2] * kc.shape[3]
        packed = (kc.stride()[1:] == (kc.shape[2] * kc.shape[3], kc.shape[3], 1)
                  and vc.stride() == kc.stride())
        if not packed:  # pages are not contiguous blocks: let torch index them
            kc[dst] = kc[src]
            vc[dst] = vc[src]
            continue
        grid = (src.shape[0], triton_cdiv(page_elems, COPY_BLOCK))
        _kernels(kc).copy_pages_kernel[grid](kc, vc, src, dst, kc.stride(0), page_elems, BLOCK=COPY_BLOCK)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _merge(part_out, part_lse, out, out_lse, indptr=None, seq_lens=None, max_splits=0):
    """Launch the LSE merge; either indptr (CSR rows) or seq_lens (decode splits) selects rows."""
    num_out, num_heads, head_dim = out.shape
    if num_out == 0:
        return
    block_h, block_d, num_warps = merge_config(head_dim)
    dummy = indptr if indptr is not None else seq_lens
    write_lse = out_lse is not None
    lse_buf = out_lse if write_lse else part_lse
    _kernels(out).merge_kernel[(num_out, triton_cdiv(num_heads, block_h))](
        part_out, part_lse, dummy, dummy, out, lse_buf, num_heads, max_splits,
        head_dim, int(seq_lens is not None), DECODE_SPLIT_SIZE, int(write_lse),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), out.stride(0), out.stride(1),
        lse_buf.stride(0), BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
    )


def merge_lse(partial_out, partial_lse, indptr, out_dtype):
    partial_out = _last_dim_contiguous(partial_out)
    num_out = indptr.shape[0] - 1
    out = _new((num_out, partial_out.shape[1], partial_out.shape[2]), out_dtype, partial_out.device)
    lse = _new((num_out, partial_out.shape[1]), torch.float32, partial_out.device)
    _merge(partial_out, partial_lse, out, lse, indptr=indptr)
    return out, lse


def _launch_decode(q, k_cache, v_cache, part_out, part_lse, scale, cfg, grid, *, block_tables=None,
                   seq_lens=None, max_splits=0, items=None, plan=None, chunk=DECODE_SPLIT_SIZE):
    """Launch decode_kernel in direct mode (block_tables, seq_lens) or tree mode (items of a plan)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    head_blocks = triton_cdiv(group, cfg.heads_per_block)
    direct = plan is None
    ints = seq_lens if direct else items  # stands in for the pointers the other mode ignores
    _kernels(q).decode_kernel[grid](
        q, k_cache, v_cache, part_out, part_lse,
        block_tables if direct else ints, seq_lens if direct else ints, max_splits,
        ints if direct else items, ints if direct else plan.run_pages, ints if direct else plan.run_page_start,
        ints if direct else plan.run_lens, ints if direct else plan.entry_query,
        ints if direct else plan.entry_partial,
        int(direct), scale * LOG2E, page_size, head_dim, group, cfg.heads_per_block, head_blocks,
        cfg.block_m // cfg.heads_per_block,
        q.stride(0), q.stride(1), block_tables.stride(0) if direct else 0,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        part_out.stride(0), part_out.stride(1), part_lse.stride(0), chunk,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale):
    q = _last_dim_contiguous(q)
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = _new(q.shape, q.dtype, q.device)
    if num_seqs == 0:
        return out
    cfg = decode_config(head_dim, group, q.dtype)
    max_splits = triton_cdiv(block_tables.shape[1] * page_size, DECODE_SPLIT_SIZE)
    part_out = _new((num_seqs * max_splits, num_q_heads, head_dim), torch.float32, q.device)
    part_lse = _new((num_seqs * max_splits, num_q_heads), torch.float32, q.device)
    grid = (num_seqs, num_kv_heads * triton_cdiv(group, cfg.heads_per_block), max_splits)
    _launch_decode(q, k_cache, v_cache, part_out, part_lse, scale, cfg, grid,
                   block_tables=block_tables, seq_lens=seq_lens, max_splits=max_splits)
    _merge(part_out, part_lse, out, None, seq_lens=seq_lens, max_splits=max_splits)
    return out


def tree_decode(q, k_cache, v_cache, plan, scale):
    q = _last_dim_contiguous(q)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = _new(q.shape, q.dtype, q.device)
    part_out = _new((plan.num_partials, num_q_heads, head_dim), torch.float32, q.device)
    part_lse = _new((plan.num_partials, num_q_heads), torch.float32, q.device)
    for items, shared in ((plan.private_items, False), (plan.shared_items, True)):
        if items.shape[0] == 0:
            continue
        cfg = tree_config(head_dim, group, q.dtype, shared)
        queries_per_block = cfg.block_m // cfg.heads_per_block
        row_blocks = triton_cdiv(plan.max_item_queries, queries_per_block) if shared else 1
        grid = (items.shape[0], num_kv_heads * triton_cdiv(group, cfg.heads_per_block), row_blocks)
        _launch_decode(q, k_cache, v_cache, part_out, part_lse, scale, cfg, grid, items=items, plan=plan,
                       chunk=plan.shared_chunk_size if shared else plan.chunk_size)
    _merge(part_out, part_lse, out, None, indptr=plan.partial_indptr)
    return out


def paged_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale):
    q = _last_dim_contiguous(q)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    num_seqs = query_start_loc.shape[0] - 1
    out = _new(q.shape, q.dtype, q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    cfg = prefill_config(head_dim, q.dtype)
    grid = (num_tokens // cfg.block_m + num_seqs, num_q_heads)
    _kernels(q).prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out,
        scale * LOG2E, page_size, head_dim, num_q_heads // num_kv_heads, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
