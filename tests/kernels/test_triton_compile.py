"""Every Triton kernel, in every configuration its launcher can choose, compiles for sm_80 and
sm_90 (Triton ships ptxas, so no GPU is needed), and attention kernels use tensor cores.

The configurations are enumerated from the same config functions the launchers call, over all
supported dtypes, head dims and GQA group sizes, then deduplicated by what reaches the compiler.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

from vinekernels._checks import KERNEL_DTYPES, TRITON_HEAD_DIMS  # noqa: E402
from vinekernels._triton import kernels_for, launch  # noqa: E402
from vinekernels.configs import decode_config, merge_config, prefill_config, tree_config  # noqa: E402

TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
GROUP_SIZES = range(1, 129)
TARGETS = {"sm80": GPUTarget("cuda", 80, 32), "sm90": GPUTarget("cuda", 90, 32)}

# Pointer arguments and their element type: "kv" = the cache / activation dtype.
POINTERS = {
    "q_ptr": "kv", "k_cache": "kv", "v_cache": "kv", "k_ptr": "kv", "v_ptr": "kv", "out_ptr": "kv",
    "block_tables": "i32", "seq_lens": "i32", "query_start_loc": "i32", "indptr": "i32", "items": "i32",
    "run_pages": "i32", "run_page_start": "i32", "run_lens": "i32", "entry_query": "i32", "entry_partial": "i32",
    "slot_ptr": "i64", "src_ptr": "i64", "dst_ptr": "i64",
    "part_out": "fp32", "part_lse": "fp32", "out_lse": "fp32",
}
FLOAT_SCALARS = {"qk_scale"}
# Integer arguments the JIT sees as multiples of 16 in practice (it specialises on that at launch),
# which is what lets it vectorise K/V loads; the compile test assumes the same.
ALIGNED_INTS = {"head_dim", "row_elems", "page_elems", "page_stride"}


def _attrs(fn, constexprs):
    """Divisibility hints the launcher's arguments carry: 16-byte aligned pointers, strides and
    head_dim multiples of 16."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if name in POINTERS or name in ALIGNED_INTS or (name.startswith("stride_") and not name.endswith("_bt")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _signature(fn, dtype, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in POINTERS:
            kind = POINTERS[name]
            sig[name] = "*" + (TY[dtype] if kind == "kv" else kind)
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _attention_constexprs(cfg, dtype):
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                DOT_PRECISION=launch._dot_precision(dtype))


def enumerate_configs():
    """(kernel name, dtype, constexprs, num_warps, num_stages, uses tl.dot), deduplicated."""
    seen = {}

    def add(name, dtype, constexprs, warps, stages):
        seen.setdefault((name, dtype, tuple(sorted(constexprs.items())), warps, stages), True)

    for dtype in KERNEL_DTYPES:
        for head_dim in TRITON_HEAD_DIMS:
            for group in GROUP_SIZES:
                for cfg in (decode_config(head_dim, group, dtype), tree_config(head_dim, group, dtype, True),
                            tree_config(head_dim, group, dtype, False)):
                    add("decode_kernel", dtype, _attention_constexprs(cfg, dtype), cfg.num_warps, cfg.num_stages)
            cfg = prefill_config(head_dim, dtype)
            add("prefill_kernel", dtype, _attention_constexprs(cfg, dtype), cfg.num_warps, cfg.num_stages)
            block_h, block_d, warps = merge_config(head_dim)
            add("merge_kernel", dtype, dict(BLOCK_H=block_h, BLOCK_D=block_d), warps, 1)
        add("store_kv_kernel", dtype, dict(BLOCK=launch.STORE_BLOCK), 4, 1)
        add("copy_pages_kernel", dtype, dict(BLOCK=launch.COPY_BLOCK), 4, 1)
    return [(name, dtype, dict(c), w, s, name in ("decode_kernel", "prefill_kernel"))
            for (name, dtype, c, w, s) in seen]


CONFIGS = enumerate_configs()


def _compile(name, dtype, constexprs, num_warps, num_stages, target):
    fn = getattr(kernels_for(interpret=False), name)
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs,
                                    attrs=_attrs(fn, constexprs))
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def test_enumeration_covers_every_kernel():
    kernels = kernels_for(interpret=False)
    launched = {n for n in dir(kernels) if n.endswith("_kernel")}
    assert {c[0] for c in CONFIGS} == launched
    assert len(CONFIGS) <= 40, "config space grew: keep the compile test affordable"


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("kernel", sorted({c[0] for c in CONFIGS}))
def test_kernels_compile(kernel, target):
    configs = [c for c in CONFIGS if c[0] == kernel]
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    def one(config):
        name, dtype, constexprs, warps, stages, uses_dot = config
        compiled = _compile(name, dtype, constexprs, warps, stages, TARGETS[target])
        ptx = compiled.asm["ptx"]
        if uses_dot and dtype != torch.float32:
            # tensor cores: wgmma on sm_90 when the tile allows it, mma.sync otherwise
            assert re.search(r"\b(wgmma|mma)\.", ptx), f"{name} {dtype} {constexprs} on {target}: no tensor-core op"
        return compiled

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(one, configs))
    assert all("cubin" in r.asm for r in results)
