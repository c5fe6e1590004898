"""Paged decode attention: one query per sequence over its cached pages.

The Triton kernel is GQA-packed: one program handles all query heads of a KV head (padded to at
least 16 rows, the smallest ``tl.dot`` tile) against one split of the sequence. Splits have a
fixed size (``configs.DECODE_SPLIT_SIZE`` tokens), and the per-split partials are merged in split order,
so a sequence's output is bitwise the same whatever else is in the batch.
"""

from __future__ import annotations

import torch

from . import _checks
from .reference import paged_decode_ref


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           impl: str = "auto") -> torch.Tensor:
    """Attention of q [B, Hq, D] (one new token per sequence, already stored) over its pages.

    block_tables int32 [B, max_pages], seq_lens int32 [B] (>= 1). Returns [B, Hq, D] in q.dtype.
    """
    backend = _checks.resolve_impl(impl, q)
    _checks.check_tensor("q", q, 3, None, None)
    num_pages, page_size, _, _ = _checks.check_kv_caches(k_cache, v_cache, q.device, backend)
    _checks.check_query(q, k_cache)
    scale = _checks.check_scale(scale)
    _checks.check_block_tables(block_tables, seq_lens, q.shape[0], num_pages, page_size, q.device)
    if backend == "torch":
        return paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    from ._triton import launch

    return launch.paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
