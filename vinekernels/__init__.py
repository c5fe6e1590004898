"""vinekernels: paged-KV attention kernels (Triton) with pure-torch references.

Every op takes ``impl``: "auto" (Triton on CUDA tensors, else the torch reference), "triton" or
"torch". On CPU tensors, impl="triton" runs the kernels in the Triton interpreter.
"""

from .decode import paged_decode_attention
from .kv_cache import copy_pages, store_kv
from .prefill import paged_prefill_attention
from .sampling import sample_tokens
from .tree import (TreePlan, grow_tree_plan, merge_lse, plan_tree_decode, tree_decode_attention,
                   tree_plan_tails)

__all__ = [
    "store_kv",
    "paged_prefill_attention",
    "paged_decode_attention",
    "TreePlan",
    "plan_tree_decode",
    "grow_tree_plan",
    "tree_plan_tails",
    "tree_decode_attention",
    "merge_lse",
    "copy_pages",
    "sample_tokens",
]
