"""Paged prefill / extend attention over variable-length sequences.

The new tokens of B sequences are concatenated in q [T, Hq, D]. Sequence b owns tokens
query_start_loc[b] .. query_start_loc[b+1]-1; its new tokens are the last q_len_b of its
seq_lens[b] tokens, so new token j sits at position seq_lens[b] - q_len_b + j and attends to the
cached context plus, causally, the new tokens up to itself. All K/V (cached and new) are read
from the paged cache, so ``store_kv`` must run first.
"""

from __future__ import annotations

import torch

from . import _checks
from .reference import paged_prefill_ref


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                            seq_lens: torch.Tensor, scale: float, impl: str = "auto") -> torch.Tensor:
    """Causal attention of new tokens q [T, Hq, D] over cached context + themselves; returns [T, Hq, D]."""
    backend = _checks.resolve_impl(impl, q)
    _checks.check_tensor("q", q, 3, None, None)
    num_pages, page_size, _, _ = _checks.check_kv_caches(k_cache, v_cache, q.device, backend)
    _checks.check_query(q, k_cache)
    scale = _checks.check_scale(scale)
    _checks.check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,), q.device)
    num_seqs = query_start_loc.shape[0] - 1
    if num_seqs < 0:
        raise ValueError("query_start_loc must have B + 1 entries")
    _checks.check_block_tables(block_tables, seq_lens, num_seqs, num_pages, page_size, q.device, min_len=0)
    if _checks.value_checks_enabled(query_start_loc):
        loc = query_start_loc.to("cpu", torch.int64)
        q_lens = loc[1:] - loc[:-1]
        if int(loc[0]) != 0 or int(loc[-1]) != q.shape[0]:
            raise ValueError(f"query_start_loc must start at 0 and end at T={q.shape[0]}, got "
                             f"{int(loc[0])} .. {int(loc[-1])}")
        if bool((q_lens < 0).any()):
            raise ValueError("query_start_loc must be non-decreasing")
        if bool((q_lens > seq_lens.to("cpu", torch.int64)).any()):
            raise ValueError("a sequence has more new tokens (query_start_loc) than seq_lens")
    if backend == "torch":
        return paged_prefill_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
    from ._triton import launch

    return launch.paged_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
