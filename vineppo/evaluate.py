"""Test-set evaluation through the engine: n samples per problem, mean accuracy (pass@1).

    python -m vineppo.evaluate --model PATH [--task gsm8k] [--data PATH] [--n 16 --temperature 0.35
        --top-p 0.9 --max-tokens 512 --limit N --gguf-file F --template plain --output FILE.json]

An SFT checkpoint or a run checkpoint's model/ folder is evaluated on the task it was trained on
(the same synthetic knobs and generator seed) unless --task and --task-arg say otherwise.

The paper's protocol is 16 samples per test problem at temperature 0.35, top-p 0.9; the accuracy
is the mean over problems and samples, which is the unbiased pass@1 estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch

from vineppo.engine import Engine, EngineConfig, SamplingParams
from vineppo.models import load_policy, resolve_model_name
from vineppo.rollout import decode_response, per_prompt_params, score
from vineppo.saved_task import choose_task
from vineppo.settings import check_settings, setting
from vineppo.tasks import TaskConfig, load_task_from_config, prompt_ids


@dataclass
class EvalConfig:
    """Test-set evaluation during training; the `eval` section of the CLI."""

    every: int = setting(10, "evaluate on the test split every this many iterations (0 = only at the end)",
                         check=">= 0")
    at_start: bool = setting(True, "evaluate before the first iteration")
    n: int = setting(16, "samples per test problem", check=">= 1")
    temperature: float = setting(0.35, "sampling temperature", check=">= 0")
    top_p: float = setting(0.9, "nucleus sampling threshold", check="(0, 1]")
    max_tokens: int = setting(0, "max new tokens (0 = rollout.max_tokens)", check=">= 0")
    limit: int = setting(0, "evaluate on the first this many test problems (0 = all)", check=">= 0")

    def __post_init__(self):
        check_settings(self)


def evaluate(engine, task, examples, tokenizer, n: int, temperature: float, top_p: float, max_tokens: int,
             template: str = "plain", seed: int = 0, progress: bool = False, first_index: int = 0) -> dict:
    """Samples `n` responses per example and grades them. Example i samples with its own seed,
    derived from `seed` and ``first_index + i`` (its position in the whole test set, so a sharded
    evaluation draws what a single process would).

    Returns {"accuracy", "pass@1" (the same number), "majority" (accuracy of the most common final
    answer of each problem's samples, `Task.final_answer`; ties go to the answer sampled first),
    f"pass@{n}" (a problem counts when any sample is right), "num_problems", "num_samples",
    "mean_response_tokens", "truncated_fraction", "seconds", "per_problem" (fraction correct of
    each problem, in order), "accuracy_by" (see :func:`accuracy_by_meta`)} and, for one greedy
    sample per problem, "greedy_pass@1". A response cut off by `max_tokens` counts as wrong.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not examples:
        raise ValueError("evaluate needs at least one example")
    start = time.perf_counter()
    prompts = [prompt_ids(task, ex, tokenizer, template) for ex in examples]
    params = per_prompt_params(SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                              n=n, seed=seed), len(prompts), first_index)
    outputs = engine.generate(prompts, params, progress=progress)
    per_problem, majority, any_right, lengths, truncated = [], [], [], [], 0
    for example, group in zip(examples, outputs):
        rewards, answers = [], []
        for c in group:
            text = decode_response(tokenizer, c.token_ids)
            rewards.append(score(task, text, example, c.finish_reason))
            answers.append(task.final_answer(text) if c.finish_reason != "length" else None)
            lengths.append(len(c.token_ids))
            truncated += c.finish_reason == "length"
        per_problem.append(sum(rewards) / len(rewards))
        majority.append(majority_vote(answers, rewards))
        any_right.append(float(max(rewards) > 0))
    accuracy = sum(per_problem) / len(per_problem)
    result = {
        "accuracy": accuracy,
        "pass@1": accuracy,
        "majority": sum(majority) / len(majority),
        f"pass@{n}": sum(any_right) / len(any_right),
        "num_problems": len(examples),
        "num_samples": n,
        "mean_response_tokens": sum(lengths) / len(lengths),
        "truncated_fraction": truncated / len(lengths),
        "seconds": time.perf_counter() - start,
        "per_problem": per_problem,
        "accuracy_by": accuracy_by_meta(examples, per_problem),
    }
    if n == 1 and temperature == 0:
        result["greedy_pass@1"] = accuracy
    return result


def majority_vote(answers: list[str | None], rewards: list[float]) -> float:
    """The reward of the most common final answer among samples (None: no answer, never a
    candidate; ties go to the answer sampled first); 0 when no sample has an answer."""
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1
    if not counts:
        return 0.0
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return rewards[answers.index(winner)]


def accuracy_by_meta(examples, per_problem: list[float], max_groups: int = 20) -> dict:
    """{meta key: {value: [accuracy, problems]}} for every example.meta key that takes a few
    plain values (MATH level and subject, the synthetic task's number of steps)."""
    groups: dict[str, dict[str, list[float]]] = {}
    for example, accuracy in zip(examples, per_problem):
        for key, value in example.meta.items():
            if isinstance(value, (str, int, bool)):
                groups.setdefault(key, {}).setdefault(str(value), []).append(accuracy)
    return {key: {value: [sum(s) / len(s), len(s)] for value, s in sorted(by_value.items())}
            for key, by_value in groups.items()
            if 1 < len(by_value) <= max_groups and sum(map(len, by_value.values())) == len(examples)}


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m vineppo.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="save_pretrained folder, .gguf file, hub name, or "
                   "'smollm2' for the packaged SmolLM2-135M-Instruct")
    p.add_argument("--task", default=None, help="synthetic | gsm8k | math (default: the checkpoint's, else gsm8k)")
    p.add_argument("--data", default=None, help="local data folder/file or hub dataset (gsm8k / math)")
    p.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                   help="paper: the paper's evaluation (16 samples per test problem at T=0.35, top-p 0.9, "
                        "1,024 tokens, every test problem); sampling options must then agree with it")
    p.add_argument("--split", default=None, choices=("test", "train"), help="default: test")
    p.add_argument("--n", type=int, default=None, help="samples per problem (default 16)")
    p.add_argument("--temperature", type=float, default=None, help="default 0.35")
    p.add_argument("--top-p", type=float, default=None, help="default 0.9")
    p.add_argument("--max-tokens", type=int, default=None, help="default 512 (1,024 under --protocol paper)")
    p.add_argument("--limit", type=int, default=None, help="first N problems (default 0 = all)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model when it is a folder")
    p.add_argument("--template", default=None, choices=("plain", "chat"),
                   help="prompt format (default: the checkpoint's, else plain)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--task-seed", type=int, default=None, help="synthetic: generator seed (default: the "
                   "checkpoint's, else 0)")
    p.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="load_task knob, e.g. num_steps=4 (synthetic: defaults to the checkpoint's knobs)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the model's)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--num-pages", type=int, default=0, help="KV cache pages (0 = engine default)")
    p.add_argument("--output", default=None, help="write the summary (and per-problem scores) as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    fixed = PROTOCOLS.get(args.protocol, {})
    for name, value in dict(DEFAULTS, **fixed).items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
        elif name in fixed and given != value:
            p.error(f"--protocol {args.protocol} fixes --{name.replace('_', '-')} {value}; got {given}")
    return args


# Sampling settings of the evaluation CLI, and the protocols that fix them.
DEFAULTS = dict(split="test", n=16, temperature=0.35, top_p=0.9, max_tokens=512, limit=0)
PROTOCOLS = {"paper": dict(split="test", n=16, temperature=0.35, top_p=0.9, max_tokens=1024, limit=0)}


@dataclass
class Loaded:
    """A saved policy, its tokenizer, the task it is measured on and an engine over it."""
    model_path: str
    model: object
    tokenizer: object
    task_config: TaskConfig
    task: object
    template: str
    engine: Engine
    device: str


def load_for_evaluation(model: str, task: str | None, data: str | None, template: str | None,
                        task_args: list[str], task_seed: int | None = None, device: str | None = None,
                        dtype: str | None = None, gguf_file: str | None = None, num_pages: int = 0) -> Loaded:
    """What `evaluate` and `vineppo.analyze` run on: the model (any `load_policy` name, 'smollm2'
    included), the task of `saved_task.choose_task`, and an engine on `device` (default cuda when
    available)."""
    model_path = resolve_model_name(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy, tokenizer = load_policy(model_path, dtype=dtype, device=device, gguf_file=gguf_file)
    policy.eval()
    task_cfg, template = choose_task(model_path, task, data, template, task_args, task_seed)
    engine = Engine(policy, tokenizer, EngineConfig(num_pages=num_pages), device=device)
    return Loaded(model_path, policy, tokenizer, task_cfg, load_task_from_config(task_cfg), template, engine, device)


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    run = load_for_evaluation(args.model, args.task, args.data, args.template, args.task_arg, args.task_seed,
                              args.device, args.dtype, args.gguf_file, args.num_pages)
    examples = run.task.test if args.split == "test" else run.task.train
    if args.limit:
        examples = examples[:args.limit]
    result = evaluate(run.engine, run.task, examples, run.tokenizer, n=args.n, temperature=args.temperature,
                      top_p=args.top_p, max_tokens=args.max_tokens, template=run.template, seed=args.seed,
                      progress=not args.no_progress)
    print(f"{run.task_config.name} {args.split}: accuracy {100 * result['accuracy']:.2f}% over "
          f"{result['num_problems']} problems x {args.n} samples (T={args.temperature}, top-p={args.top_p}); "
          f"mean response {result['mean_response_tokens']:.0f} tokens, "
          f"{100 * result['truncated_fraction']:.1f}% truncated, {result['seconds']:.1f}s")
    print(f"  mean per-sample accuracy {100 * result['accuracy']:.2f}%, majority vote {100 * result['majority']:.2f}%, "
          f"pass@{args.n} {100 * result[f'pass@{args.n}']:.2f}%" + (f" (protocol {args.protocol})" if args.protocol else ""))
    for key, by_value in result["accuracy_by"].items():
        print(f"  by {key}: " + ", ".join(f"{v} {100 * acc:.1f}% ({count})" for v, (acc, count) in by_value.items()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(vars(args), task=run.task_config.name, data=run.task_config.path,
                           task_config=vars(run.task_config), template=run.template, device=run.device,
                           **result), f, indent=2)
    return result


if __name__ == "__main__":
    main()
