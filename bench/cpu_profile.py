"""Per-component split of one decode step at a model's shapes (random weights).

For each batch size (rows decoding one token each, every row with `--context` tokens of KV in its
own pages) the script times, over every layer:

  projections    the q/k/v, o, gate/up and down matmuls (as the runner calls them)
  attention      store_kv + paged decode attention (the KV gather and the softmax over it)
  norms_rope     the RMSNorms, RoPE, SiLU gating and residual adds
  lm_head        the final norm and the LM head on the sampled rows
  sampling       vinekernels.sample_tokens (T = 1, no top-k/top-p: the MC rollout setting)

and a whole engine decode step (Engine.generate of `rows` sequences, decode steps only, per step);
`python_metadata` is the engine step minus the sum of the components (scheduling, metadata
construction, Python). Printed as a table and written as JSON.

    python bench/cpu_profile.py                                      # SmolLM2-135M shapes, 64/128/256 rows
    python bench/cpu_profile.py --model-preset tiny --rows 64 --json /tmp/profile.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from branching import PRESETS, build_model, make_engine  # noqa: E402
from vineppo.engine import SamplingParams  # noqa: E402


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def profile(model, rows: int, context: int, page_size: int, reps: int) -> dict:
    from vinekernels import paged_decode_attention, store_kv
    from vinekernels.sampling import sample_tokens
    from vineppo.engine.model_runner import FUSE_PROJECTIONS_ON_CPU, FusedProjections, ModelRunner, rms_norm
    from vineppo.engine.rope import apply_rotary

    pages_per = -(-(context + 1) // page_size)
    runner = ModelRunner(model, num_pages=rows * pages_per + 1, page_size=page_size, device="cpu")
    w = runner.weights
    nh, nkv, hd, eps = runner.num_heads, runner.num_kv_heads, runner.head_dim, runner.rms_norm_eps
    x = torch.randn(rows, runner.hidden_size)
    tables = torch.arange(rows * pages_per, dtype=torch.int32).view(rows, pages_per)
    seq_lens = torch.full((rows,), context + 1, dtype=torch.int32)
    slots = (tables[:, context // page_size].long() * page_size + context % page_size)
    positions = torch.full((rows,), context, dtype=torch.int64)
    cos, sin = runner.rope.cos_sin(positions, runner.dtype)
    q = torch.randn(rows, nh, hd)
    k = torch.randn(rows, nkv, hd)
    v = torch.randn(rows, nkv, hd)
    inter = torch.randn(rows, w.layers[0].gate_w.shape[0])

    fused = FusedProjections().get(w.layers) if FUSE_PROJECTIONS_ON_CPU else None

    def projections():   # the matmuls the runner's CPU forward does
        for i, lw in enumerate(w.layers):
            if fused is not None:
                qkv_w, qkv_b, gate_up_w, gate_up_b = fused[i]
                F.linear(x, qkv_w, qkv_b)
            else:
                F.linear(x, lw.q_w, lw.q_b)
                F.linear(x, lw.k_w, lw.k_b)
                F.linear(x, lw.v_w, lw.v_b)
            F.linear(x, lw.o_w, lw.o_b)
            if fused is not None:
                F.linear(x, gate_up_w, gate_up_b)
            else:
                F.linear(x, lw.gate_w, lw.gate_b)
                F.linear(x, lw.up_w, lw.up_b)
            F.linear(inter, lw.down_w, lw.down_b)

    def attention():
        for kc, vc in zip(runner.k_caches, runner.v_caches):
            store_kv(k, v, kc, vc, slots)
            paged_decode_attention(q, kc, vc, tables, seq_lens, runner.scale)

    def norms_rope():
        for lw in w.layers:
            h = rms_norm(x, lw.input_norm, eps)
            apply_rotary(q, cos, sin)
            apply_rotary(k, cos, sin)
            h = x + h
            h = rms_norm(h, lw.post_attention_norm, eps)
            F.silu(inter) * inter
            h = h + x

    def lm_head():
        F.linear(rms_norm(x, w.norm, eps), w.lm_head).float()

    logits = F.linear(x, w.lm_head).float()
    ones = torch.ones(rows)
    samp = dict(temperature=ones, top_k=torch.zeros(rows, dtype=torch.int32), top_p=ones,
                seeds=torch.arange(rows, dtype=torch.int64), offsets=torch.zeros(rows, dtype=torch.int64))

    def sampling():
        sample_tokens(logits, **samp)

    parts = {name: _best(fn, reps) for name, fn in (("projections", projections), ("attention", attention),
                                                    ("norms_rope", norms_rope), ("lm_head", lm_head),
                                                    ("sampling", sampling))}
    runner = None

    # Whole engine decode step: one `context`-token prompt forked into `rows` samples (plain paged decode), `steps` decode steps.
    steps = 16
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (context,), generator=g).tolist()]   # forked n=rows: one prefill
    eng = make_engine(model, "never", page_size, "cpu")
    def generate_seconds(max_tokens: int) -> float:
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True, seed=1, n=rows))
        return time.perf_counter() - t0

    generate_seconds(1 + steps)                       # warm-up: first calls pay one-time costs
    def one_run():
        # the same prefill and fork in both calls cancel; what is left is `steps` decode steps
        return (generate_seconds(1 + 2 * steps) - generate_seconds(1 + steps)) / steps
    step = min(one_run() for _ in range(max(1, reps // 2)))
    if step <= 0:
        raise SystemExit(f"a decode step at {rows} rows is too short to time against the prefill's noise; "
                         "use more --rows or a larger --model-preset")
    eng = None             # frees its KV pool before the next row
    parts["python_metadata"] = max(0.0, step - sum(parts.values()))
    return {"rows": rows, "context": context, "engine_step_seconds": step, "seconds": parts,
            "tokens_per_s": rows / step}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-preset", default="smollm2-135m", choices=sorted(PRESETS))
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--context", type=int, default=320, help="KV tokens per row (default 320)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model = build_model(args.model_preset, args.context + 64, torch.float32, "cpu")
    print(f"decode step at {args.model_preset} shapes, fp32, context {args.context}, "
          f"{torch.get_num_threads()} threads (best of {args.reps})", flush=True)
    names = ["projections", "attention", "norms_rope", "lm_head", "sampling", "python_metadata"]
    print(f"{'rows':>5} {'step ms':>9} " + " ".join(f"{n:>16}" for n in names) + f" {'tok/s':>8}")
    out = []
    for rows in args.rows:
        r = profile(model, rows, args.context, args.page_size, args.reps)
        out.append(r)
        step = r["engine_step_seconds"]
        cells = " ".join(f"{r['seconds'][n] * 1e3:8.1f} ({r['seconds'][n] / step:4.0%})" for n in names)
        print(f"{rows:>5} {step * 1e3:9.1f} {cells} {r['tokens_per_s']:8.0f}", flush=True)
    report = {"model_preset": args.model_preset, "dtype": "float32", "threads": torch.get_num_threads(),
              "context": args.context, "page_size": args.page_size,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "profiles": out}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
