"""VinePPO-shaped branching benchmark.

Workload: P prompts x N trajectories of L response tokens; a step boundary every L/T tokens
(offsets 0, L/T, ..., L - L/T); K continuations from every boundary, each to response length L
(fixed lengths: EOS is ignored, so random weights are fine). Compared in one run:

  (a) engine: fork the live trajectories' pages, prefix-shared (tree) decode where it pays
      (tree_decode="auto": the device's thresholds in vineppo.engine.engine)
  (b) engine: fork the live trajectories' pages, plain paged decode
  (c) engine: re-prefill every state once and fork its K children from it, plain paged decode
      (what a server with n=K sampling does)
  (d) transformers generate with num_return_sequences=K, one call per state
  (e) transformers generate, every state of one boundary in ONE call (all prefixes of a boundary
      have the same length, so no padding), K rows per state, chunked to --hf-row-cap rows: the
      strong baseline a plain-transformers user writes; (a) over (e) is the headline ratio

The default workload is VinePPO-shaped (few-shot prompts of a few hundred tokens, K=9).
Only the continuation phase is timed for the comparison (the trajectories are generated once,
and timed separately). On a GPU the script also prints the decode bandwidth floor of (a) and (b):
per decode step, weight bytes + the bytes of the unique KV pages the step reads, over the
measured device copy bandwidth; beside it the compute floor: the run's model FLOPs (matmuls
and attention of every continuation token, prefix sharing counted once) over the fp32/bf16
matmul FLOP/s measured at the model's own weight shapes and the run's decode batch size.

    python bench/branching.py                                    # CPU default, tiny model
    python bench/branching.py --model-preset smollm2-135m --prompts 1 --prompt-len 64 \
        --samples 4 --length 32 --boundaries 4 --k 4             # SmolLM2-135M shapes
    python bench/branching.py --device cuda --model-preset tinyllama-1.1b --dtype bfloat16 \
        --prompts 8 --prompt-len 128 --samples 8 --length 512 --boundaries 8 --k 9
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vineppo.engine import BranchRequest, Engine, EngineConfig, SamplingParams  # noqa: E402

# Known shapes (random weights): what a forward costs depends only on these.
PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           tie_word_embeddings=False),
    "deepseekmath-7b": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                            num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
                            tie_word_embeddings=False),
}


def build_model(preset: str, max_len: int, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(PRESETS[preset])
    rope_theta = fields.pop("rope_theta", 10000.0)
    config = LlamaConfig(**fields, max_position_embeddings=max(max_len, 2048),
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         bos_token_id=None, eos_token_id=None, pad_token_id=None,
                         initializer_range=0.1)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    n = (256 << 20) if device.startswith("cuda") else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    _sync(device)
    return 2 * n * reps / (time.perf_counter() - t)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_engine(model, tree: str, page_size: int, device: str) -> Engine:
    """The engine every (a)-(c) row uses; only the tree-decode policy differs."""
    cfg = EngineConfig(page_size=page_size, tree_decode=tree, max_num_seqs=1024, max_num_batched_tokens=8192,
                       use_cuda_graphs=device.startswith("cuda"))
    return Engine(model, config=cfg, device=device)


def matmul_rates(model, rows: int, dtype: torch.dtype, device: str, min_seconds: float = 0.1) -> dict:
    """Measured FLOP/s of F.linear at each distinct weight shape of the model (lm_head included),
    with `rows` rows; the best of repeated runs of at least `min_seconds` each."""
    import torch.nn.functional as F

    rates = {}
    weights = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    for w in weights + [model.lm_head.weight]:
        shape = tuple(w.shape)
        if shape in rates:
            continue
        x = torch.randn(rows, shape[1], dtype=dtype, device=device)
        w = w.detach()
        F.linear(x, w)
        _sync(device)
        best = 0.0
        for _ in range(3):
            reps, t = 0, time.perf_counter()
            while True:
                F.linear(x, w)
                reps += 1
                _sync(device)
                dt = time.perf_counter() - t
                if dt >= min_seconds / 3:
                    break
            best = max(best, 2 * rows * shape[0] * shape[1] * reps / dt)
        rates[shape] = best
    return rates


def compute_floor(model, rates: dict, tokens: int, attended: int) -> tuple[float, float]:
    """(FLOPs, seconds): `tokens` forward tokens through every weight matmul at its measured rate,
    plus attention (QK^T and PV: 4 * heads * head_dim FLOPs per attended position per layer) over
    `attended` (token, context position) pairs at the best measured rate."""
    cfg = model.config
    flops = seconds = 0.0
    for name, p in model.named_parameters():
        if p.dim() != 2 or "embed_tokens" in name:
            continue
        f = 2.0 * tokens * p.shape[0] * p.shape[1]
        flops += f
        seconds += f / rates[tuple(p.shape)]
    if model.config.tie_word_embeddings:
        p = model.lm_head.weight
        f = 2.0 * tokens * p.shape[0] * p.shape[1]
        flops += f
        seconds += f / rates[tuple(p.shape)]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    fa = 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * attended
    return flops + fa, seconds + fa / max(rates.values())


class DecodeRecorder:
    """Counts decode steps and the unique KV pages each one reads (for the bandwidth floor)."""

    def __init__(self, engine: Engine):
        self.steps = 0
        self.unique_pages = 0
        prepare = engine._prepare

        def wrapped(batch):
            if batch.decode_seqs and not batch.prefill_seqs:
                self.steps += 1
                self.unique_pages += len({p for s in batch.decode_seqs for p in s.block_table})
            return prepare(batch)

        engine._prepare = wrapped


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model-preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--prompts", type=int, default=None, help="P (GPU default 8, CPU 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (GPU 384, CPU 256)")
    ap.add_argument("--samples", type=int, default=None, help="N trajectories per prompt (GPU 8, CPU 4)")
    ap.add_argument("--length", type=int, default=None, help="L response tokens (GPU 512, CPU 64)")
    ap.add_argument("--boundaries", type=int, default=None, help="T step boundaries (GPU 8, CPU 4)")
    ap.add_argument("--k", type=int, default=None, help="K continuations per boundary (default 9)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--skip-hf", action="store_true", help="skip (d) and (e), the transformers baselines")
    ap.add_argument("--skip-per-state", action="store_true", help="skip (d), the per-state transformers row")
    ap.add_argument("--hf-row-cap", type=int, default=256,
                    help="most rows (states x K) in one transformers generate call for (e) (default 256)")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    gpu = args.device.startswith("cuda")
    d = dict(prompts=8, prompt_len=384, samples=8, length=512, boundaries=8, k=9) if gpu else \
        dict(prompts=2, prompt_len=256, samples=4, length=64, boundaries=4, k=9)
    P, plen, N, L, T, K = (getattr(args, f) if getattr(args, f) is not None else d[f]
                           for f in ("prompts", "prompt_len", "samples", "length", "boundaries", "k"))
    if L % T:
        raise ValueError(f"--length {L} must be a multiple of --boundaries {T}")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    torch.set_grad_enabled(False)
    model = build_model(args.model_preset, plen + L + 8, dtype, args.device)
    offsets = [i * (L // T) for i in range(T)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (plen,), generator=g).tolist() for _ in range(P)]
    traj_params = SamplingParams(temperature=1.0, max_tokens=L, ignore_eos=True, seed=1, n=N)
    cont_params = SamplingParams(temperature=1.0, max_tokens=L, ignore_eos=True, seed=2)
    cont_tokens = P * N * K * sum(L - t for t in offsets)
    if args.hf_row_cap < K:
        raise ValueError(f"--hf-row-cap {args.hf_row_cap} is below K={K}")
    print(f"workload: {P} prompts x {N} trajectories, prompt {plen} tokens, response L={L}, "
          f"T={T} boundaries at {offsets}, K={K} continuations each -> {P * N * T} states, "
          f"{P * N * T * K} continuation rows, {cont_tokens} continuation tokens", flush=True)
    print(f"model: {args.model_preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{str(dtype).replace('torch.', '')}, random weights) on {args.device}, "
          f"{torch.get_num_threads()} threads; continuation phase timed", flush=True)

    def engine(tree: str) -> Engine:
        return make_engine(model, tree, args.page_size, args.device)

    results: dict[str, dict] = {}
    # Warm-up: first calls of each op pay one-time costs that would land on whichever runs first.
    warm = engine("auto")
    warm.generate(prompts[:1], SamplingParams(max_tokens=8, ignore_eos=True, n=2))
    del warm
    if not args.skip_hf:
        model.generate(torch.tensor(prompts[:1], device=args.device), do_sample=True,
                       num_return_sequences=2, max_new_tokens=4, pad_token_id=0)

    def timed(name, fn, eng=None):
        _sync(args.device)
        rec = DecodeRecorder(eng) if eng is not None else None
        t = time.perf_counter()
        fn()
        _sync(args.device)
        dt = time.perf_counter() - t
        results[name] = {"seconds": dt, "tokens_per_s": cont_tokens / dt}
        if rec is not None:
            results[name].update(decode_steps=rec.steps, unique_kv_pages_read=rec.unique_pages)
        print(f"{name:<34} {dt:8.2f} s  {cont_tokens / dt:10.0f} tok/s", flush=True)

    traj_seconds = None
    for name, tree in (("a_fork_tree_decode", "auto"), ("b_fork_paged_decode", "never")):
        eng = engine(tree)
        t = time.perf_counter()
        trajs = eng.generate(prompts, traj_params, keep_alive=True)
        _sync(args.device)
        traj_seconds = traj_seconds or time.perf_counter() - t
        reqs = [BranchRequest(c.handle, offsets) for group in trajs for c in group]
        tree_steps = eng.num_tree_steps
        timed(name, lambda: eng.branch(reqs, K, cont_params), eng)
        results[name]["tree_decode_steps"] = eng.num_tree_steps - tree_steps
        if tree == "auto":
            print(f"{'':<34} prefix-shared decode in {eng.num_tree_steps - tree_steps} of "
                  f"{results[name]['decode_steps']} decode steps", flush=True)
        states = [(p, c.token_ids) for p, group in zip(prompts, trajs) for c in group]
        eng.release()
        eng = None             # frees its KV pool before the next row

    eng = engine("never")
    state_prompts = [p + resp[:t] for p, resp in states for t in offsets]
    state_params = [SamplingParams(temperature=1.0, max_tokens=L - t, ignore_eos=True, seed=3, n=K)
                    for _ in states for t in offsets]
    timed("c_reprefill_fork_paged_decode", lambda: eng.generate(state_prompts, state_params), eng)
    eng = None             # frees its KV pool before the next row

    if not args.skip_hf and not args.skip_per_state:
        def hf():
            for prompt, max_new in zip(state_prompts, (L - t for _ in states for t in offsets)):
                model.generate(torch.tensor([prompt], device=args.device), do_sample=True,
                               num_return_sequences=K, max_new_tokens=max_new,
                               min_new_tokens=max_new, pad_token_id=0, top_k=0, top_p=1.0)
        timed("d_transformers_generate_per_state", hf)

    if not args.skip_hf:
        per_call = max(1, args.hf_row_cap // K)

        def hf_boundary():
            for t in offsets:
                rows = [p + resp[:t] for p, resp in states]          # one boundary: equal lengths
                for i in range(0, len(rows), per_call):
                    model.generate(torch.tensor(rows[i:i + per_call], device=args.device), do_sample=True,
                                   num_return_sequences=K, max_new_tokens=L - t, min_new_tokens=L - t,
                                   pad_token_id=0, top_k=0, top_p=1.0)
        timed("e_transformers_generate_per_boundary", hf_boundary)

    labels = {"a": "(a) engine fork + tree decode", "b": "(b) engine fork + paged decode",
              "c": "(c) engine re-prefill + fork", "d": "(d) transformers, one call per state",
              "e": "(e) transformers, one call per boundary"}
    a = results["a_fork_tree_decode"]["tokens_per_s"]
    ratios = {f"a_over_{k[0]}": a / v["tokens_per_s"] for k, v in results.items() if k[0] != "a"}
    order = sorted(ratios, key=lambda k: (k != "a_over_e", k))     # the headline (e) first
    for k in order:
        r = ratios[k]
        words = f"{r:.1f}x faster than" if r >= 1 else f"{1 / r:.1f}x slower than"
        print(f"{labels['a']} is {words} {labels[k[-1]]}" + ("   <- headline" if k == "a_over_e" else ""))

    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if "embed_tokens" not in n or model.config.tie_word_embeddings)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    page_bytes = 2 * cfg.num_hidden_layers * args.page_size * cfg.num_key_value_heads * head_dim * \
        torch.finfo(dtype).bits // 8
    bw = copy_bandwidth(args.device)
    floor = {}
    for name in ("a_fork_tree_decode", "b_fork_paged_decode"):
        r = results[name]
        floor[name] = (r["decode_steps"] * weight_bytes + r["unique_kv_pages_read"] * page_bytes) / bw
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s; decode bandwidth floor (weights + unique KV per "
          f"decode step): (a) {floor['a_fork_tree_decode']:.3f} s over "
          f"{results['a_fork_tree_decode']['decode_steps']} steps, (b) {floor['b_fork_paged_decode']:.3f} s"
          " (the measured times above include prefill/extend steps and sampling)")
    # Compute floor of (a): every continuation token through every weight matmul once, attention
    # over its full context (prefix KV is computed once per trajectory, outside the timed phase).
    attended = P * N * K * sum(sum(plen + t + j + 1 for j in range(L - t)) for t in offsets)
    rows = max(1, min(P * N * T * K, 256))
    rates = matmul_rates(model, rows, dtype, args.device)
    flops, compute_seconds = compute_floor(model, rates, cont_tokens, attended)
    a_s = results["a_fork_tree_decode"]["seconds"]
    print(f"compute floor of (a): {flops / 1e9:.1f} GFLOP at the measured matmul rates "
          f"({min(rates.values()) / 1e9:.0f}-{max(rates.values()) / 1e9:.0f} GFLOP/s at {rows} rows) = "
          f"{compute_seconds:.3f} s; (a) took {a_s:.3f} s = {a_s / compute_seconds:.2f}x the compute floor, "
          f"{flops / a_s / 1e9:.1f} GFLOP/s achieved", flush=True)

    report = {
        "workload": dict(prompts=P, prompt_len=plen, samples=N, length=L, boundaries=T, k=K,
                         offsets=offsets, continuation_tokens=cont_tokens, page_size=args.page_size),
        "model": dict(preset=args.model_preset, dtype=str(dtype).replace("torch.", ""),
                      parameters=sum(p.numel() for p in model.parameters()), **PRESETS[args.model_preset]),
        "device": dict(name=torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
                       kind=args.device, threads=torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "trajectory_seconds": traj_seconds,
        "results": results, "ratios": ratios,
        "headline": "a_over_e" if "a_over_e" in ratios else None,
        "hf_row_cap": args.hf_row_cap,
        "copy_bandwidth_bytes_per_s": bw, "decode_bandwidth_floor_seconds": floor,
        "compute_floor": {"flops": flops, "seconds": compute_seconds, "rows": rows,
                          "matmul_flops_per_s": {"x".join(map(str, k)): v for k, v in rates.items()},
                          "a_over_floor": a_s / compute_seconds},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
