"""Paged decode attention: one query per sequence over its cached pages.

The Triton kernel is GQA-packed: one program handles all query heads of a KV head (padded to at
least 16 rows, the smallest ``tl.dot`` tile) against one split of the sequence. Splits have a
fixed size (``DECODE_SPLIT_SIZE`` tokens), and the per-split partials are merged in split order,
so a sequence's output is bitwise the same whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks
from .reference import paged_decode_ref

DECODE_SPLIT_SIZE = 256  # tokens per split; fixed so results never depend on the batch
MAX_ROWS = 64  # query heads per program; larger GQA groups are split over programs


@dataclass(frozen=True)
class AttentionConfig:
    """Tile configuration of a decode-style attention launch (decode and tree)."""

    block_m: int        # rows of the query tile (stacked query heads)
    block_n: int        # KV tokens per tile
    block_d: int        # head_dim padded to a power of two
    heads_per_block: int  # query heads of one KV head handled by a program (per query)
    num_warps: int
    num_stages: int


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def attention_tiles(head_dim: int, group_size: int, dtype: torch.dtype, block_m: int) -> AttentionConfig:
    """Tiles for a decode-style launch with `block_m` query rows (shared by decode and tree)."""
    block_d = _pow2(head_dim)
    # fp32 tiles are twice the bytes: halve the KV tile when the accumulator is large.
    block_n = 32 if dtype == torch.float32 and block_m * block_d > 64 * 64 else 64
    return AttentionConfig(block_m, block_n, block_d, min(group_size, MAX_ROWS), num_warps=4, num_stages=2)


def decode_config(head_dim: int, group_size: int, dtype: torch.dtype) -> AttentionConfig:
    """The tile configuration the decode kernel uses for these shapes."""
    # Two row tiles only (16: the smallest tl.dot tile, any group up to 16; 64: larger groups)
    # keeps the set of compiled variants small.
    block_m = 16 if group_size <= 16 else MAX_ROWS
    return attention_tiles(head_dim, group_size, dtype, block_m)


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
