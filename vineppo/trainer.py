"""The RL training loop: rollouts from the engine, advantages, PPO updates, fresh weights back.

One iteration, in order (the paper's Algorithm 1 for VinePPO; the baselines differ only in the
advantage step):

1. take the next `num_prompts` training prompts (a seeded order, so a resumed run sees the same
   prompts) and this rank's share of them;
2. `collect_rollouts`: N responses per prompt from the engine, graded and split into steps, and,
   for VinePPO, K continuations from every step boundary giving MC values V(s_t);
3. advantages by `ADVANTAGE_ESTIMATORS[algo]` (PPO first asks its value network), whitened over
   all of the iteration's episodes (across ranks);
4. old and reference logprobs of the sampled tokens (logits / sampling temperature);
5. `ppo.epochs` passes of minibatches: PPO-clip loss + kl_coef * k3 KL (+ the clipped value loss
   for PPO), gradient clipping, AdamW with warmup and linear decay;
6. the engine gets the new weights (in place in one process; gathered from the FSDP2 shards
   otherwise) and drops its cached KV.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from vineppo import algos
from vineppo.config import TrainConfig, rollout_kwargs
from vineppo.distributed import DistContext, all_gather_object, all_reduce, copy_full_weights
from vineppo.rollout import position_ids_from_mask
from vinekernels.sampling import derive_seed, kept_log_mass

# Metrics that legitimately differ between two runs of the same config (wall-clock measurements).
TIMING_PREFIXES = ("time/", "wall_clock_s", "throughput/")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many updates with a non-finite loss)."""


# ---------------------------------------------------------------------------------------------
# data order and schedule

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


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """LambdaLR factor: linear warmup over ceil(warmup_ratio * total) steps, then linear decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


# ---------------------------------------------------------------------------------------------
# forward passes over padded episodes

def response_logits(model: nn.Module, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """Logits [B, L, V] predicting response tokens 0..L-1 (columns response_start ..) of each row."""
    L = input_ids.shape[1] - response_start
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, logits_to_keep=L + 1)
    return out.logits[:, :-1]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target], in float32."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sampler_log_mass(logits: torch.Tensor, temperature: float, top_p: float, rows: int = 256) -> torch.Tensor:
    """[B, L]: log of the softmax(logits / temperature) mass the engine's top-p filter keeps at each
    position, in chunks of `rows` positions (the filter sorts a vocabulary-wide row per position)."""
    if top_p >= 1:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    temp = torch.full((n,), float(temperature), device=flat.device)
    p = torch.full((n,), float(top_p), device=flat.device)
    k = torch.zeros(n, dtype=torch.int32, device=flat.device)
    parts = [kept_log_mass(flat[i:i + rows], temp[i:i + rows], k[i:i + rows], p[i:i + rows])
             for i in range(0, n, rows)]
    return torch.cat(parts).reshape(logits.shape[:-1])


def response_values(value_model: nn.Module, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """V(s_t) [B, L]: the critic's output at the last token of prompt + response[:t]."""
    values = value_model(input_ids, attention_mask, position_ids_from_mask(attention_mask))
    return values[:, response_start - 1:-1].float()


@dataclass
class Minibatch:
    """Tensors of some episodes, all on the training device."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    mask: torch.Tensor            # [B, L] response tokens
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def select(self, idx: torch.Tensor) -> "Minibatch":
        def pick(t):
            return None if t is None else t[idx]
        # trim columns past the longest response of the selection: they are padding for all rows
        mask = self.mask[idx]
        keep = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else 1
        cut = self.response_start + keep

        def trim(t):
            return None if t is None else t[idx][:, :keep]
        return Minibatch(self.input_ids[idx][:, :cut], self.attention_mask[idx][:, :cut], self.response_start,
                         mask[:, :keep], trim(self.advantages), trim(self.old_logprobs), trim(self.ref_logprobs),
                         trim(self.old_values), trim(self.returns))


def policy_objective(model: nn.Module, mb: Minibatch, cfg: TrainConfig, num_tokens, scale: float = 1.0,
                     autocast_dtype: torch.dtype | None = None):
    """PPO-clip loss + kl_coef * KL(ref) (+ entropy bonus) of one micro-batch, normalised by the
    token count `num_tokens` of the whole (global) minibatch, times `scale`.

    Returns (loss to backward, stats): summing the losses of every micro-batch on every rank gives
    the minibatch's mean-over-tokens objective (times `scale`).
    """
    p = cfg.ppo
    with _autocast(mb.input_ids.device, autocast_dtype):
        logits = response_logits(model, mb.input_ids, mb.attention_mask, mb.response_start)
    targets = mb.input_ids[:, mb.response_start:]
    logprobs = token_logprobs(logits, targets, cfg.rollout.temperature)
    pg_loss, stats = algos.policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, p.clip_range,
                                       num_tokens=num_tokens)
    loss = pg_loss
    kl = torch.zeros((), device=logprobs.device)
    if mb.ref_logprobs is not None:
        kl = algos.kl_penalty(logprobs, mb.ref_logprobs, mb.mask, num_tokens=num_tokens)
        loss = loss + p.kl_coef * kl
    with torch.set_grad_enabled(p.entropy_coef > 0):
        ent = algos.masked_mean(algos.entropy_from_logits(logits.float() / cfg.rollout.temperature), mb.mask,
                                num_tokens)
    if p.entropy_coef > 0:
        loss = loss - p.entropy_coef * ent
    stats = dict(stats, pg_loss=float(pg_loss.detach()), kl=float(kl.detach()), entropy=float(ent.detach()),
                 loss=float(loss.detach()))
    return loss * scale, stats


def value_objective(value_model: nn.Module, mb: Minibatch, cfg: TrainConfig, num_tokens, scale: float = 1.0,
                    autocast_dtype: torch.dtype | None = None):
    with _autocast(mb.input_ids.device, autocast_dtype):
        values = response_values(value_model, mb.input_ids, mb.attention_mask, mb.response_start)
    loss = cfg.ppo.value_coef * algos.value_loss(values, mb.old_values, mb.returns, mb.mask,
                                                 cfg.ppo.value_clip_range, num_tokens=num_tokens)
    return loss * scale, {"value_loss": float(loss.detach())}


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def batched_forward(fn, n: int, micro_batch_size: int) -> torch.Tensor:
    """torch.cat of fn(slice) over micro-batches of [0, n), right-padding the last dim with 0."""
    parts = [fn(slice(i, min(n, i + micro_batch_size))) for i in range(0, n, micro_batch_size)]
    width = max(p.shape[-1] for p in parts)
    return torch.cat([nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts])


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


# ---------------------------------------------------------------------------------------------
# the trainer

@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resumed run needs (checkpoint `extra`)."""
    iteration: int = 0              # iterations completed (the data position is iteration * num_prompts)
    optimizer_steps: int = 0
    nan_skips: int = 0
    episodes: int = 0               # episodes trained on so far
    train_seconds: float = 0.0      # wall clock of training iterations (eval and checkpoints excluded)
    last_eval_iteration: int = -1
    last_saved_iteration: int = -1


class Trainer:
    """Owns the models, optimizers, engine and run folder of one training run.

    Built by `vineppo.train.build_trainer`; `run()` trains until the iteration or time budget ends.
    """

    def __init__(self, cfg: TrainConfig, ctx: DistContext, *, policy: nn.Module, engine, engine_model: nn.Module,
                 tokenizer, task, ref_model: nn.Module | None, value_model: nn.Module | None,
                 run_dir: str, logger, samples=None, param_dtype: torch.dtype | None = None, start_time: float | None = None):
        self.cfg, self.ctx = cfg, ctx
        self.policy, self.engine, self.engine_model = policy, engine, engine_model
        self.tokenizer, self.task = tokenizer, task
        self.ref_model, self.value_model = ref_model, value_model
        self.run_dir, self.logger, self.samples = run_dir, logger, samples
        self.param_dtype = param_dtype
        self.start_time = time.time() if start_time is None else start_time
        self.device = ctx.device
        self.state = TrainState()
        self.algo_cfg = algos.AlgoConfig(estimator=cfg.algo, gamma=cfg.ppo.gamma, lam=cfg.ppo.lam,
                                         whiten=cfg.ppo.whiten_advantages, clip_range=cfg.ppo.clip_range,
                                         value_clip_range=cfg.ppo.value_clip_range, kl_coef=cfg.ppo.kl_coef)
        episodes = cfg.rollout.num_prompts * cfg.rollout.num_samples
        self.total_steps = cfg.ppo.num_iterations * cfg.ppo.epochs * (episodes // cfg.ppo.minibatch_size)
        self.optimizer, self.scheduler = self._make_optimizer(policy, cfg.ppo.lr)
        self.value_optimizer = self.value_scheduler = None
        if value_model is not None:
            self.value_optimizer, self.value_scheduler = self._make_optimizer(value_model, cfg.ppo.value_lr)
        self.train_examples = task.train[:cfg.task.max_train] if cfg.task.max_train > 0 else task.train
        self.test_examples = task.test[:cfg.eval.limit] if cfg.eval.limit > 0 else task.test
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _make_optimizer(self, model, lr):
        p = self.cfg.ppo
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, betas=(p.adam_beta1, p.adam_beta2), eps=p.adam_eps,
                                weight_decay=p.weight_decay, foreach=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(self.total_steps, p.warmup_ratio))
        return opt, sched

    # -- the loop -----------------------------------------------------------------------------

    def max_iterations(self) -> int:
        cap = self.cfg.run.max_iterations
        return min(cap, self.cfg.ppo.num_iterations) if cap > 0 else self.cfg.ppo.num_iterations

    def run(self) -> dict:
        """Trains until `max_iterations` or the `run.max_minutes` budget; returns the last eval metrics."""
        from tqdm.auto import tqdm

        cfg, ctx = self.cfg, self.ctx
        total = self.max_iterations()
        last_eval: dict = {}
        if self.state.iteration == 0 and cfg.eval.at_start and self.state.last_eval_iteration < 0:
            last_eval = self.evaluate()
            self.state.last_eval_iteration = 0
            self._log(0, dict(last_eval, wall_clock_s=self.state.train_seconds))
            self._print(f"iteration 0: test accuracy {last_eval['eval/accuracy']:.3f} "
                        f"({last_eval['eval/num_problems']} problems, {last_eval['time/eval']:.0f}s)")
        bar = tqdm(total=total, initial=self.state.iteration, desc=f"{cfg.algo} iterations", dynamic_ncols=True,
                   disable=not (cfg.run.progress and ctx.is_main))
        iter_time = 0.0
        eval_time = last_eval.get("time/eval", 0.0)
        try:
            while self.state.iteration < total:
                if self._out_of_time(iter_time, eval_time):
                    self._print(f"stopping after iteration {self.state.iteration}: the time budget "
                                f"(run.max_minutes {cfg.run.max_minutes}, run.max_train_minutes "
                                f"{cfg.run.max_train_minutes}) would be exceeded")
                    break
                it = self.state.iteration
                metrics = self.iteration(it)
                self.state.iteration = it + 1
                iter_time = metrics["time/iteration"]
                self.state.train_seconds += iter_time
                metrics["wall_clock_s"] = self.state.train_seconds
                done = self.state.iteration >= total or self._out_of_time(iter_time, eval_time)
                if (cfg.eval.every and self.state.iteration % cfg.eval.every == 0) or done:
                    last_eval = self.evaluate()
                    eval_time = last_eval["time/eval"]
                    self.state.last_eval_iteration = self.state.iteration
                    metrics.update(last_eval)
                self._log(self.state.iteration, metrics)
                self._print(self._summary(metrics))
                bar.update(1)
                if (cfg.run.save_every and self.state.iteration % cfg.run.save_every == 0) or done:
                    self.save()
        finally:
            bar.close()
        if self.state.last_eval_iteration != self.state.iteration:
            last_eval = self.evaluate()
            self.state.last_eval_iteration = self.state.iteration
            self._log(self.state.iteration, dict(last_eval, wall_clock_s=self.state.train_seconds))
            self._print(f"iteration {self.state.iteration}: test accuracy {last_eval['eval/accuracy']:.3f}")
        if self.state.last_saved_iteration != self.state.iteration:
            self.save()
        return last_eval

    def _out_of_time(self, iter_time: float, eval_time: float) -> bool:
        """True when another iteration (plus the final evaluation) would overrun run.max_minutes
        or run.max_train_minutes."""
        run = self.cfg.run
        if run.max_minutes <= 0 and run.max_train_minutes <= 0:
            return False
        over = False
        if run.max_minutes > 0:
            over = time.time() - self.start_time + iter_time + eval_time > run.max_minutes * 60
        if run.max_train_minutes > 0:
            over = over or self.state.train_seconds + iter_time > run.max_train_minutes * 60
        flag = torch.tensor([float(over)])
        all_reduce(flag, self.ctx, op="max")   # every rank stops at the same iteration
        return bool(flag[0] > 0)

    def _summary(self, m: dict) -> str:
        parts = [f"it {m['iteration'] if 'iteration' in m else self.state.iteration:>4}",
                 f"reward {m['reward/mean']:.3f}", f"kl {m.get('loss/kl', 0.0):.2e}",
                 f"clip {m.get('policy/clip_frac', 0.0):.3f}", f"ent {m.get('policy/entropy', 0.0):.3f}",
                 f"|dlogp| {m['policy/engine_log_ratio_abs_mean']:.1e}",
                 f"gen {m.get('time/generation', 0.0):.1f}s", f"mc {m.get('time/mc_rollouts', 0.0):.1f}s",
                 f"upd {m.get('time/update', 0.0):.1f}s", f"wall {m['wall_clock_s']:.0f}s"]
        if "eval/accuracy" in m:
            parts.append(f"test {m['eval/accuracy']:.3f}")
        return " | ".join(parts)

    # -- one iteration --------------------------------------------------------------------------

    def iteration(self, it: int) -> dict:
        """Runs iteration `it` (0-based) and returns its metrics."""
        cfg, ctx = self.cfg, self.ctx
        from vineppo import rollout

        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        num_prompts = cfg.rollout.num_prompts
        if num_prompts % ctx.world_size:
            raise ValueError(f"rollout.num_prompts ({num_prompts}) must be divisible by the {ctx.world_size} ranks")
        per_rank = num_prompts // ctx.world_size
        idx = prompt_indices(cfg.seed, it * num_prompts, num_prompts, len(self.train_examples))
        examples = [self.train_examples[i] for i in idx[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]]

        # 1-2. rollouts (and MC values)
        rcfg = rollout.RolloutConfig(**rollout_kwargs(cfg, seed=derive_seed(cfg.seed, it, ctx.rank)))
        result = rollout.collect_rollouts(self.engine, self.task, examples, self.tokenizer, rcfg,
                                          estimate_values=(cfg.algo == "vineppo"))
        timings.update({k: float(v) for k, v in result.timings.items()})
        episodes = result.episodes
        input_ids, attention_mask, response_start, batch = rollout.to_rollout_batch(episodes, self.pad_token_id)
        if not isinstance(response_start, int):
            raise ValueError("the trainer needs a common response_start column (left-padded prompts)")
        dev = self.device
        input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
        mask = batch.response_mask.to(dev)
        E = input_ids.shape[0]
        mbs = cfg.ppo.micro_batch_size

        # 3. old / ref logprobs and values, then advantages
        t = time.perf_counter()
        self.policy.eval()
        targets = input_ids[:, response_start:]

        def logprobs_of(model, with_kept_mass=False):
            def fn(s):
                with _autocast(dev, self.param_dtype):
                    logits = response_logits(model, input_ids[s], attention_mask[s], response_start)
                lp = token_logprobs(logits, targets[s], cfg.rollout.temperature)
                if not with_kept_mass:
                    return lp
                return torch.stack([lp, sampler_log_mass(logits, cfg.rollout.temperature, cfg.rollout.top_p)], 1)
            return batched_forward(fn, E, mbs) * (mask[:, None] if with_kept_mass else mask)

        old_logprobs, kept_mass = logprobs_of(self.policy, with_kept_mass=True).unbind(1)
        ref_logprobs = logprobs_of(self.ref_model) if self.ref_model is not None else None
        old_values = None
        if self.value_model is not None:
            def vfn(s):
                with _autocast(dev, self.param_dtype):
                    return response_values(self.value_model, input_ids[s], attention_mask[s], response_start)
            old_values = batched_forward(vfn, E, mbs) * mask
            batch.values = old_values.cpu()
        timings["logprobs"] = time.perf_counter() - t

        advantages, returns = algos.ADVANTAGE_ESTIMATORS[cfg.algo](batch, self.algo_cfg)
        raw_advantages = advantages
        advantages, returns = advantages.to(dev), returns.to(dev)
        if cfg.ppo.whiten_advantages:
            advantages = global_whiten(advantages, mask, ctx)

        # engine vs trainer, before any update: the engine scores a token within the top-p set it
        # sampled from, so the trainer's logprob is renormalised the same way for this comparison
        engine_lp = rollout.pad_right([e.engine_logprobs for e in episodes], 0.0, torch.float32,
                                      width=mask.shape[1]).to(dev)
        log_ratio = (old_logprobs - kept_mass - engine_lp) * mask
        ratio_stats = torch.stack([log_ratio.abs().sum(), mask.sum(), log_ratio.sum(), kept_mass.sum()]).double()
        all_reduce(ratio_stats, ctx)
        ratio_max = log_ratio.abs().max().reshape(1).double()
        all_reduce(ratio_max, ctx, op="max")

        # 5. PPO epochs
        t = time.perf_counter()
        data = Minibatch(input_ids, attention_mask, response_start, mask, advantages, old_logprobs,
                         ref_logprobs, old_values, returns if old_values is not None else None)
        update = self.update(data, it)
        timings["update"] = time.perf_counter() - t

        # 6. weights to the engine
        t = time.perf_counter()
        self.sync_weights()
        timings["weight_sync"] = time.perf_counter() - t

        # metrics (global over ranks)
        rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64)
        lengths = torch.tensor([len(e.response_ids) for e in episodes], dtype=torch.float64)
        steps = torch.tensor([e.num_steps for e in episodes], dtype=torch.float64)
        truncated = torch.tensor([e.finish_reason == "length" for e in episodes], dtype=torch.float64)
        one = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
        sums = torch.stack([rewards.sum(), (rewards ** 2).sum(), lengths.sum(), steps.sum(), truncated.sum(),
                            one(E), one(result.num_generated_tokens), one(result.num_mc_tokens)])
        all_reduce(sums, ctx)
        n_ep = float(sums[5])
        r_mean = float(sums[0]) / n_ep
        self.state.episodes += int(n_ep)
        metrics = {
            "episodes": self.state.episodes,
            "train/grad_steps": self.state.optimizer_steps,
            "reward/mean": r_mean,
            "reward/std": math.sqrt(max(0.0, float(sums[1]) / n_ep - r_mean ** 2)),
            "rollout/response_len_mean": float(sums[2]) / n_ep,
            "rollout/num_steps_mean": float(sums[3]) / n_ep,
            "rollout/truncated_frac": float(sums[4]) / n_ep,
            "tokens/generated": int(sums[6]),
            "tokens/mc": int(sums[7]),
            "policy/engine_ratio_mean": math.exp(float(ratio_stats[2] / ratio_stats[1].clamp(min=1))),
            "policy/engine_log_ratio_abs_mean": float(ratio_stats[0] / ratio_stats[1].clamp(min=1)),
            "policy/engine_ratio_max_abs_log": float(ratio_max[0]),
            "policy/top_p_log_mass_mean": float(ratio_stats[3] / ratio_stats[1].clamp(min=1)),
        }
        raw = raw_advantages.to(dev)
        metrics["advantage/mean"], metrics["advantage/std"] = _masked_global_mean_std(raw, mask, ctx)
        metrics["return/mean"] = _masked_global_mean_std(returns, mask, ctx)[0]
        metrics.update(self._value_stats(episodes, old_values, mask))
        metrics.update(update)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        metrics["optim/skipped_updates"] = self.state.nan_skips
        for k, v in timings.items():
            metrics[f"time/{k}"] = v
        self._write_samples(it, episodes, raw_advantages, batch)
        metrics["time/iteration"] = time.perf_counter() - t_start
        return metrics

    def _value_stats(self, episodes, old_values, mask) -> dict:
        """Mean/std of the state values: MC V(s_t) (vineppo) or the value network (ppo)."""
        ctx = self.ctx
        if old_values is not None:
            mean, std = _masked_global_mean_std(old_values, mask, ctx)
            return {"value/mean": mean, "value/std": std}
        vals = [v for e in episodes for v in (e.step_values or [])]
        s = torch.tensor([sum(vals), sum(v * v for v in vals), float(len(vals))], dtype=torch.float64)
        all_reduce(s, ctx)
        if float(s[2]) == 0:
            return {}
        mean = float(s[0] / s[2])
        return {"value/mean": mean, "value/std": math.sqrt(max(0.0, float(s[1] / s[2]) - mean ** 2)),
                "rollout/num_states": int(s[2])}

    # -- PPO update -----------------------------------------------------------------------------

    def update(self, data: Minibatch, it: int) -> dict:
        """`ppo.epochs` passes over this rank's episodes in minibatches; returns mean stats."""
        cfg, ctx = self.cfg, self.ctx
        E = data.mask.shape[0]
        mb_local = cfg.ppo.minibatch_size // ctx.world_size
        if cfg.ppo.minibatch_size % ctx.world_size or E % mb_local:
            raise ValueError(f"ppo.minibatch_size ({cfg.ppo.minibatch_size}) must split evenly over "
                             f"{ctx.world_size} ranks and divide each rank's {E} episodes")
        self.policy.train()
        if self.value_model is not None:
            self.value_model.train()
        totals: dict[str, float] = {}
        maxima, minima = [], []
        count = 0
        for epoch in range(cfg.ppo.epochs):
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, it, epoch, 7))
            perm = torch.randperm(E, generator=gen).to(data.mask.device)
            for start in range(0, E, mb_local):
                stats = self.optimizer_step(data.select(perm[start:start + mb_local]))
                maxima.append(stats.pop("ratio_max"))
                minima.append(stats.pop("ratio_min"))
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v
                count += 1
        self.policy.eval()
        if self.value_model is not None:
            self.value_model.eval()
        names = {"pg_loss": "loss/policy", "kl": "loss/kl", "value_loss": "loss/value", "loss": "loss/total",
                 "entropy": "policy/entropy", "clip_frac": "policy/clip_frac", "ratio_mean": "policy/ratio_mean",
                 "approx_kl": "policy/approx_kl", "grad_norm": "optim/grad_norm",
                 "value_grad_norm": "optim/value_grad_norm", "skipped": "optim/skipped_this_iteration"}
        out = {names[k]: v / max(count, 1) for k, v in totals.items() if k in names}
        out["optim/skipped_this_iteration"] = totals.get("skipped", 0.0)
        out["policy/ratio_max"] = max(maxima) if maxima else 1.0
        out["policy/ratio_min"] = min(minima) if minima else 1.0
        return out

    def optimizer_step(self, mb: Minibatch) -> dict:
        """One optimizer step on a minibatch (this rank's share), skipped when the loss is not finite."""
        cfg, ctx = self.cfg, self.ctx
        n_tokens = mb.mask.sum().reshape(1).double()
        all_reduce(n_tokens, ctx)
        num_tokens = float(n_tokens[0])
        # FSDP averages gradients over ranks; scaling by world_size turns that into a sum, so the
        # gradient is that of the mean over every rank's tokens.
        scale = float(ctx.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        if self.value_optimizer is not None:
            self.value_optimizer.zero_grad(set_to_none=True)
        stats_sum: dict[str, float] = {}
        local = torch.zeros(3, dtype=torch.float64)    # loss, value loss, nonfinite flag
        B = mb.mask.shape[0]
        mbs = cfg.ppo.micro_batch_size
        ratio_max, ratio_min = -math.inf, math.inf
        for s in range(0, B, mbs):
            micro = mb.select(torch.arange(s, min(B, s + mbs), device=mb.mask.device))
            w = float(micro.mask.sum()) / max(num_tokens, 1.0)      # this micro-batch's share of the tokens
            loss, stats = policy_objective(self.policy, micro, cfg, num_tokens, scale, self.param_dtype)
            if not torch.isfinite(loss):
                local[2] = 1
            else:
                loss.backward()
            local[0] += float(loss.detach()) / scale
            ratio_max, ratio_min = max(ratio_max, stats.pop("ratio_max")), min(ratio_min, stats.pop("ratio_min"))
            for k in ("clip_frac", "ratio_mean", "approx_kl"):
                stats_sum[k] = stats_sum.get(k, 0.0) + stats.pop(k) * w
            if self.value_model is not None:
                vloss, _ = value_objective(self.value_model, micro, cfg, num_tokens, scale, self.param_dtype)
                if not torch.isfinite(vloss):
                    local[2] = 1
                else:
                    vloss.backward()
                local[1] += float(vloss.detach()) / scale
            # pg_loss / kl / entropy are already shares of the minibatch's mean over tokens
            for k in ("pg_loss", "kl", "entropy"):
                stats_sum[k] = stats_sum.get(k, 0.0) + stats[k]
        keys = sorted(stats_sum)
        red = torch.cat([local, torch.tensor([stats_sum[k] for k in keys], dtype=torch.float64)])
        all_reduce(red, ctx)
        rng = torch.tensor([ratio_max, -ratio_min], dtype=torch.float64)
        all_reduce(rng, ctx, op="max")
        out = {k: float(red[3 + i]) for i, k in enumerate(keys)}
        out.update(loss=float(red[0]), ratio_max=float(rng[0]), ratio_min=-float(rng[1]))
        if self.value_model is not None:
            out["value_loss"] = float(red[1])
        grad_norm = self._clip(self.policy)
        if self.value_model is not None:
            out["value_grad_norm"] = self._clip(self.value_model)
        nonfinite = bool(red[2] > 0) or not math.isfinite(grad_norm) or not math.isfinite(out["loss"])
        out["grad_norm"] = grad_norm
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.value_optimizer is not None:
                self.value_optimizer.zero_grad(set_to_none=True)
            self.state.nan_skips += 1
            out["skipped"] = 1.0
            self._print(f"non-finite loss/gradient: update skipped "
                           f"({self.state.nan_skips}/{cfg.run.max_nan_skips} allowed)")
            if self.state.nan_skips >= cfg.run.max_nan_skips:
                raise TrainingStopped(f"stopping: {self.state.nan_skips} updates had a non-finite loss or gradient "
                                      f"(run.max_nan_skips={cfg.run.max_nan_skips}); lower ppo.lr or check the data")
        else:
            self.optimizer.step()
            if self.value_optimizer is not None:
                self.value_optimizer.step()
            self.state.optimizer_steps += 1
            out["skipped"] = 0.0
        # the schedule follows planned steps, so a skipped update does not stretch it (torch warns
        # about a scheduler step without an optimizer step, which is intended here)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            self.scheduler.step()
            if self.value_scheduler is not None:
                self.value_scheduler.step()
        return out

    def _clip(self, model) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.cfg.ppo.grad_clip if self.cfg.ppo.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # -- weights to the engine ------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Hands the updated policy to the engine, which drops every cached KV."""
        if self.engine_model is not self.policy:
            copy_full_weights(self.policy, self.engine_model)
        self.engine.update_weights(self.engine_model)

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Accuracy on the test split (sharded over ranks), as vineppo.evaluate.evaluate reports it."""
        from vineppo.evaluate import evaluate

        cfg, ctx = self.cfg, self.ctx
        n = len(self.test_examples)
        bounds = [n * r // ctx.world_size for r in range(ctx.world_size + 1)]
        mine = self.test_examples[bounds[ctx.rank]:bounds[ctx.rank + 1]]
        t = time.perf_counter()
        res = evaluate(self.engine, self.task, mine, self.tokenizer, n=cfg.eval.n, temperature=cfg.eval.temperature,
                       top_p=cfg.eval.top_p, max_tokens=cfg.eval.max_tokens or cfg.rollout.max_tokens,
                       template=cfg.rollout.template, first_index=bounds[ctx.rank]) if mine else \
            {"accuracy": 0.0, "num_problems": 0}
        parts = all_gather_object({k: v for k, v in res.items() if isinstance(v, (int, float))}, ctx)
        total = sum(p.get("num_problems", 0) for p in parts)
        out = {"num_problems": total, "time/eval": time.perf_counter() - t}
        for key in parts[0]:
            if key != "num_problems":
                out[key] = sum(p[key] * p.get("num_problems", 0) for p in parts) / max(total, 1)
        return {f"eval/{k}" if not k.startswith("time/") else k: v for k, v in out.items()}

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self) -> str | None:
        """Atomic checkpoint of everything a bit-for-bit resume needs (collective under FSDP)."""
        from vineppo import checkpoint

        cfg, ctx = self.cfg, self.ctx
        it = self.state.iteration
        self.state.last_saved_iteration = it
        model_sd = value_sd = None
        opt_state, value_opt_state = self.optimizer, self.value_optimizer
        from vineppo.distributed import full_optimizer_state, full_state_dict

        if ctx.distributed:
            model_sd = {k: v.cpu() for k, v in full_state_dict(self.policy).items()}
            opt_state = full_optimizer_state(self.policy, self.optimizer)
            if self.value_model is not None:
                value_opt_state = full_optimizer_state(self.value_model, self.value_optimizer)
        if self.value_model is not None:
            # the critic is stored as one flat safetensors file of its own state dict, so it loads
            # back with load_state_dict whatever the process layout
            value_sd = {k: v.cpu().clone() for k, v in full_state_dict(self.value_model).items()}
        rng = all_gather_object(checkpoint.capture_rng_state(), ctx)
        path = None
        if ctx.is_main:
            t = time.perf_counter()
            path = checkpoint.save_checkpoint(
                self.run_dir, it, self.engine_model if ctx.distributed else self.policy, opt_state, self.scheduler,
                value_model=_FlatStateDict() if value_sd is not None else None, value_optimizer=value_opt_state,
                value_scheduler=self.value_scheduler, tokenizer=self.tokenizer,
                data_position=it * cfg.rollout.num_prompts, wall_clock_s=self.state.train_seconds,
                config=cfg, extra=dataclasses.asdict(self.state), keep_last=cfg.run.keep_checkpoints,
                model_state_dict=model_sd, value_model_state_dict=value_sd, rng_states=rng)
            self._print(f"checkpoint {path} ({time.perf_counter() - t:.1f}s)")
        from vineppo.distributed import barrier

        barrier(ctx)
        return path

    def restore(self, path: str) -> None:
        """Loads optimizer/scheduler state, RNG and the trainer state of checkpoint `path`.

        Model weights are loaded by the builder before sharding and before the engine starts
        (`vineppo.train.build_trainer`), so the engine serves the resumed weights from the start.
        """
        from vineppo import checkpoint

        ctx = self.ctx
        if ctx.distributed:
            from vineppo.distributed import load_full_optimizer_state

            load_full_optimizer_state(self.policy, self.optimizer, os.path.join(path, "optimizer.pt"))
            if self.value_model is not None:
                load_full_optimizer_state(self.value_model, self.value_optimizer,
                                          os.path.join(path, "value_optimizer.pt"))
            st = checkpoint.load_checkpoint(path, None, None, self.scheduler, value_scheduler=self.value_scheduler,
                                            rank=ctx.rank)
        else:
            st = checkpoint.load_checkpoint(path, None, self.optimizer, self.scheduler,
                                            value_optimizer=self.value_optimizer,
                                            value_scheduler=self.value_scheduler, rank=ctx.rank)
        known = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in st.extra.items() if k in known})
        if self.state.iteration != st.iteration:
            raise ValueError(f"{path}: trainer state says iteration {self.state.iteration}, "
                             f"checkpoint says {st.iteration}")

    # -- logging --------------------------------------------------------------------------------

    def _log(self, iteration: int, metrics: dict) -> None:
        if self.ctx.is_main and self.logger is not None:
            self.logger.log(iteration, metrics)

    def _print(self, text: str) -> None:
        if self.ctx.is_main:
            from tqdm import tqdm

            tqdm.write(text)

    def _write_samples(self, it, episodes, raw_adv, batch) -> None:
        from vineppo.metrics import SampleRecord

        n = self.cfg.run.num_logged_samples
        if n <= 0 or not self.ctx.is_main or self.samples is None:
            return
        records = []
        for i, e in enumerate(episodes[:n]):
            bounds = e.step_offsets + [len(e.response_ids)]
            steps, step_adv = [], []
            for a, b in zip(bounds, bounds[1:]):
                steps.append(self.tokenizer.decode(e.response_ids[a:b], skip_special_tokens=True))
                step_adv.append(float(raw_adv[i, a:b].mean()) if b > a else 0.0)
            records.append(SampleRecord(
                example_id=e.example_id,
                prompt=self.tokenizer.decode(e.prompt_ids, skip_special_tokens=True),
                response=e.text, reward=e.reward, steps=steps, step_values=e.step_values,
                step_advantages=step_adv, finish_reason=e.finish_reason, group_id=e.group_id,
                extra={"step_offsets": e.step_offsets}))
        self.samples.write(it + 1, records)


class _FlatStateDict(nn.Module):
    """Stand-in module for `checkpoint.save_checkpoint`: saved as the state dict passed beside it."""


def _masked_global_mean_std(x: torch.Tensor, mask: torch.Tensor, ctx: DistContext) -> tuple[float, float]:
    x = x.double()
    m = mask.double()
    s = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()])
    all_reduce(s, ctx)
    n = float(s[2].clamp(min=1))
    mean = float(s[0]) / n
    return mean, math.sqrt(max(0.0, float(s[1]) / n - mean ** 2))
