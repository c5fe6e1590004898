"""`python -m vineppo.train`: RL training of a policy with VinePPO or a baseline.

    python -m vineppo.train                                   # tiny preset: SFT (if needed), then VinePPO
    python -m vineppo.train --preset gsm8k-rho1b --algo ppo   # any field: --section.field VALUE (see --help)
    python -m vineppo.train --resume runs/tiny-vineppo-20250101-120000
    torchrun --nproc_per_node=8 -m vineppo.train --preset gsm8k-deepseek7b

This module builds the pieces (models, task, engine, run folder) and hands them to
`vineppo.trainer.Trainer`; under torchrun each rank trains an FSDP2 shard and samples with its own
engine on an unsharded copy of the weights.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import time
from contextlib import contextmanager
from datetime import datetime

import torch

from vineppo import checkpoint
from vineppo.algos import estimator
from vineppo.config import DEFAULT_PRESET, TrainConfig, command_line_fields, load_config
from vineppo.distributed import (DistContext, barrier, broadcast_object, destroy_distributed,
                                 enable_activation_checkpointing, init_distributed, shard_model)
from vineppo.engine import Engine
from vineppo.learner import Learner, TrainingStopped, total_optimizer_steps
from vineppo.metrics import RunLog
from vineppo.models import ValueModel, load_policy, resolve_dtype, resolve_model_name
from vineppo.rollout import fit_prompts
from vineppo.sft import cache_dir_of, ensure_sft_checkpoint, job_from_train_config
from vineppo.tasks import load_task_from_config
from vineppo.tasks.rewards import RewardError
from vineppo.trainer import Interrupted, Run, StopRequest, TrainState, restore, train


def resolve_model_path(cfg: TrainConfig, ctx: DistContext) -> tuple[str, str | None]:
    """(name_or_path, gguf_file) of the initial policy; trains the tiny preset's SFT model when missing."""
    name = cfg.model.name
    if name == "tiny":
        if not cfg.sft.enabled:
            raise ValueError("model.name=tiny needs sft.enabled=true (the tiny model starts from SFT)")
        path = None
        if ctx.is_main:
            path = ensure_sft_checkpoint(job_from_train_config(cfg), cache_dir_of(cfg), cfg.run.device,
                                         cfg.run.progress)
        barrier(ctx)
        return broadcast_object(path, ctx), None
    return resolve_model_name(name), cfg.model.gguf_file or None


def resolve_dtypes(cfg: TrainConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(engine dtype, training compute dtype or None for plain float32)."""
    gpu = device.type == "cuda"
    engine = torch.bfloat16 if (cfg.model.dtype == "auto" and gpu) else resolve_dtype(
        "float32" if cfg.model.dtype == "auto" else cfg.model.dtype)
    mp = cfg.dist.mixed_precision
    compute = (torch.bfloat16 if gpu else None) if mp == "auto" else resolve_dtype(mp)
    if compute == torch.float32:
        compute = None
    return engine, compute


def make_run_dir(cfg: TrainConfig, ctx: DistContext) -> str:
    """The run folder (created by rank 0, same path on every rank)."""
    path = None
    if ctx.is_main:
        if cfg.run.resume:
            path = cfg.run.resume
        elif cfg.run.run_dir:
            path = cfg.run.run_dir
        else:
            name = cfg.run.name or f"{cfg.preset}-{cfg.algo}"
            path = os.path.join(cfg.run.output_dir, f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(path, exist_ok=True)
    return broadcast_object(path, ctx)


RUN_BUDGET = ("max_iterations", "max_minutes", "max_train_minutes")


def resume_config(cfg: TrainConfig, argv: list[str]) -> TrainConfig:
    """The saved config of the run being resumed, with the run.* fields this command line sets.

    Fields that change the result (model, data, hyperparameters) come from the run folder, so a
    resumed run continues the same experiment; setting one on the command line is an error. The
    run's display and checkpoint settings are kept too unless given again; the budget
    (max_iterations, max_minutes, max_train_minutes) is this command's own.
    """
    saved_path = os.path.join(cfg.run.resume, "config.json")
    if not os.path.isfile(saved_path):
        raise ValueError(f"--resume {cfg.run.resume}: no config.json there (not a run folder)")
    given = command_line_fields(argv)
    fixed = sorted(name for name in given if not name.startswith("run.") and name not in ("preset", "config"))
    if fixed:
        raise ValueError(f"--resume continues the run as it was configured; only run.* options apply, not "
                         f"{', '.join('--' + n for n in fixed)}")
    saved = TrainConfig.load(saved_path)
    for field in {name.removeprefix("run.") for name in given if name.startswith("run.")} | set(RUN_BUDGET):
        setattr(saved.run, field, getattr(cfg.run, field))
    saved.run.run_dir = saved.run.resume = cfg.run.resume
    return saved.validate()


def build_run(cfg: TrainConfig, ctx: DistContext, start_time: float | None = None) -> tuple[Run, TrainState]:
    """Loads everything a run needs: the `Run` and the state it starts from (the latest
    checkpoint's when cfg.run.resume is set)."""
    start_time = time.time() if start_time is None else start_time
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.seed)
    ckpt = None
    if cfg.run.resume:
        ckpt = checkpoint.latest_checkpoint(cfg.run.resume)
        if ckpt is None:
            raise ValueError(f"--resume {cfg.run.resume}: no complete checkpoint in {cfg.run.resume}/checkpoints")

    model_path, gguf_file = resolve_model_path(cfg, ctx)
    policy, tokenizer = load_policy(model_path, dtype=torch.float32, gguf_file=gguf_file)
    policy.to(ctx.device)
    task = load_task_from_config(cfg.task)
    # every prompt must leave room for a response in the context, checked before any work
    context = int(policy.config.max_position_embeddings)
    train = task.train[:cfg.task.max_train] if cfg.task.max_train > 0 else task.train
    test = task.test[:cfg.eval.limit] if cfg.eval.limit > 0 else task.test
    template, on_error = cfg.rollout.template, cfg.task.on_error
    train_examples, skipped, longest = fit_prompts(train, "train", task, tokenizer, template, context, on_error)
    test_examples, skipped_test, longest_test = fit_prompts(test, "test", task, tokenizer, template, context,
                                                            on_error)
    check_pool(cfg, max(longest, longest_test))

    run_dir = make_run_dir(cfg, ctx)
    if ctx.is_main:
        if ckpt is None:
            cfg.save(run_dir)
        print(f"run folder: {os.path.abspath(run_dir)}" + (f" (resuming from {ckpt})" if ckpt else ""), flush=True)
        if skipped or skipped_test:
            print(f"skipped {skipped} train and {skipped_test} test problems whose prompt leaves no room for a "
                  f"response in the {context}-token context (--task.on_error skip)", flush=True)

    run = assemble_run(cfg, ctx, policy, tokenizer, task, run_dir, ckpt=ckpt, train_examples=train_examples,
                       test_examples=test_examples, start_time=start_time)
    state = restore(run, ckpt) if ckpt is not None else TrainState()
    return run, state


def check_pool(cfg: TrainConfig, longest_prompt: int) -> None:
    """A KV pool of --engine.num_pages pages must hold one sequence of the longest prompt and a
    whole response (more sequences than fit at once are preempted and recomputed, never lost)."""
    pages = cfg.engine.num_pages
    if not pages:   # sized from memory: tens of thousands of tokens
        return
    tokens = longest_prompt + max(cfg.rollout.max_tokens, cfg.eval.max_tokens)
    need = -(-tokens // cfg.engine.page_size)
    if need > pages:
        raise ValueError(f"--engine.num_pages {pages} is too small: the longest prompt ({longest_prompt} tokens) and "
                         f"a whole response need {need} pages of {cfg.engine.page_size} tokens")


def assemble_run(cfg: TrainConfig, ctx: DistContext, policy, tokenizer, task, run_dir: str, *,
                 ckpt: str | None = None, train_examples: list | None = None, test_examples: list | None = None,
                 start_time: float = 0.0) -> Run:
    """A `Run` around a loaded float32 policy on ``ctx.device``: the reference model and critic
    it needs, checkpoint weights (`ckpt`), sharding, the engine, the learners and the logs."""
    engine_dtype, compute_dtype = resolve_dtypes(cfg, ctx.device)
    ref_model = None
    if cfg.ppo.kl_coef > 0:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    value_model = ValueModel.from_policy(policy, head_seed=cfg.seed) if estimator(cfg.algo).needs_critic else None
    if ckpt is not None:
        # weights before sharding and before the engine starts: plain load_state_dict on every rank
        checkpoint.load_checkpoint(ckpt, policy, value_model=value_model, restore_rng=False)
    for m in (policy, value_model):
        if m is not None:
            m.eval()  # no dropout in rollouts or updates: logprobs must match the engine's

    gpu = ctx.device.type == "cuda"
    checkpointing = cfg.dist.activation_checkpointing == "on" or (cfg.dist.activation_checkpointing == "auto" and gpu)
    trained = [m for m in (policy, value_model) if m is not None]
    if checkpointing:
        for m in trained:
            enable_activation_checkpointing(m)
    if ctx.distributed:
        engine_model = copy.deepcopy(policy).to(dtype=engine_dtype).requires_grad_(False)
        for m in trained + ([ref_model] if ref_model is not None else []):
            shard_model(m, ctx.mesh, compute_dtype, cfg.dist.reshard_after_forward)
    else:
        # one process: the engine reads the policy's parameters in place (a copy only when the
        # engine's dtype differs, e.g. bfloat16 sampling of a float32-trained policy on GPU)
        engine_model = policy

    engine = Engine(engine_model, tokenizer, cfg.engine, dtype=engine_dtype, device=ctx.device)

    steps = total_optimizer_steps(cfg.ppo, cfg.rollout.num_prompts * cfg.rollout.num_samples)
    resume_it = checkpoint.read_trainer_state(ckpt).iteration if ckpt is not None else None
    return Run(cfg=cfg, ctx=ctx, policy=Learner.create(policy, cfg.ppo.lr, cfg.ppo, steps),
               critic=Learner.create(value_model, cfg.ppo.value_lr, cfg.ppo, steps) if value_model else None,
               ref_model=ref_model, engine=engine, engine_model=engine_model, tokenizer=tokenizer, task=task,
               train_examples=task.train if train_examples is None else train_examples,
               test_examples=task.test if test_examples is None else test_examples,
               run_dir=run_dir, log=RunLog(run_dir, ctx.is_main, cfg.run.tensorboard, resume_it, log=cfg.log,
                                                    config=cfg.to_dict()),
               compute_dtype=compute_dtype, start_time=start_time)


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(argv)
        if cfg.run.resume:
            cfg = resume_config(cfg, argv)
    except ValueError as exc:  # a bad option or file: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    ctx = init_distributed(cfg.run.device)
    stop = StopRequest()
    run = None
    try:
        with stop_on_signals(stop):
            try:
                run, state = build_run(cfg, ctx, start_time=start)
            except (ValueError, ImportError) as exc:   # bad data or model, or a missing package
                print(f"error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None
            try:
                result = train(run, state, stop)
            finally:
                run.log.close()
        if ctx.is_main:
            acc = result.get("eval/accuracy")
            print(f"done: {state.iteration} iterations, {time.time() - start:.0f}s total"
                  + (f", final test accuracy {acc:.3f}" if acc is not None else "")
                  + f"; run folder {os.path.abspath(run.run_dir)}", flush=True)
            if cfg.preset == DEFAULT_PRESET:
                print("VinePPO against PPO, GRPO and RLOO from the same SFT start, over seeds: "
                      "python bench/compare_algos.py (results: docs/results.md)", flush=True)
        return result
    except (Interrupted, KeyboardInterrupt) as exc:
        name = exc.signal_name if isinstance(exc, Interrupted) else stop.signal_name or "SIGINT"
        _report_stop(f"interrupted by {name}", run, cfg, ctx)
        raise SystemExit(143 if name == "SIGTERM" else 130) from None
    except (TrainingStopped, RewardError) as exc:   # NaN losses, or a reward function that failed
        _report_stop(f"error: {exc}", run, cfg, ctx)
        raise SystemExit(1) from None
    except OSError as exc:   # the run folder is read-only or full, or a file vanished
        where = f"{exc.filename}: " if exc.filename else ""
        _report_stop(f"error: {where}{exc.strerror or exc}", run, cfg, ctx)
        raise SystemExit(1) from None
    finally:
        destroy_distributed(ctx)


@contextmanager
def stop_on_signals(stop: StopRequest):
    """SIGINT: finish the current iteration, checkpoint, then stop (a second SIGINT stops at once).
    SIGTERM: stop at once. Either way the checkpoints already written stay complete."""
    def handle(signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and stop.signal_name is None:
            stop.signal_name = name
            print("\nSIGINT: stopping after this iteration and its checkpoint (press Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)
            return
        stop.signal_name = name
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _report_stop(message: str, run: Run | None, cfg: TrainConfig, ctx: DistContext) -> None:
    """One line on why training stopped, then what is saved and how to continue."""
    if not ctx.is_main:
        return
    print(message, file=sys.stderr, flush=True)
    run_dir = run.run_dir if run is not None else (cfg.run.resume or cfg.run.run_dir)
    latest = checkpoint.latest_checkpoint(run_dir) if run_dir and os.path.isdir(run_dir) else None
    if latest is None:
        print("no checkpoint was written" + (f" in {run_dir}" if run_dir else ""), file=sys.stderr, flush=True)
        return
    it = checkpoint.read_trainer_state(latest).iteration
    print(f"last checkpoint: {latest} (iteration {it}); continue with:\n"
          f"  python -m vineppo.train --resume {run_dir}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
