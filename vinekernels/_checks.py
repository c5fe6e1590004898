"""Input validation shared by the vinekernels wrappers.

Shape, dtype and device checks are free and always run. Checks that read tensor *values*
(page-table bounds, slot ranges, lengths) need the data on the host: they always run for CPU
tensors, and for CUDA tensors only when ``VINEKERNELS_DEBUG=1`` (and never during CUDA graph
capture), because a device-to-host sync per layer per step would cost more than the kernel.
The Triton kernels never read a page past ``seq_len``, so padding in block tables is harmless.
"""

from __future__ import annotations

import os

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
TRITON_HEAD_DIMS = (64, 80, 96, 128)
TRITON_PAGE_SIZES = (8, 64)  # inclusive range
IMPLS = ("auto", "triton", "torch")


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose main input is ``tensor``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if tensor.is_cuda else "torch"
    return impl


def value_checks_enabled(tensor: torch.Tensor) -> bool:
    """Whether checks that read tensor values should run for tensors on this device."""
    if not tensor.is_cuda:
        return True
    if os.environ.get("VINEKERNELS_DEBUG", "0") != "1":
        return False
    return not torch.cuda.is_current_stream_capturing()


def check_tensor(name: str, t, ndim: int | None = None, dtypes=None, device=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")


def check_kv_caches(k_cache, v_cache, device, impl: str) -> tuple[int, int, int, int]:
    """Validate a (K, V) cache pair; return (num_pages, page_size, num_kv_heads, head_dim)."""
    dtypes = KERNEL_DTYPES if impl == "triton" else REFERENCE_DTYPES
    check_tensor("k_cache", k_cache, 4, dtypes, device)
    check_tensor("v_cache", v_cache, 4, dtypes, device)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same shape")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must have the same dtype")
    num_pages, page_size, num_kv_heads, head_dim = k_cache.shape
    if num_pages < 1 or page_size < 1 or num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"KV cache shape must be positive, got {tuple(k_cache.shape)}")
    if impl == "triton":
        lo, hi = TRITON_PAGE_SIZES
        if not lo <= page_size <= hi:
            raise ValueError(f"page_size must be in [{lo}, {hi}] for the Triton kernels, got {page_size}")
        if head_dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {TRITON_HEAD_DIMS} for the Triton kernels, got {head_dim}")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if c.stride(-1) != 1:
                raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    return num_pages, page_size, num_kv_heads, head_dim


def check_query(q, k_cache, name: str = "q") -> tuple[int, int]:
    """Check q [N, Hq, D] against the cache; return (num_q_heads, group_size)."""
    check_tensor(name, q, 3, None, k_cache.device)
    if q.dtype != k_cache.dtype:
        raise ValueError(f"{name} dtype {q.dtype} must match the KV cache dtype {k_cache.dtype}")
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if q.shape[2] != head_dim:
        raise ValueError(f"{name} head_dim {q.shape[2]} does not match the KV cache head_dim {head_dim}")
    num_q_heads = q.shape[1]
    if num_q_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"number of query heads ({num_q_heads}) must be a positive multiple of the number of KV heads ({num_kv_heads})"
        )
    return num_q_heads, num_q_heads // num_kv_heads


def check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a python float, got {type(scale).__name__}")
    scale = float(scale)
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return scale


def check_block_tables(block_tables, seq_lens, num_seqs: int, num_pages: int, page_size: int, device,
                       min_len: int = 1) -> None:
    """Validate block tables [num_seqs, max_pages] and seq_lens [num_seqs] (both int32)."""
    check_tensor("block_tables", block_tables, 2, (torch.int32,), device)
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected {num_seqs} (one per sequence)")
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(f"seq_lens has {seq_lens.shape[0]} entries, expected {num_seqs} (one per sequence)")
    if num_seqs == 0 or not value_checks_enabled(seq_lens):
        return
    max_pages = block_tables.shape[1]
    lens = seq_lens.to("cpu", torch.int64)
    if int(lens.min()) < min_len:
        raise ValueError(f"seq_lens must be >= {min_len}, got min {int(lens.min())}")
    capacity = max_pages * page_size
    if int(lens.max()) > capacity:
        raise ValueError(
            f"seq_lens max {int(lens.max())} exceeds what block_tables can address ({max_pages} pages x {page_size})"
        )
    used = (lens + page_size - 1) // page_size
    table = block_tables.to("cpu", torch.int64)
    in_use = torch.arange(max_pages)[None, :] < used[:, None]
    pages = table[in_use]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= num_pages):
        raise ValueError(f"block_tables reference pages outside [0, {num_pages}) within seq_lens")
