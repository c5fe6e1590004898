"""Tile configurations of every Triton launch, in one place.

The public wrappers (decode, prefill, tree, kv_cache) and the launchers (``_triton.launch``) both
read them from here, so tests can enumerate exactly what a launch may compile, and imports run one
way: wrappers -> launchers -> configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_SPLIT_SIZE = 256  # tokens per decode split; fixed so results never depend on the batch
MAX_ROWS = 64  # query heads per decode program; larger GQA groups are split over programs
STORE_BLOCK = 1024  # elements of one K/V row block written by a store_kv program
COPY_BLOCK = 1024   # elements of one page block copied by a copy_pages program


@dataclass(frozen=True)
class AttentionConfig:
    """Tile configuration of a decode-style attention launch (decode and tree)."""

    block_m: int        # rows of the query tile (stacked query heads)
    block_n: int        # KV tokens per tile
    block_d: int        # head_dim padded to a power of two
    heads_per_block: int  # query heads of one KV head handled by a program (per query)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int    # query tokens per program
    block_n: int    # KV tokens per tile
    block_d: int    # head_dim padded to a power of two
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


def tree_config(head_dim: int, group_size: int, dtype: torch.dtype, shared: bool) -> AttentionConfig:
    """Tile configuration of the tree kernel: private runs use the decode tiles; shared runs stack
    the heads of several queries into 64-row tiles."""
    if not shared:
        return decode_config(head_dim, group_size, dtype)
    return attention_tiles(head_dim, group_size, dtype, MAX_ROWS)


def prefill_config(head_dim: int, dtype: torch.dtype) -> PrefillConfig:
    """The tile configuration the prefill kernel uses for these shapes."""
    block_d = 1 << (head_dim - 1).bit_length()
    if dtype == torch.float32:
        return PrefillConfig(32, 32, block_d, num_warps=4, num_stages=1)
    if block_d > 64:
        return PrefillConfig(64, 32, block_d, num_warps=4, num_stages=2)
    return PrefillConfig(64, 64, block_d, num_warps=4, num_stages=2)


def merge_config(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps) of the LSE-merge kernel: 4096 elements per program."""
    block_d = 1 << (head_dim - 1).bit_length()
    return max(1, 4096 // block_d), block_d, 4
