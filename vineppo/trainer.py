"""The RL training loop: rollouts from the engine, advantages, PPO updates, fresh weights back.

`iteration` is one iteration of the paper's Algorithm 1 for VinePPO, stage by stage; the
baselines differ only in what the estimator needs (a critic for PPO, groups for GRPO/RLOO, MC
values for VinePPO). `train` repeats it until the iteration budget (or an opt-in wall-clock
cap) ends, evaluating and checkpointing on the way. `vineppo.train.build_run` builds the `Run`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from vineppo import algos, checkpoint, metrics, scoring
from vineppo.checkpoint import TrainState
from vineppo.distributed import (DistContext, all_gather_object, all_reduce, barrier, copy_full_weights,
                                 full_optimizer_state, full_state_dict, load_full_optimizer_state)
from vineppo.engine import derive_seed
from vineppo.evaluate import evaluate as evaluate_samples
from vineppo.learner import Learner, Minibatch, TrainingStopped, ppo_update
from vineppo.rollout import collect_rollouts, pad_right, to_rollout_batch
from vineppo.settings import check_settings, setting

POLICY_DIR = "policy"
# Metrics that legitimately differ between two runs of the same config (wall-clock measurements).
TIMING_PREFIXES = ("time/", "wall_clock_s", "throughput/")


@dataclass
class RunConfig:
    """Where a run writes, how long it runs, what it logs; the `run` section of the CLI."""

    name: str = setting("", "run name (default: <preset>-<algo>); the folder is <output_dir>/<name>-<timestamp>")
    output_dir: str = setting("runs", "parent folder of run folders")
    run_dir: str = setting("", "exact run folder (overrides name/output_dir/timestamp)")
    resume: str = setting("", "run folder to continue from its latest checkpoint")
    max_iterations: int = setting(0, "stop after this many iterations in total (0 = ppo.num_iterations)",
                                  check=">= 0")
    max_minutes: float = setting(0.0, "stop when this many minutes of wall clock have passed (0 = no limit)",
                                 check=">= 0")
    max_train_minutes: float = setting(0.0, "stop when this many minutes of training (iterations only, "
                                       "without evaluation and checkpoints: the metrics' wall_clock_s) have "
                                       "passed; equal budgets for comparing algorithms (0 = no limit)",
                                       check=">= 0")
    save_every: int = setting(1, "checkpoint every this many iterations (also at the end; 0 = only at the "
                              "end); a killed run loses the iterations since its last checkpoint", check=">= 0")
    keep_checkpoints: int = setting(2, "keep this many latest checkpoints", check=">= 1")
    max_nan_skips: int = setting(10, "stop after this many skipped updates with a non-finite loss", check=">= 1")
    num_logged_samples: int = setting(4, "episodes per iteration written to samples.jsonl", check=">= 0")
    tensorboard: bool = setting(True, "also write TensorBoard event files")
    progress: bool = setting(True, "show progress bars")
    device: str = setting("", "device (default: cuda when available, else cpu)")
    threads: int = setting(0, "torch CPU threads (0 = torch's default)", check=">= 0")

    def __post_init__(self):
        check_settings(self)


@dataclass
class Run:
    """The pieces of one training run, built by `vineppo.train.build_run`."""

    cfg: "vineppo.config.TrainConfig"  # noqa: F821
    ctx: DistContext
    policy: Learner
    critic: Learner | None           # PPO's value network
    ref_model: nn.Module | None      # the initial policy, for the KL term (kl_coef > 0)
    engine: "vineppo.engine.Engine"  # noqa: F821
    engine_model: nn.Module          # the weights the engine reads: the policy itself in one process
    tokenizer: object
    task: object
    train_examples: list
    test_examples: list
    run_dir: str
    log: metrics.RunLog
    compute_dtype: torch.dtype | None = None   # mixed precision of the training forward passes
    start_time: float = 0.0


# ---------------------------------------------------------------------------------------------
# one iteration

def iteration(run: Run, state: TrainState) -> dict:
    """Runs iteration `state.iteration` (0-based) and returns its metrics, global over ranks."""
    cfg, ctx, it = run.cfg, run.ctx, state.iteration
    estimator = algos.estimator(cfg.algo)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    # 1. this rank's share of the iteration's prompts
    examples = iteration_prompts(run, it)
    run.task.grader_stats()   # start the grading counts afresh (evaluation reads its own)
    # 2. N responses per prompt, graded and split into steps; for VinePPO, K continuations from
    #    every step boundary give the Monte Carlo values V(s_t)
    result = collect_rollouts(run.engine, run.task, examples, run.tokenizer, cfg.rollout,
                              seed=derive_seed(cfg.seed, it, ctx.rank), estimate_values=estimator.needs_mc_values)
    timings.update(result.timings)
    packed, batch = to_rollout_batch(result.episodes, pad_token_id(run.tokenizer))
    packed, mask = packed.to(ctx.device), batch.response_mask.to(ctx.device)
    # 3. the sampling policy's logprobs; for PPO, the critic's V(s_t)
    with _timed(timings, "logprobs"):
        old_logprobs, kept_mass = scoring.sampled_logprobs(
            run.policy.model, packed, cfg.rollout.temperature, cfg.rollout.top_p, cfg.ppo.micro_batch_size,
            run.compute_dtype)
        if run.critic is not None:
            batch.values = (scoring.values(run.critic.model, packed, cfg.ppo.micro_batch_size, run.compute_dtype)
                            * mask).cpu()
    # 4. advantages, whitened over every rank's episodes
    raw_advantages, returns = (t.to(ctx.device) for t in estimator.advantages(batch, cfg.advantage))
    advantages = global_whiten(raw_advantages, mask, ctx) if cfg.advantage.whiten else raw_advantages
    # 5. the reference policy's logprobs, for the KL term
    ref_logprobs = None
    with _timed(timings, "logprobs"):
        if run.ref_model is not None:
            ref_logprobs = scoring.logprobs(run.ref_model, packed, cfg.rollout.temperature,
                                            cfg.ppo.micro_batch_size, run.compute_dtype)
    agreement = engine_agreement(result.episodes, old_logprobs, kept_mass, mask, ctx)
    # 6. PPO epochs over minibatches
    values = batch.values.to(ctx.device) if batch.values is not None else None
    data = Minibatch(packed.input_ids, packed.attention_mask, packed.response_start, mask, advantages,
                     old_logprobs, ref_logprobs, values, returns if values is not None else None)
    with _timed(timings, "update"):
        update, steps = ppo_update(run.policy, run.critic, data, cfg.ppo, cfg.rollout.temperature, ctx,
                                   seed=(cfg.seed, it), on_skip=lambda: _skipped_update(run, state),
                                   autocast_dtype=run.compute_dtype)
    state.optimizer_steps += steps
    # 7. the new weights to the engine
    with _timed(timings, "weight_sync"):
        sync_weights(run)

    out = metrics.iteration_metrics(result, run.task.grader_stats(), raw_advantages, returns, values, mask, ctx)
    state.episodes += out["episodes"]
    out.update(agreement)
    out.update(update)
    out.update({"episodes": state.episodes, "train/grad_steps": state.optimizer_steps,
                "optim/skipped_updates": state.nan_skips})
    out.update({f"time/{k}": v for k, v in timings.items()})
    run.log.samples(it + 1, result.episodes, raw_advantages, run.tokenizer, cfg.run.num_logged_samples)
    if out["grader/timed_out"]:
        run.log.print(f"iteration {it + 1}: {out['grader/timed_out']} of {out['grader/graded']} gradings ran out "
                      f"of the grader's budget twice and scored 0")
    out["time/iteration"] = time.perf_counter() - start
    return out


def iteration_prompts(run: Run, it: int) -> list:
    """This rank's share of iteration `it`'s `rollout.num_prompts` training prompts."""
    n, ctx = run.cfg.rollout.num_prompts, run.ctx
    if n % ctx.world_size:
        raise ValueError(f"rollout.num_prompts ({n}) must be divisible by the {ctx.world_size} ranks")
    per_rank = n // ctx.world_size
    idx = prompt_indices(run.cfg.seed, it * n, n, len(run.train_examples))
    return [run.train_examples[i] for i in idx[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]]


def prompt_indices(seed: int, position: int, count: int, num_examples: int) -> list[int]:
    """Indices of the training prompts at positions [position, position + count) of the stream.

    The stream is a fresh seeded permutation of the dataset per epoch, so the prompts of any
    iteration depend only on (seed, position): nothing but the position needs saving to resume.
    """
    if num_examples <= 0:
        raise ValueError("the training split is empty")
    out, cache = [], {}
    for p in range(position, position + count):
        epoch, i = divmod(p, num_examples)
        if epoch not in cache:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(num_examples, generator=gen).tolist()
        out.append(cache[epoch][i])
    return out


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def global_whiten(x: torch.Tensor, mask: torch.Tensor, ctx: DistContext, eps: float = 1e-8) -> torch.Tensor:
    """`algos.whiten` over the episodes of every rank (population variance), 0 on padding."""
    if not ctx.distributed:
        return algos.whiten(x, mask, eps=eps)
    mask = mask.to(x.dtype)
    s = torch.stack([(x * mask).sum(), mask.sum()]).double()
    all_reduce(s, ctx)
    mean = (s[0] / s[1].clamp(min=1)).to(x.dtype)
    sq = (((x - mean) * mask) ** 2).sum().double().reshape(1)
    all_reduce(sq, ctx)
    var = (sq[0] / s[1].clamp(min=1)).to(x.dtype)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def engine_agreement(episodes, old_logprobs, kept_mass, mask, ctx: DistContext) -> dict:
    """How closely the trainer scores the sampled tokens as the engine did, before any update.

    The engine scores a token within the top-p set it sampled from, so the trainer's logprob is
    renormalised over the same set (minus the log of the kept mass) for this comparison."""
    engine_lp = pad_right([e.engine_logprobs for e in episodes], 0.0, torch.float32, width=mask.shape[1])
    log_ratio = (old_logprobs - kept_mass - engine_lp.to(mask.device)) * mask
    sums = torch.stack([log_ratio.abs().sum(), mask.sum(), log_ratio.sum(), kept_mass.sum()]).double()
    all_reduce(sums, ctx)
    largest = log_ratio.abs().max().reshape(1).double()
    all_reduce(largest, ctx, op="max")
    n = sums[1].clamp(min=1)
    return {"policy/engine_ratio_mean": math.exp(float(sums[2] / n)),
            "policy/engine_log_ratio_abs_mean": float(sums[0] / n),
            "policy/engine_ratio_max_abs_log": float(largest[0]),
            "policy/top_p_log_mass_mean": float(sums[3] / n)}


def sync_weights(run: Run) -> None:
    """Hands the updated policy to the engine, which drops every cached KV."""
    if run.engine_model is not run.policy.model:
        copy_full_weights(run.policy.model, run.engine_model)
    run.engine.update_weights(run.engine_model)


def _skipped_update(run: Run, state: TrainState) -> None:
    state.nan_skips += 1
    limit = run.cfg.run.max_nan_skips
    run.log.print(f"non-finite loss/gradient: update skipped ({state.nan_skips}/{limit} allowed)")
    if state.nan_skips >= limit:
        raise TrainingStopped(f"stopping: {state.nan_skips} updates had a non-finite loss or gradient "
                              f"(run.max_nan_skips={limit}); lower ppo.lr or check the data")


@contextmanager
def _timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the loop

def max_iterations(cfg) -> int:
    cap = cfg.run.max_iterations
    return min(cap, cfg.ppo.num_iterations) if cap > 0 else cfg.ppo.num_iterations


class Interrupted(Exception):
    """Training stopped on a signal; the run folder holds every checkpoint written before it."""

    def __init__(self, signal_name: str, iteration: int):
        super().__init__(f"{signal_name} after iteration {iteration}")
        self.signal_name, self.iteration = signal_name, iteration


@dataclass
class StopRequest:
    """Set by a signal handler (see `vineppo.train`): the loop stops after the current iteration."""
    signal_name: str | None = None


def train(run: Run, state: TrainState, stop: StopRequest | None = None) -> dict:
    """Trains until `max_iterations` or an opt-in wall-clock cap; returns the last eval metrics.

    When `stop` is set during an iteration, the loop checkpoints after it and raises `Interrupted`."""
    cfg, ctx = run.cfg, run.ctx
    total = max_iterations(cfg)
    last_eval: dict = {}
    if state.iteration == 0 and cfg.eval.at_start and state.last_eval_iteration < 0:
        last_eval = evaluate(run)
        state.last_eval_iteration = 0
        run.log.log(0, dict(last_eval, wall_clock_s=state.train_seconds))
        run.log.print(f"iteration 0: test accuracy {last_eval['eval/accuracy']:.3f} "
                      f"({last_eval['eval/num_problems']} problems, {last_eval['time/eval']:.0f}s)")
    bar = tqdm(total=total, initial=state.iteration, desc=f"{cfg.algo} iterations", dynamic_ncols=True,
               disable=not (cfg.run.progress and ctx.is_main))
    iter_time = 0.0
    eval_time = last_eval.get("time/eval", 0.0)
    try:
        while state.iteration < total:
            if _out_of_time(run, state, iter_time, eval_time):
                run.log.print(f"stopping after iteration {state.iteration}: the time budget (run.max_minutes "
                              f"{cfg.run.max_minutes}, run.max_train_minutes {cfg.run.max_train_minutes}) "
                              f"would be exceeded")
                break
            out = iteration(run, state)
            state.iteration += 1
            iter_time = out["time/iteration"]
            state.train_seconds += iter_time
            out["wall_clock_s"] = state.train_seconds
            done = state.iteration >= total or _out_of_time(run, state, iter_time, eval_time)
            if (cfg.eval.every and state.iteration % cfg.eval.every == 0) or done:
                last_eval = evaluate(run)
                eval_time = last_eval["time/eval"]
                state.last_eval_iteration = state.iteration
                out.update(last_eval)
            run.log.log(state.iteration, out)
            run.log.print(metrics.summary_line(state.iteration, out))
            bar.update(1)
            stopping = _stop_requested(run, stop)
            if (cfg.run.save_every and state.iteration % cfg.run.save_every == 0) or done or stopping:
                save(run, state)
            if stopping:
                raise Interrupted(stop.signal_name, state.iteration)
    finally:
        bar.close()
    if state.last_eval_iteration != state.iteration:
        last_eval = evaluate(run)
        state.last_eval_iteration = state.iteration
        run.log.log(state.iteration, dict(last_eval, wall_clock_s=state.train_seconds))
        run.log.print(f"iteration {state.iteration}: test accuracy {last_eval['eval/accuracy']:.3f}")
    if state.last_saved_iteration != state.iteration:
        save(run, state)
    if run.ctx.is_main:
        path = publish_policy(run.run_dir)
        run.log.print(f"final policy: {path} (AutoModelForCausalLM.from_pretrained loads it, tokenizer beside it)")
    return last_eval


def publish_policy(run_dir: str) -> str:
    """``<run_dir>/policy``: the latest checkpoint's model folder (weights and tokenizer), hard-linked
    where the filesystem allows, so it costs no space beside the checkpoint it comes from."""
    source = os.path.join(checkpoint.latest_checkpoint(run_dir), "model")
    target = os.path.join(run_dir, POLICY_DIR)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(source):
        try:
            os.link(os.path.join(source, name), os.path.join(tmp, name))
        except OSError:
            shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _stop_requested(run: Run, stop: StopRequest | None) -> bool:
    flag = torch.tensor([float(stop is not None and stop.signal_name is not None)])
    all_reduce(flag, run.ctx, op="max")   # every rank stops at the same iteration
    if flag[0] > 0 and stop is not None and stop.signal_name is None:
        stop.signal_name = "a signal on another rank"
    return bool(flag[0] > 0)


def _out_of_time(run: Run, state: TrainState, iter_time: float, eval_time: float) -> bool:
    """True when another iteration (plus the final evaluation) would overrun run.max_minutes
    or run.max_train_minutes."""
    budget = run.cfg.run
    if budget.max_minutes <= 0 and budget.max_train_minutes <= 0:
        return False
    over = False
    if budget.max_minutes > 0:
        over = time.time() - run.start_time + iter_time + eval_time > budget.max_minutes * 60
    if budget.max_train_minutes > 0:
        over = over or state.train_seconds + iter_time > budget.max_train_minutes * 60
    flag = torch.tensor([float(over)])
    all_reduce(flag, run.ctx, op="max")   # every rank stops at the same iteration
    return bool(flag[0] > 0)


def evaluate(run: Run) -> dict:
    """Accuracy on the test split (sharded over ranks), as vineppo.evaluate.evaluate reports it."""
    cfg, ctx = run.cfg, run.ctx
    n = len(run.test_examples)
    bounds = [n * r // ctx.world_size for r in range(ctx.world_size + 1)]
    mine = run.test_examples[bounds[ctx.rank]:bounds[ctx.rank + 1]]
    start = time.perf_counter()
    res = {"accuracy": 0.0, "num_problems": 0}
    if mine:
        res = evaluate_samples(run.engine, run.task, mine, run.tokenizer, n=cfg.eval.n,
                               temperature=cfg.eval.temperature, top_p=cfg.eval.top_p,
                               max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens,
                               template=cfg.rollout.template, first_index=bounds[ctx.rank])
    counts = run.task.grader_stats()
    parts = all_gather_object({k: v for k, v in res.items() if isinstance(v, (int, float))}, ctx)
    total = sum(p.get("num_problems", 0) for p in parts)
    out = {"num_problems": total, "time/eval": time.perf_counter() - start}
    for key in parts[0]:
        if key != "num_problems":
            out[key] = sum(p[key] * p.get("num_problems", 0) for p in parts) / max(total, 1)
    out["grader_timed_out"] = sum(all_gather_object(counts.timed_out, ctx))
    return {f"eval/{k}" if not k.startswith("time/") else k: v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# checkpoints

def save(run: Run, state: TrainState) -> str | None:
    """Atomic checkpoint of everything a bit-for-bit resume needs (collective under FSDP)."""
    ctx, policy, critic = run.ctx, run.policy, run.critic
    state.last_saved_iteration = state.iteration
    model_sd = critic_sd = None
    opt_state = policy.optimizer
    critic_opt_state = critic.optimizer if critic is not None else None
    if ctx.distributed:
        model_sd = {k: v.cpu() for k, v in full_state_dict(policy.model).items()}
        opt_state = full_optimizer_state(policy.model, policy.optimizer)
        if critic is not None:
            critic_opt_state = full_optimizer_state(critic.model, critic.optimizer)
    if critic is not None:
        # the critic is stored as one flat safetensors file of its own state dict, so it loads
        # back with load_state_dict whatever the process layout
        critic_sd = {k: v.cpu().clone() for k, v in full_state_dict(critic.model).items()}
    rng = all_gather_object(checkpoint.capture_rng_state(), ctx)
    path = None
    if ctx.is_main:
        start = time.perf_counter()
        path = checkpoint.save_checkpoint(
            run.run_dir, state, run.engine_model if ctx.distributed else policy.model, opt_state,
            policy.scheduler, value_model=_FlatStateDict() if critic is not None else None,
            value_optimizer=critic_opt_state, value_scheduler=critic.scheduler if critic is not None else None,
            tokenizer=run.tokenizer, config=run.cfg, keep_last=run.cfg.run.keep_checkpoints,
            model_state_dict=model_sd, value_model_state_dict=critic_sd, rng_states=rng)
        run.log.print(f"checkpoint {path} ({time.perf_counter() - start:.1f}s)")
    barrier(ctx)
    return path


def restore(run: Run, path: str) -> TrainState:
    """Loads optimizer/scheduler state and RNG of checkpoint `path`; returns its TrainState.

    Model weights are loaded by the builder before sharding and before the engine starts
    (`vineppo.train.build_run`), so the engine serves the resumed weights from the start.
    """
    ctx, policy, critic = run.ctx, run.policy, run.critic
    critic_scheduler = critic.scheduler if critic is not None else None
    if ctx.distributed:
        load_full_optimizer_state(policy.model, policy.optimizer, os.path.join(path, "optimizer.pt"))
        if critic is not None:
            load_full_optimizer_state(critic.model, critic.optimizer, os.path.join(path, "value_optimizer.pt"))
        return checkpoint.load_checkpoint(path, None, None, policy.scheduler, value_scheduler=critic_scheduler,
                                          rank=ctx.rank)
    return checkpoint.load_checkpoint(path, None, policy.optimizer, policy.scheduler,
                                      value_optimizer=critic.optimizer if critic is not None else None,
                                      value_scheduler=critic_scheduler, rank=ctx.rank)


class _FlatStateDict(nn.Module):
    """Stand-in module for `checkpoint.save_checkpoint`: saved as the state dict passed beside it."""

