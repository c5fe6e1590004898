"""Random paged-KV problems and a naive float64 attention oracle for the kernel tests."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    k_cache: torch.Tensor        # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor
    pages: list[list[int]]       # pages of each sequence, in order
    seq_lens: list[int]
    num_q_heads: int
    scale: float

    def block_tables(self, extra_cols: int = 0) -> torch.Tensor:
        width = max(len(p) for p in self.pages) + extra_cols
        table = torch.zeros(len(self.pages), width, dtype=torch.int32)
        for i, p in enumerate(self.pages):
            table[i, : len(p)] = torch.tensor(p, dtype=torch.int32)
        return table


def random_lens(rng: random.Random, n: int, page_size: int, max_len: int) -> list[int]:
    """Ragged lengths that include 1, exact page multiples and their neighbours."""
    special = [1, page_size, 2 * page_size, page_size + 1, 2 * page_size - 1]
    out = []
    for i in range(n):
        if i < len(special) and rng.random() < 0.7:
            out.append(min(max_len, special[i]))
        else:
            out.append(rng.randint(1, max_len))
    rng.shuffle(out)
    return out


def make_problem(seed: int, seq_lens: list[int], page_size: int, num_kv_heads: int, group: int, head_dim: int,
                 dtype: torch.dtype, spare_pages: int = 3) -> PagedProblem:
    """Scattered pages (shuffled ids) filled with random K/V, one page list per sequence."""
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(counts) + spare_pages
    ids = torch.randperm(num_pages, generator=gen).tolist()
    pages, at = [], 0
    for c in counts:
        pages.append(ids[at: at + c])
        at += c
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return PagedProblem(k, v, pages, list(seq_lens), num_kv_heads * group, 1.0 / math.sqrt(head_dim))


def gather_tokens(cache: torch.Tensor, pages: list[int], n: int) -> torch.Tensor:
    """Tokens [0, n) stored in `pages`: [n, Hkv, D]."""
    page_size = cache.shape[1]
    idx = torch.arange(n)
    return cache[torch.tensor(pages, dtype=torch.long)[idx // page_size], idx % page_size]


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention of q [Hq, D] over k, v [L, Hkv, D]: returns out [Hq, D], lse [Hq]."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[0] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)  # [L, Hq, D]
    vv = v.repeat_interleave(group, dim=1)
    s = torch.einsum("hd,lhd->hl", q, kk) * scale
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hl,lhd->hd", p, vv), lse


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-6))
