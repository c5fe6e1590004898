"""Dtype names: the one place a setting such as "bfloat16", "bf16" or "auto" becomes a torch.dtype
(the engine, the model loaders and the trainer all use it)."""

from __future__ import annotations

import torch

_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def resolve_dtype(dtype) -> torch.dtype | None:
    """None or "auto" -> None (keep the model's own); a torch.dtype as it is; a floating-point
    name ("bfloat16", "bf16", "torch.float32", ...) -> its torch.dtype; ValueError otherwise."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    resolved = getattr(torch, _ALIASES.get(name, name), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'bfloat16', 'float16', 'float32'")
    return resolved
