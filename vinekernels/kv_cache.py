"""Paged KV cache writes: ``store_kv`` (new tokens through a slot mapping) and ``copy_pages``
(whole-page copies for copy-on-write forks)."""

from __future__ import annotations

import torch

from . import _checks
from .reference import copy_pages_ref, store_kv_ref


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, impl: str = "auto") -> None:
    """Write k, v [T, Hkv, D] into the caches at slot_mapping int64 [T] (page * page_size + offset;
    -1 skips the token). In place."""
    backend = _checks.resolve_impl(impl, k)
    _checks.check_tensor("k", k, 3, None, None)
    num_pages, page_size, num_kv_heads, head_dim = _checks.check_kv_caches(k_cache, v_cache, k.device, backend)
    _checks.check_tensor("v", v, 3, None, k.device)
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name} shape {tuple(t.shape)} must be [T, {num_kv_heads}, {head_dim}] to match the cache")
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match the cache dtype {k_cache.dtype}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    _checks.check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,), k.device)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} entries but k has {k.shape[0]} tokens")
    if k.shape[0] == 0:
        return
    if _checks.value_checks_enabled(slot_mapping):
        slots = slot_mapping.cpu()
        if int(slots.min()) < -1 or int(slots.max()) >= num_pages * page_size:
            raise ValueError(f"slot_mapping values must be -1 or in [0, {num_pages * page_size}), got "
                             f"[{int(slots.min())}, {int(slots.max())}]")
        real = slots[slots >= 0]
        if real.unique().numel() != real.numel():
            raise ValueError("slot_mapping writes the same slot twice")
    if backend == "torch":
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
        return
    from ._triton import launch

    launch.store_kv(k, v, k_cache, v_cache, slot_mapping)


def copy_pages(k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], src: torch.Tensor, dst: torch.Tensor,
               impl: str = "auto") -> None:
    """Copy whole pages src[i] -> dst[i] (int64 [N]) in every layer's K and V cache. In place."""
    if not isinstance(k_caches, (list, tuple)) or not isinstance(v_caches, (list, tuple)):
        raise ValueError("k_caches and v_caches must be lists of tensors (one per layer)")
    if len(k_caches) != len(v_caches) or len(k_caches) == 0:
        raise ValueError(f"need the same positive number of K and V caches, got {len(k_caches)} and {len(v_caches)}")
    backend = _checks.resolve_impl(impl, k_caches[0])
    device = k_caches[0].device
    shape = None
    for layer, (kc, vc) in enumerate(zip(k_caches, v_caches)):
        try:
            dims = _checks.check_kv_caches(kc, vc, device, backend)
        except ValueError as e:
            raise ValueError(f"layer {layer}: {e}") from None
        if shape is not None and dims[0] != shape[0]:
            raise ValueError(f"layer {layer} has {dims[0]} pages but layer 0 has {shape[0]}")
        shape = dims
    num_pages = shape[0]
    _checks.check_tensor("src", src, 1, (torch.int64,), device)
    _checks.check_tensor("dst", dst, 1, (torch.int64,), device)
    if src.shape != dst.shape:
        raise ValueError(f"src ({src.shape[0]}) and dst ({dst.shape[0]}) must have the same length")
    if src.shape[0] == 0:
        return
    if _checks.value_checks_enabled(src):
        s, d = src.cpu(), dst.cpu()
        for name, t in (("src", s), ("dst", d)):
            if int(t.min()) < 0 or int(t.max()) >= num_pages:
                raise ValueError(f"{name} pages must be in [0, {num_pages})")
        if d.unique().numel() != d.numel():
            raise ValueError("dst lists a page twice")
        if bool(torch.isin(d, s).any()):
            raise ValueError("a dst page is also a src page; copies would race")
    if backend == "torch":
        copy_pages_ref(k_caches, v_caches, src, dst)
        return
    from ._triton import launch

    launch.copy_pages(k_caches, v_caches, src, dst)
