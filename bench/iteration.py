"""One VinePPO and one PPO training iteration at Rho-1B / TinyLlama-1.1B shapes, phase by phase.

Each iteration is the trainer's own (`vineppo.trainer.iteration`): N responses per prompt
from the engine, K Monte Carlo continuations from every step boundary (VinePPO), old and
reference logprobs (and the critic's values for PPO), `ppo.epochs` of PPO-clip minibatch updates,
and the new weights back into the engine. The settings are the paper's (`--preset gsm8k-rho1b`:
64 prompts x 8 samples, K = 9, two epochs of minibatches of 64, KL to a reference model) except:

* random weights of the model's shape (Rho-1B is TinyLlama-1.1B's architecture), so the figures
  hold for any checkpoint of that shape;
* fixed lengths: random weights never emit EOS reliably, so the model has no EOS token and every
  response runs to `--length` tokens; the prompt is `--prompt-len` random tokens;
* a task with no parsing: each response is cut into `--states` equal steps (8 states, at token
  offsets 0, L/8, ...), and its reward is 0 (every response ends by length, which the trainer
  scores 0), so the timed work does not depend on what the model writes.

Per phase it prints seconds, and for the generation and MC phases the generated tokens/s and the
model-FLOP utilisation: 2 x parameters (all but the input embedding, a lookup) x tokens / time /
peak (790 TFLOP/s, dense bf16 on an H200 as measured; `--peak-tflops` to change it; attention
FLOPs are not counted).

    python bench/iteration.py --json iteration.json              # GPU: 64 x 8 (the paper's 512 episodes)
    python bench/iteration.py --small --json iteration.json      # 16 x 8
    python bench/iteration.py --dry-run                          # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vineppo.tasks import Example, Grade, Task  # noqa: E402

SHAPES = {  # random-weight Llama shapes: what an iteration costs depends only on these
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
PEAK_TFLOPS = 790.0       # dense bf16 matrix product on an H200, measured (device docs, KINDS.md)
TARGET_MC_MFU = 0.35      # MC phase: at least this model-FLOP utilisation
TARGET_VINEPPO_OVER_PPO = 2.0   # a VinePPO iteration at most this many times a PPO iteration
# Published anchors, for reading the figures (not measured here): a VinePPO re-implementation on
# vLLM, one H100, Rho-1B on MATH, 512 responses, K = 9.
ANCHORS = dict(vineppo_iteration_s=237.0, vineppo_mc_phase_s=152.0, ppo_iteration_s=90.0,
               source="published VinePPO re-implementation on vLLM, one H100, Rho-1B, MATH, 512 episodes, K=9")
CODE_BASE = 0x10000       # token id i is the character chr(CODE_BASE + i): one character per token


class FixedWidthTokenizer:
    """One character per token id, no special tokens: text and token offsets correspond exactly,
    and no token is EOS."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) - CODE_BASE for c in text]}

    def decode(self, token_ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(CODE_BASE + int(i)) for i in token_ids)


@dataclass
class FixedStepsTask(Task):
    """Prompts are stored as their text; every response is `max_steps` equal steps; reward 0."""

    def prompt(self, example: Example, tokenizer=None, template: str = "plain") -> str:
        return example.question

    def _grade(self, response: str, example: Example) -> Grade:
        return Grade(0.0)

    def _split(self, response: str) -> list[str]:
        n = self.max_steps
        bounds = [len(response) * i // n for i in range(n + 1)]
        return [response[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] or [response]


def make_task(tokenizer, num_prompts: int, prompt_len: int, states: int, seed: int) -> FixedStepsTask:
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(num_prompts):
        ids = torch.randint(3, tokenizer.vocab_size, (prompt_len,), generator=gen).tolist()
        examples.append(Example(id=str(i), question=tokenizer.decode(ids), answer="", solution=""))
    return FixedStepsTask(name="fixed-steps", train=examples, test=examples[:1], max_steps=states)


def build_policy(shape: str, max_len: int, device: str, seed: int):
    """A float32 Llama with random weights, made on `device`, with no EOS/BOS/pad ids."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(max_len, 2048),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    return model.eval()


def matmul_parameters(model) -> int:
    """Parameters that take part in a matrix product per token: all but the input embedding
    (unless it is tied to the output layer)."""
    embed = model.get_input_embeddings().weight
    tied = embed is model.get_output_embeddings().weight
    return sum(p.numel() for p in model.parameters()) - (0 if tied else embed.numel())


def train_args(args, algo: str, device: str) -> list[str]:
    """Command-line overrides of the paper's preset for this benchmark."""
    episodes = args.prompts * args.samples
    gpu = device == "cuda"
    return ["--preset", "gsm8k-rho1b", "--algo", algo, "--seed", "0",
            "--rollout.num_prompts", str(args.prompts), "--rollout.num_samples", str(args.samples),
            "--rollout.mc_rollouts", str(args.k), "--rollout.max_steps", str(args.states),
            "--rollout.max_tokens", str(args.length),
            "--ppo.minibatch_size", str(min(64, episodes)), "--ppo.micro_batch_size", str(args.micro_batch_size),
            "--engine.max_num_seqs", str(args.max_num_seqs),
            "--engine.max_num_batched_tokens", str(args.max_num_batched_tokens),
            "--engine.memory_fraction", str(args.memory_fraction),
            "--engine.use_cuda_graphs", "true" if gpu else "false",
            "--run.device", device, "--run.progress", "false", "--run.tensorboard", "false"]


def run_iteration(cfg, policy, tokenizer, task) -> dict:
    """One training iteration of a one-process run, as `vineppo.train` runs it.

    All that this benchmark uses of the trainer is here: `train.assemble_run` (the Run around the
    policy: reference model, critic, engine, learners) and `trainer.iteration` (which runs
    `rollout.collect_rollouts`, scoring, the advantages, `learner.ppo_update` and the weight
    sync); its metrics carry the phase times (`time/...`) and token counts.
    """
    from vineppo.distributed import init_distributed
    from vineppo.train import assemble_run
    from vineppo.trainer import TrainState, iteration

    ctx = init_distributed(cfg.run.device)
    run = assemble_run(cfg, ctx, policy, tokenizer, task, tempfile.mkdtemp(prefix="bench-iteration-"))
    engine = run.engine
    warm_up(engine, policy, task, tokenizer, cfg, run.compute_dtype)
    steps, tree_steps = engine.num_steps, engine.num_tree_steps
    _sync(ctx.device)
    metrics = iteration(run, TrainState())
    _sync(ctx.device)
    metrics.update({"engine/num_pages": engine.num_pages, "engine/steps": engine.num_steps - steps,
                    "engine/tree_decode_steps": engine.num_tree_steps - tree_steps})
    engine.release()
    run.log.close()
    return metrics


def warm_up(engine, policy, task, tokenizer, cfg, compute_dtype) -> None:
    """One-time costs (kernel compilation, CUDA-graph capture, library handles) before the timed
    iteration: a short generate and branch through the engine, and one forward/backward."""
    from vineppo.engine import BranchRequest, SamplingParams

    prompt = tokenizer(task.prompt(task.train[0]))["input_ids"]
    params = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, max_tokens=16,
                            seed=0, n=2)
    outputs = engine.generate([prompt], params, keep_alive=True)
    engine.branch([BranchRequest(outputs[0][0].handle, [0, 8])], k=cfg.rollout.mc_rollouts, params=params)
    engine.release()
    ids = torch.tensor([prompt], device=engine.device)
    with torch.autocast(engine.device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None):
        loss = policy(input_ids=ids, use_cache=False).logits.float().mean()
    loss.backward()
    policy.zero_grad(set_to_none=True)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def phase_report(metrics: dict, params: int, peak_flops: float | None) -> dict:
    """Seconds per phase; tokens/s and model-FLOP utilisation (None without a peak) of the
    sampling phases."""
    phases = {k[len("time/"):]: float(v) for k, v in metrics.items() if k.startswith("time/")}
    total = phases.pop("iteration")
    phases["other"] = max(0.0, total - sum(phases.values()))
    out = dict(seconds=dict(phases, iteration=total))
    for name, tokens_key, time_key in (("generation", "tokens/generated", "generation"),
                                       ("mc", "tokens/mc", "mc_rollouts")):
        tokens, seconds = int(metrics.get(tokens_key, 0)), phases.get(time_key, 0.0)
        if tokens and seconds > 0:
            out[name] = dict(tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                             mfu=2 * params * tokens / seconds / peak_flops if peak_flops else None)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default: cuda when available (cpu with --dry-run)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU toy sizes: tiny model, 2 prompts x 2 samples, 16-token prompts and responses, 2 states, K=2, fp32")
    ap.add_argument("--small", action="store_true", help="16 prompts instead of 64 (16 x 8 = 128 episodes)")
    ap.add_argument("--algos", default="vineppo,ppo", help="comma-separated, run in this order")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default tinyllama-1.1b (tiny with --dry-run)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per iteration (default 64; 16 with --small)")
    ap.add_argument("--samples", type=int, default=None, help="responses per prompt (default 8)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128)")
    ap.add_argument("--length", type=int, default=None, help="response tokens, fixed (default 512)")
    ap.add_argument("--states", type=int, default=None, help="MC states per response (default 8)")
    ap.add_argument("--k", type=int, default=None, help="MC continuations per state (default 9)")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="episodes per forward/backward pass")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="engine batch: sequences per step "
                    "(default 1024 on GPU, 64 on CPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="engine batch: tokens per step (default 16384 on GPU, 2048 on CPU)")
    ap.add_argument("--memory-fraction", type=float, default=0.4, help="free device memory for the KV cache")
    ap.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="peak for the utilisation figure")
    ap.add_argument("--json", default=None, help="write the results to this file")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    toy = args.dry_run
    defaults = dict(shape="tiny", prompts=2, samples=2, prompt_len=16, length=16, states=2, k=2) if toy else \
        dict(shape="tinyllama-1.1b", prompts=16 if args.small else 64, samples=8, prompt_len=128, length=512,
             states=8, k=9)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.max_num_seqs = args.max_num_seqs or (1024 if device == "cuda" else 64)
    args.max_num_batched_tokens = args.max_num_batched_tokens or (16384 if device == "cuda" else 2048)
    if args.length % args.states:
        raise SystemExit(f"--length {args.length} must be a multiple of --states {args.states}")
    algos = [a for a in args.algos.split(",") if a]
    if not algos or any(a not in ("vineppo", "ppo") for a in algos):
        raise SystemExit(f"--algos takes vineppo and/or ppo, got {args.algos!r}")

    from vineppo.config import load_config

    tokenizer = FixedWidthTokenizer(SHAPES[args.shape]["vocab_size"])
    task = make_task(tokenizer, args.prompts, args.prompt_len, args.states, seed=0)
    offsets = [i * (args.length // args.states) for i in range(args.states)]
    expected_mc = args.prompts * args.samples * args.k * sum(args.length - t for t in offsets)
    peak = args.peak_tflops * 1e12 if device == "cuda" else None   # a GPU peak says nothing of a CPU
    fixed_lengths_note = ("random weights and no EOS token: every response is exactly "
                          f"{args.length} tokens and every reward is 0 (ended by length); "
                          f"{args.states} states per response at token offsets {offsets}")
    print(f"workload: {args.prompts} prompts x {args.samples} samples = {args.prompts * args.samples} episodes, "
          f"{args.prompt_len}-token prompts, {args.length}-token responses, {args.states} states, K={args.k}, "
          f"shape {args.shape}, {device}" + (" (16 x 8: --small)" if args.small else ""), flush=True)
    print(f"note: {fixed_lengths_note}", flush=True)
    results = {}
    params = None
    for algo in algos:
        cfg = load_config(train_args(args, algo, device))
        policy = build_policy(args.shape, args.prompt_len + args.length + 8, device, seed=0)
        params = matmul_parameters(policy)
        t = time.perf_counter()
        metrics = run_iteration(cfg, policy, tokenizer, task)
        wall = time.perf_counter() - t
        report = phase_report(metrics, params, peak)
        report["wall_with_setup_s"] = wall
        report["tokens_as_expected"] = (algo != "vineppo" or int(metrics.get("tokens/mc", 0)) == expected_mc) and \
            int(metrics.get("tokens/generated", 0)) == args.prompts * args.samples * args.length
        report["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        results[algo] = report
        line = " | ".join(f"{k} {v:.2f}s" for k, v in report["seconds"].items())
        print(f"{algo}: {line}", flush=True)
        print(f"{algo} engine: {metrics['engine/steps']} steps, {metrics['engine/tree_decode_steps']} of them "
              f"with prefix-shared decode; {metrics['engine/num_pages']} KV pages", flush=True)
        for name in ("generation", "mc"):
            if name in report:
                r = report[name]
                mfu = "" if r["mfu"] is None else \
                    f", model-FLOP utilisation {100 * r['mfu']:.1f}% of {args.peak_tflops:g} TFLOP/s"
                print(f"{algo} {name} phase: {r['tokens']} tokens in {r['seconds']:.2f} s = "
                      f"{r['tokens_per_s']:.0f} tok/s{mfu}", flush=True)
        if not report["tokens_as_expected"]:
            print(f"WARNING: {algo} generated other token counts than the fixed lengths give "
                  f"(expected {expected_mc} MC tokens)", flush=True)
        del policy, metrics
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    targets = []
    if device == "cuda" and "vineppo" in results and "mc" in results["vineppo"]:
        mfu = results["vineppo"]["mc"]["mfu"]
        targets.append(dict(target=f"MC-phase utilisation >= {100 * TARGET_MC_MFU:.0f}%", value=mfu,
                            met=mfu >= TARGET_MC_MFU))
    if "vineppo" in results and "ppo" in results:
        ratio = results["vineppo"]["seconds"]["iteration"] / results["ppo"]["seconds"]["iteration"]
        print(f"a VinePPO iteration takes {ratio:.2f}x a PPO iteration", flush=True)
        if device == "cuda":
            targets.append(dict(target=f"VinePPO iteration <= {TARGET_VINEPPO_OVER_PPO}x PPO's", value=ratio,
                                met=ratio <= TARGET_VINEPPO_OVER_PPO))
    for t in targets:
        print(f"target {'met' if t['met'] else 'MISSED'}: {t['target']} (measured {t['value']:.2f})", flush=True)
    if device != "cuda":
        print("targets apply to the GPU run only (these are CPU figures)")
    report = {
        "workload": dict(prompts=args.prompts, samples=args.samples, episodes=args.prompts * args.samples,
                         prompt_len=args.prompt_len, length=args.length, states=args.states, k=args.k,
                         offsets=offsets, expected_mc_tokens=expected_mc, small=args.small, dry_run=args.dry_run,
                         note=fixed_lengths_note),
        "model": dict(shape=args.shape, matmul_parameters=params, **SHAPES[args.shape]),
        "engine": dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                       memory_fraction=args.memory_fraction),
        "device": dict(name=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
                       kind=device, threads=torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "peak_tflops": args.peak_tflops, "anchors": ANCHORS,
        "results": results, "targets": targets,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if not all(r["tokens_as_expected"] for r in results.values()):
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
