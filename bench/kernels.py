"""Decode-attention benchmark: K branches sharing a P-token prefix, each with S own tokens.

Methods per configuration: tree (prefix-shared) decode, plain paged decode, torch SDPA on the
gathered (dense, per-branch) KV, and flash-attn's flash_attn_with_kvcache when installed. Each
row gives the time per call, the bytes that method reads, the achieved bandwidth, the error
against a float64 reference, and the bandwidth floor beside it: the fewest bytes any method must
move (the unique KV, P + K*S tokens, plus the queries and outputs) over the device copy
bandwidth measured in the same run. Each configuration ends with the comparison in words
("tree is 5.1x faster than plain") and with what the engine's `tree_decode="auto"` rule runs
there (its thresholds come from vineppo.engine.engine).

Configurations: the named shape P=2048, K=64, S=256; a sweep of shared-prefix lengths P = 64 ..
4096 at K=64, S=256; a sweep of branch counts K = 2 .. 16 at P = 64 and 2048 (where the auto
thresholds decide). On the GPU it checks the targets: tree >= 5x plain and within 1.5x of the
floor at the named shape, and auto never more than 1.1x slower than plain.

    python bench/kernels.py --json kernels.json              # GPU: bf16, Triton kernels
    python bench/kernels.py --shapes tinyllama-1.1b deepseekmath-7b
    python bench/kernels.py --dry-run                        # CPU toy sizes, fp32, seconds
    TRITON_INTERPRET=1 python bench/kernels.py --dry-run     # the same through the Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vinekernels as vk  # noqa: E402
from vineppo.engine.engine import CPU_TREE_THRESHOLDS, GPU_TREE_THRESHOLDS  # noqa: E402

SHAPES = {  # name: (query heads, KV heads, head dim)
    "tinyllama-1.1b": (32, 4, 64),
    "deepseekmath-7b": (32, 32, 128),
    "toy": (4, 2, 64),            # --dry-run: the smallest head dim the Triton kernels take
}
PAGE_SIZE = 16
NAMED = (2048, 64, 256)           # (P, K, S) of the headline comparison
DRY_NAMED = (128, 8, 32)
TARGET_TREE_OVER_PLAIN = 5.0      # named shape: tree at least this much faster than plain
TARGET_TREE_OVER_FLOOR = 1.5      # named shape: tree within this factor of the floor
TARGET_AUTO_SLOWDOWN = 1.1        # anywhere: auto at most this much slower than plain


def configs(dry_run: bool) -> list[tuple[str, int, int, int]]:
    """(group, P, K, S) of every configuration, the named shape first."""
    if dry_run:
        P, K, S = DRY_NAMED
        return [("named", P, K, S), ("prefix", 16, K, S), ("prefix", 64, K, S),
                ("branches", 64, 2, S), ("branches", 64, 4, S)]
    P, K, S = NAMED
    out = [("named", P, K, S)]
    out += [("prefix", p, K, S) for p in (64, 128, 256, 512, 1024, 4096)]
    out += [("branches", p, k, S) for p in (64, 2048) for k in (2, 4, 8, 16)]
    return out


@dataclass
class Row:
    group: str
    shape: str
    P: int
    K: int
    S: int
    method: str
    time_us: float
    bytes_read: int
    achieved_gbps: float
    floor_bytes: int
    floor_us: float
    x_floor: float             # time / floor
    speedup_vs_plain: float    # plain time / this time
    rel_err: float             # ||out - ref|| / ||ref|| against float64 attention


def timer(device: str, iters: int):
    """time_fn(fn) -> seconds per call (median). On the GPU: triton's do_bench, which clears the
    L2 cache before every timed call, so small configurations are not served from the cache."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=max(20, iters), return_mode="median") / 1e3

    def run(fn):
        fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def copy_bandwidth(device: str, nbytes: int, time_fn) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda: dst.copy_(src))


def build_case(shape, P, K, S, dtype, device, gen, min_shared_len):
    hq, hkv, d = shape
    prefix_pages = math.ceil(P / PAGE_SIZE)
    suffix_pages = math.ceil(S / PAGE_SIZE)
    num_pages = prefix_pages + K * suffix_pages
    k_cache = torch.randn(num_pages, PAGE_SIZE, hkv, d, generator=gen, device=device).to(dtype)
    v_cache = torch.randn(num_pages, PAGE_SIZE, hkv, d, generator=gen, device=device).to(dtype)
    prefix = list(range(prefix_pages))
    suffixes = [list(range(prefix_pages + i * suffix_pages, prefix_pages + (i + 1) * suffix_pages))
                for i in range(K)]
    block_tables = torch.tensor([prefix + s for s in suffixes], dtype=torch.int32, device=device)
    seq_lens = torch.full((K,), P + S, dtype=torch.int32, device=device)
    plan = vk.plan_tree_decode([prefix] + suffixes, [P] + [S] * K, [[0, 1 + i] for i in range(K)],
                               PAGE_SIZE, device, min_shared_len=min_shared_len)
    q = torch.randn(K, hq, d, generator=gen, device=device).to(dtype)
    return q, k_cache, v_cache, block_tables, seq_lens, plan


def reference_fp64(q, kd, vd, scale, chunk: int = 8) -> torch.Tensor:
    """Float64 attention of q [K, Hq, D] over dense kd/vd [K, T, Hkv, D], a few queries at a time."""
    group = q.shape[1] // kd.shape[2]
    outs = []
    for i in range(0, q.shape[0], chunk):
        k = kd[i:i + chunk].double().repeat_interleave(group, dim=2)
        v = vd[i:i + chunk].double().repeat_interleave(group, dim=2)
        s = torch.einsum("khd,kthd->kht", q[i:i + chunk].double(), k) * scale
        outs.append(torch.einsum("kht,kthd->khd", s.softmax(-1), v))
    return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - ref).norm() / ref.norm())


def bench_config(group, name, P, K, S, dtype, device, impl, time_fn, copy_bw, gen, with_dense, min_shared_len):
    hq, hkv, d = SHAPES[name]
    q, k_cache, v_cache, block_tables, seq_lens, plan = build_case(SHAPES[name], P, K, S, dtype, device, gen,
                                                                   min_shared_len)
    scale = 1.0 / math.sqrt(d)
    elt = k_cache.element_size()
    token_bytes = 2 * hkv * d * elt                    # K and V of one token, all KV heads
    floor_bytes = (P + K * S) * token_bytes + 2 * q.numel() * elt   # unique KV + q read + out written
    floor = floor_bytes / copy_bw
    kd = vk.reference.gather_kv(k_cache, block_tables, P + S)        # [K, P+S, Hkv, D]
    vd = vk.reference.gather_kv(v_cache, block_tables, P + S)
    ref = reference_fp64(q, kd, vd, scale)
    dense_bytes = K * (P + S) * token_bytes
    methods = {
        "tree": (lambda: vk.tree_decode_attention(q, k_cache, v_cache, plan, scale, impl=impl),
                 plan.kv_tokens_read * token_bytes),
        "plain": (lambda: vk.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, impl=impl),
                  dense_bytes),
    }
    if with_dense:
        # dense per-branch KV, as a framework without paging holds it (the gather is not timed)
        qs, ks, vs = q[:, :, None, :], kd.transpose(1, 2), vd.transpose(1, 2)
        methods["torch_sdpa"] = (
            lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)[:, :, 0],
            dense_bytes)
        flash = _flash_attn()
        if flash is not None and device == "cuda":
            cache_lens = torch.full((K,), P + S, dtype=torch.int32, device=device)
            methods["flash_attn_kvcache"] = (
                lambda: flash(q[:, None], kd, vd, cache_seqlens=cache_lens, softmax_scale=scale)[:, 0],
                dense_bytes)
    measured = {m: (time_fn(fn), nbytes, rel_err(fn(), ref)) for m, (fn, nbytes) in methods.items()}
    plain_s = measured["plain"][0]
    return [Row(group, name, P, K, S, m, s * 1e6, nbytes, nbytes / s / 1e9, floor_bytes, floor * 1e6, s / floor,
                plain_s / s, err) for m, (s, nbytes, err) in measured.items()]


def _flash_attn():
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:
        return None
    return flash_attn_with_kvcache


def times_words(a: str, b: str, ratio: float) -> str:
    """'a is 5.1x faster than b' for ratio = time_b / time_a (or 'slower', 'as fast as')."""
    if abs(ratio - 1) < 0.005:
        return f"{a} is as fast as {b}"
    return f"{a} is {ratio:.2f}x faster than {b}" if ratio > 1 else f"{a} is {1 / ratio:.2f}x slower than {b}"


def compare(rows: list[Row], thresholds: tuple[int, int]) -> dict:
    """Per configuration: the ratios in words and what the engine's auto rule runs there."""
    by = {r.method: r for r in rows}
    tree, plain = by["tree"], by["plain"]
    min_queries, min_tokens = thresholds
    auto_tree = tree.K >= min_queries and (tree.P // PAGE_SIZE) * PAGE_SIZE >= min_tokens
    auto = tree if auto_tree else plain
    words = [times_words("tree", "plain", tree.speedup_vs_plain)]
    words += [times_words("tree", m, r.time_us / tree.time_us) for m, r in by.items() if m not in ("tree", "plain")]
    words.append(f"tree takes {tree.x_floor:.2f}x its floor")
    words.append(f"auto runs {'tree' if auto_tree else 'plain'}: {times_words('auto', 'plain', plain.time_us / auto.time_us)}")
    return dict(group=tree.group, shape=tree.shape, P=tree.P, K=tree.K, S=tree.S,
                tree_over_plain=tree.speedup_vs_plain, tree_x_floor=tree.x_floor, auto_method=auto.method,
                auto_slowdown_vs_plain=auto.time_us / plain.time_us, words="; ".join(words))


def check_targets(comparisons: list[dict]) -> list[dict]:
    named = [c for c in comparisons if c["group"] == "named"]
    out = []
    for c in named:
        out.append(dict(target=f"{c['shape']} P={c['P']} K={c['K']} S={c['S']}: tree >= {TARGET_TREE_OVER_PLAIN}x "
                        "faster than plain", value=c["tree_over_plain"],
                        met=c["tree_over_plain"] >= TARGET_TREE_OVER_PLAIN))
        out.append(dict(target=f"{c['shape']} P={c['P']} K={c['K']} S={c['S']}: tree within "
                        f"{TARGET_TREE_OVER_FLOOR}x of its floor", value=c["tree_x_floor"],
                        met=c["tree_x_floor"] <= TARGET_TREE_OVER_FLOOR))
    worst = max(comparisons, key=lambda c: c["auto_slowdown_vs_plain"])
    out.append(dict(target=f"auto at most {TARGET_AUTO_SLOWDOWN}x slower than plain anywhere "
                    f"(worst: {worst['shape']} P={worst['P']} K={worst['K']})",
                    value=worst["auto_slowdown_vs_plain"], met=worst["auto_slowdown_vs_plain"] <= TARGET_AUTO_SLOWDOWN))
    return out


def error_limit(dtype: torch.dtype, impl: str) -> float:
    """Largest acceptable relative error: bf16/fp16 operands, or fp32 (Triton's dots run in tf32)."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    return 2e-3 if impl == "triton" else 1e-5


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default: cuda when available (cpu with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="toy sizes (P <= 128, K <= 8, 4 heads of 64) on the CPU in fp32: seconds; with "
                         "TRITON_INTERPRET=1 the Triton kernels run in the interpreter")
    ap.add_argument("--impl", default="auto", choices=["auto", "triton", "torch"],
                    help="kernels: auto = Triton on the GPU, and on the CPU Triton when TRITON_INTERPRET=1, "
                         "else the torch reference")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 100 on GPU, 3 on CPU)")
    ap.add_argument("--shapes", nargs="*", default=None, choices=[s for s in SHAPES if s != "toy"],
                    help="head shapes (default: tinyllama-1.1b and deepseekmath-7b; toy with --dry-run)")
    ap.add_argument("--no-dense", action="store_true", help="skip the SDPA / flash-attn rows")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    impl = args.impl
    if impl == "auto":
        impl = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    iters = args.iters or (100 if device == "cuda" else 3)
    shapes = args.shapes or (["toy"] if args.dry_run else ["tinyllama-1.1b", "deepseekmath-7b"])
    thresholds = GPU_TREE_THRESHOLDS if device == "cuda" else CPU_TREE_THRESHOLDS
    time_fn = timer(device, iters)
    copy_bw = copy_bandwidth(device, (1 << 30) if device == "cuda" else (64 << 20), time_fn)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, comparisons = [], []
    for name in shapes:
        for group, P, K, S in configs(args.dry_run):
            part = bench_config(group, name, P, K, S, dtype, device, impl, time_fn, copy_bw, gen,
                                with_dense=not args.no_dense, min_shared_len=thresholds[1])
            rows += part
            comparisons.append(compare(part, thresholds))
            if device == "cuda":
                torch.cuda.empty_cache()

    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device_name} ({device}, {str(dtype).replace('torch.', '')}, impl={impl}); copy bandwidth "
          f"{copy_bw / 1e9:.1f} GB/s (read + write); page size {PAGE_SIZE}; auto thresholds "
          f"(min queries, min tokens) = {thresholds}")
    header = (f"{'group':<8} {'shape':<15} {'P':>5} {'K':>4} {'S':>4} {'method':<18} {'us/call':>9} {'GB/s':>8} "
              f"{'floor us':>9} {'x floor':>8} {'vs plain':>8} {'rel err':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.group:<8} {r.shape:<15} {r.P:>5} {r.K:>4} {r.S:>4} {r.method:<18} {r.time_us:>9.1f} "
              f"{r.achieved_gbps:>8.1f} {r.floor_us:>9.2f} {r.x_floor:>8.2f} {r.speedup_vs_plain:>8.2f} "
              f"{r.rel_err:>8.1e}")
    print()
    for c in comparisons:
        print(f"{c['shape']} P={c['P']} K={c['K']} S={c['S']}: {c['words']}")
    limit = error_limit(dtype, impl)
    wrong = [r for r in rows if not r.rel_err <= limit]
    targets = check_targets(comparisons) if device == "cuda" else []
    for t in targets:
        print(f"target {'met' if t['met'] else 'MISSED'}: {t['target']} (measured {t['value']:.2f})")
    if device != "cuda":
        print("targets apply to the GPU run only (these are CPU figures)")
    for r in wrong:
        print(f"WRONG: {r.method} at {r.shape} P={r.P} K={r.K} S={r.S}: relative error {r.rel_err:.2e} > {limit:.0e}")
    payload = dict(device=device_name, device_type=device, dtype=str(dtype).replace("torch.", ""), impl=impl,
                   dry_run=args.dry_run,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, copy_bandwidth_gbps=copy_bw / 1e9, page_size=PAGE_SIZE,
                   auto_thresholds=list(thresholds), error_limit=limit, rows=[asdict(r) for r in rows],
                   comparisons=comparisons, targets=targets, wrong=len(wrong))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if wrong:
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
