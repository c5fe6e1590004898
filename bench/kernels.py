"""Decode-attention benchmark: K branches sharing a P-token prefix, each with S own tokens.

Rows per configuration: tree (prefix-shared) decode, plain paged decode, torch SDPA on the
gathered (dense, per-branch) KV, and flash-attn's flash_attn_with_kvcache when installed. Each
row reports time per call, the bytes that method reads, the achieved bandwidth, and the floor:
the unique KV bytes (P + K*S tokens) divided by the device copy bandwidth measured here.

    python bench/kernels.py                       # full sweep on the GPU
    python bench/kernels.py --json results.json   # also write JSON (device, date, rows)
    python bench/kernels.py --device cpu --quick  # seconds, torch reference path
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vinekernels as vk  # noqa: E402

SHAPES = {  # name: (query heads, KV heads, head dim)
    "tinyllama-1.1b": (32, 4, 64),
    "deepseekmath-7b": (32, 32, 128),
}
PAGE_SIZE = 16


@dataclass
class Row:
    shape: str
    P: int
    K: int
    S: int
    method: str
    time_us: float
    bytes_read: int
    achieved_gbps: float
    floor_us: float
    vs_floor: float            # time / floor
    speedup_vs_plain: float    # plain decode time / this time
    max_abs_diff: float        # against plain paged decode


def timer(device: str):
    """Return time_fn(fn, iters) -> seconds per call."""
    if device == "cuda":
        def run(fn, iters):
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
    else:
        def run(fn, iters):
            fn()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) / iters
    return run


def copy_bandwidth(device: str, nbytes: int, time_fn, iters: int) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write both counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), iters)
    return 2 * nbytes / seconds


def build_case(shape, P, K, S, dtype, device, gen):
    hq, hkv, d = shape
    prefix_pages = math.ceil(P / PAGE_SIZE)
    suffix_pages = math.ceil(S / PAGE_SIZE)
    num_pages = prefix_pages + K * suffix_pages
    k_cache = torch.randn(num_pages, PAGE_SIZE, hkv, d, generator=gen).to(device, dtype)
    v_cache = torch.randn(num_pages, PAGE_SIZE, hkv, d, generator=gen).to(device, dtype)
    prefix = list(range(prefix_pages))
    suffixes = [list(range(prefix_pages + i * suffix_pages, prefix_pages + (i + 1) * suffix_pages)) for i in range(K)]
    block_tables = torch.tensor([prefix + s for s in suffixes], dtype=torch.int32, device=device)
    seq_lens = torch.full((K,), P + S, dtype=torch.int32, device=device)
    plan = vk.plan_tree_decode([prefix] + suffixes, [P] + [S] * K, [[0, 1 + i] for i in range(K)], PAGE_SIZE, device)
    q = torch.randn(K, hq, d, generator=gen).to(device, dtype)
    return q, k_cache, v_cache, block_tables, seq_lens, plan


def bench_config(name, shape, P, K, S, dtype, device, impl, time_fn, iters, copy_bw, gen, with_dense):
    _, hkv, d = shape
    q, k_cache, v_cache, block_tables, seq_lens, plan = build_case(shape, P, K, S, dtype, device, gen)
    scale = 1.0 / math.sqrt(d)
    token_bytes = 2 * hkv * d * k_cache.element_size()  # K and V of one token, all KV heads
    unique_bytes = (P + K * S) * token_bytes
    floor = unique_bytes / copy_bw
    methods = {
        "tree": (lambda: vk.tree_decode_attention(q, k_cache, v_cache, plan, scale, impl=impl),
                 plan.kv_tokens_read * token_bytes),
        "plain": (lambda: vk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, impl=impl),
                  K * (P + S) * token_bytes),
    }
    if with_dense:
        # dense per-branch KV, as a framework without paging would hold it (gather not timed)
        kd = vk.reference.gather_kv(k_cache, block_tables, P + S)  # [K, P+S, Hkv, D]
        vd = vk.reference.gather_kv(v_cache, block_tables, P + S)
        qs, ks, vs = q[:, :, None, :], kd.transpose(1, 2), vd.transpose(1, 2)
        methods["torch_sdpa"] = (
            lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)[:, :, 0],
            K * (P + S) * token_bytes)
        flash = _flash_attn()
        if flash is not None and device == "cuda":
            cache_lens = torch.full((K,), P + S, dtype=torch.int32, device=device)
            methods["flash_attn_kvcache"] = (
                lambda: flash(q[:, None], kd, vd, cache_seqlens=cache_lens, softmax_scale=scale)[:, 0],
                K * (P + S) * token_bytes)
    plain_out = methods["plain"][0]()
    results = {}
    for method, (fn, nbytes) in methods.items():
        diff = float((fn().float() - plain_out.float()).abs().max())
        results[method] = (time_fn(fn, iters), nbytes, diff)
    rows = []
    for method, (seconds, nbytes, diff) in results.items():
        rows.append(Row(name, P, K, S, method, seconds * 1e6, nbytes, nbytes / seconds / 1e9, floor * 1e6,
                        seconds / floor, results["plain"][0] / seconds, diff))
    return rows


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="a small sweep (P=128, K in {1, 8}, S=64, TinyLlama shapes)")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 50 on GPU, 2 on CPU)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--no-dense", action="store_true", help="skip the SDPA / flash-attn rows")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = ap.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    impl = "triton" if device == "cuda" else "torch"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    iters = args.iters or (50 if device == "cuda" else 2)
    time_fn = timer(device)
    if args.quick:
        shapes, sweep = ["tinyllama-1.1b"], [(128, k, 64) for k in (1, 8)]
    else:
        shapes = args.shapes
        sweep = [(p, k, s) for p in (128, 512, 2048) for k in (1, 8, 64, 256) for s in (64, 256)]
    copy_bw = copy_bandwidth(device, (1 << 30) if device == "cuda" else (64 << 20), time_fn, 20 if device == "cuda" else 3)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in shapes:
        for P, K, S in sweep:
            rows += bench_config(name, SHAPES[name], P, K, S, dtype, device, impl, time_fn, iters, copy_bw, gen,
                                 with_dense=not args.no_dense)
            if device == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device_name} ({device}, {dtype}, impl={impl}); copy bandwidth {copy_bw / 1e9:.1f} GB/s; "
          f"page size {PAGE_SIZE}")
    header = f"{'shape':<16} {'P':>5} {'K':>4} {'S':>4} {'method':<19} {'us/call':>10} {'GB/s':>8} " \
             f"{'floor us':>9} {'x floor':>8} {'vs plain':>9} {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.shape:<16} {r.P:>5} {r.K:>4} {r.S:>4} {r.method:<19} {r.time_us:>10.1f} {r.achieved_gbps:>8.1f} "
              f"{r.floor_us:>9.1f} {r.vs_floor:>8.2f} {r.speedup_vs_plain:>9.2f} {r.max_abs_diff:>10.2e}")
    if args.json:
        payload = dict(device=device_name, device_type=device, dtype=str(dtype).replace("torch.", ""), impl=impl,
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       torch=torch.__version__, copy_bandwidth_gbps=copy_bw / 1e9, page_size=PAGE_SIZE,
                       rows=[asdict(r) for r in rows])
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
