"""The PPO update: a learner (model, optimizer, schedule), the losses of a minibatch, and the epochs.

`ppo_update` runs ``cfg.epochs`` passes over one iteration's episodes in shuffled minibatches;
each minibatch is one optimizer step of the policy (and of the critic, for PPO), accumulated over
micro-batches and normalised by the minibatch's token count across every rank, so the gradient is
that of the mean over all the minibatch's tokens whatever the process layout. A step whose loss
or gradient is not finite is skipped (the schedule still advances).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vineppo import algos
from vineppo.distributed import DistContext, all_reduce
from vineppo.engine import derive_seed
from vineppo.scoring import autocast, response_logits, response_values, token_logprobs
from vineppo.settings import check_settings, setting


@dataclass
class PPOConfig:
    """Optimisation and losses of the policy (and the PPO critic); the `ppo` section of the CLI."""

    num_iterations: int = setting(1000, "training iterations (sets the learning-rate schedule's length)",
                                  check=">= 1")
    epochs: int = setting(2, "passes over each iteration's episodes", check=">= 1")
    minibatch_size: int = setting(64, "episodes per optimizer step (all ranks together)", check=">= 1")
    micro_batch_size: int = setting(8, "episodes per forward/backward pass on one rank (gradient "
                                    "accumulation)", check=">= 1")
    lr: float = setting(1e-6, "AdamW peak learning rate of the policy", check="> 0")
    warmup_ratio: float = setting(0.03, "fraction of optimizer steps with linear warmup (then linear decay "
                                  "to 0)", check="[0, 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay", check=">= 0")
    adam_beta1: float = setting(0.9, "AdamW beta1", check="[0, 1)")
    adam_beta2: float = setting(0.999, "AdamW beta2", check="[0, 1)")
    adam_eps: float = setting(1e-8, "AdamW epsilon", check="> 0")
    grad_clip: float = setting(1.0, "max global gradient norm (0 = off)", check=">= 0")
    clip_range: float = setting(0.2, "PPO ratio clip epsilon", check="> 0")
    kl_coef: float = setting(1e-4, "coefficient of the k3 KL to the reference model in the loss (0 = no "
                             "reference model)", check=">= 0")
    entropy_coef: float = setting(0.0, "entropy bonus coefficient", check=">= 0")
    value_lr: float = setting(1e-6, "ppo: AdamW learning rate of the value network", check="> 0")
    value_coef: float = setting(1.0, "ppo: value loss weight", check="> 0")
    value_clip_range: float = setting(0.2, "ppo: clip range of the value loss", check="> 0")

    def __post_init__(self):
        check_settings(self)


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. too many updates with a non-finite loss)."""


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    """LambdaLR factor: linear warmup over ceil(warmup_ratio * total) steps, then linear decay to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


@dataclass
class Learner:
    """A trained model with its AdamW optimizer and warmup + linear-decay schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    @classmethod
    def create(cls, model: nn.Module, lr: float, cfg: PPOConfig, total_steps: int) -> "Learner":
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay, foreach=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, cfg.warmup_ratio))
        return cls(model, optimizer, scheduler)

    def clip_gradients(self, max_norm: float) -> float:
        """Clips the global gradient norm (0 = no clipping) and returns it before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def advance_schedule(self) -> None:
        # the schedule follows planned steps, so a skipped update does not stretch it (torch warns
        # about a scheduler step without an optimizer step, which is intended here)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            self.scheduler.step()


def total_optimizer_steps(cfg: PPOConfig, episodes_per_iteration: int) -> int:
    return cfg.num_iterations * cfg.epochs * (episodes_per_iteration // cfg.minibatch_size)


@dataclass
class Minibatch:
    """Tensors of some episodes, all on the training device, in `vineppo.scoring.pack`'s layout."""
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
        # trim columns past the longest response of the selection: they are padding for all rows
        mask = self.mask[idx]
        keep = int(mask.sum(0).nonzero().max()) + 1 if mask.any() else 1
        cut = self.response_start + keep

        def trim(t):
            return None if t is None else t[idx][:, :keep]
        return Minibatch(self.input_ids[idx][:, :cut], self.attention_mask[idx][:, :cut], self.response_start,
                         mask[:, :keep], trim(self.advantages), trim(self.old_logprobs), trim(self.ref_logprobs),
                         trim(self.old_values), trim(self.returns))


def policy_objective(model: nn.Module, mb: Minibatch, cfg: PPOConfig, temperature: float, num_tokens,
                     scale: float = 1.0, autocast_dtype: torch.dtype | None = None):
    """PPO-clip loss + kl_coef * KL(ref) (+ entropy bonus) of one micro-batch, normalised by the
    token count `num_tokens` of the whole (global) minibatch, times `scale`.

    Returns (loss to backward, stats): summing the losses of every micro-batch on every rank gives
    the minibatch's mean-over-tokens objective (times `scale`).
    """
    with autocast(mb.input_ids.device, autocast_dtype):
        logits = response_logits(model, mb.input_ids, mb.attention_mask, mb.response_start)
    logprobs = token_logprobs(logits, mb.input_ids[:, mb.response_start:], temperature)
    pg_loss, stats = algos.policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, cfg.clip_range,
                                       num_tokens=num_tokens)
    loss = pg_loss
    kl = torch.zeros((), device=logprobs.device)
    if mb.ref_logprobs is not None:
        kl = algos.kl_penalty(logprobs, mb.ref_logprobs, mb.mask, num_tokens=num_tokens)
        loss = loss + cfg.kl_coef * kl
    with torch.set_grad_enabled(cfg.entropy_coef > 0):
        ent = algos.masked_mean(algos.entropy_from_logits(logits.float() / temperature), mb.mask, num_tokens)
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * ent
    stats = dict(stats, pg_loss=float(pg_loss.detach()), kl=float(kl.detach()), entropy=float(ent.detach()),
                 loss=float(loss.detach()))
    return loss * scale, stats


def value_objective(value_model: nn.Module, mb: Minibatch, cfg: PPOConfig, num_tokens, scale: float = 1.0,
                    autocast_dtype: torch.dtype | None = None):
    """value_coef * the clipped value loss of one micro-batch, normalised like `policy_objective`."""
    with autocast(mb.input_ids.device, autocast_dtype):
        values = response_values(value_model, mb.input_ids, mb.attention_mask, mb.response_start)
    loss = cfg.value_coef * algos.value_loss(values, mb.old_values, mb.returns, mb.mask, cfg.value_clip_range,
                                             num_tokens=num_tokens)
    return loss * scale, {"value_loss": float(loss.detach())}


def optimizer_step(policy: Learner, critic: Learner | None, mb: Minibatch, cfg: PPOConfig, temperature: float,
                   ctx: DistContext, autocast_dtype: torch.dtype | None = None) -> dict:
    """One optimizer step on a minibatch (this rank's share); skipped (``stats["skipped"] == 1``)
    when a loss or gradient is not finite. Stats are global over ranks."""
    n_tokens = mb.mask.sum().reshape(1).double()
    all_reduce(n_tokens, ctx)
    num_tokens = float(n_tokens[0])
    # FSDP averages gradients over ranks; scaling by world_size turns that into a sum, so the
    # gradient is that of the mean over every rank's tokens.
    scale = float(ctx.world_size)
    learners = [policy] + ([critic] if critic is not None else [])
    for learner in learners:
        learner.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    local = torch.zeros(3, dtype=torch.float64)    # loss, value loss, nonfinite flag
    B = mb.mask.shape[0]
    ratio_max, ratio_min = -math.inf, math.inf
    for s in range(0, B, cfg.micro_batch_size):
        micro = mb.select(torch.arange(s, min(B, s + cfg.micro_batch_size), device=mb.mask.device))
        share = float(micro.mask.sum()) / max(num_tokens, 1.0)      # this micro-batch's share of the tokens
        loss, stats = policy_objective(policy.model, micro, cfg, temperature, num_tokens, scale, autocast_dtype)
        _backward(loss, local)
        local[0] += float(loss.detach()) / scale
        ratio_max, ratio_min = max(ratio_max, stats.pop("ratio_max")), min(ratio_min, stats.pop("ratio_min"))
        for k in ("clip_frac", "ratio_mean", "approx_kl"):
            sums[k] = sums.get(k, 0.0) + stats.pop(k) * share
        # pg_loss / kl / entropy are already shares of the minibatch's mean over tokens
        for k in ("pg_loss", "kl", "entropy"):
            sums[k] = sums.get(k, 0.0) + stats[k]
        if critic is not None:
            vloss, _ = value_objective(critic.model, micro, cfg, num_tokens, scale, autocast_dtype)
            _backward(vloss, local)
            local[1] += float(vloss.detach()) / scale
    keys = sorted(sums)
    reduced = torch.cat([local, torch.tensor([sums[k] for k in keys], dtype=torch.float64)])
    all_reduce(reduced, ctx)
    extremes = torch.tensor([ratio_max, -ratio_min], dtype=torch.float64)
    all_reduce(extremes, ctx, op="max")
    out = {k: float(reduced[3 + i]) for i, k in enumerate(keys)}
    out.update(loss=float(reduced[0]), ratio_max=float(extremes[0]), ratio_min=-float(extremes[1]))
    out["grad_norm"] = policy.clip_gradients(cfg.grad_clip)
    if critic is not None:
        out["value_loss"] = float(reduced[1])
        out["value_grad_norm"] = critic.clip_gradients(cfg.grad_clip)
    nonfinite = bool(reduced[2] > 0) or not math.isfinite(out["grad_norm"]) or not math.isfinite(out["loss"])
    out["skipped"] = float(nonfinite)
    for learner in learners:
        if nonfinite:
            learner.optimizer.zero_grad(set_to_none=True)
        else:
            learner.optimizer.step()
        learner.advance_schedule()
    return out


def _backward(loss: torch.Tensor, local: torch.Tensor) -> None:
    if torch.isfinite(loss):
        loss.backward()
    else:
        local[2] = 1


# Stats of a step, as the metrics name them (averaged over the iteration's steps).
_METRIC_NAMES = {"pg_loss": "loss/policy", "kl": "loss/kl", "value_loss": "loss/value", "loss": "loss/total",
                 "entropy": "policy/entropy", "clip_frac": "policy/clip_frac", "ratio_mean": "policy/ratio_mean",
                 "approx_kl": "policy/approx_kl", "grad_norm": "optim/grad_norm",
                 "value_grad_norm": "optim/value_grad_norm"}


def ppo_update(policy: Learner, critic: Learner | None, data: Minibatch, cfg: PPOConfig, temperature: float,
               ctx: DistContext, seed: tuple[int, ...], on_skip: Callable[[], None],
               autocast_dtype: torch.dtype | None = None) -> tuple[dict, int]:
    """`cfg.epochs` passes over this rank's episodes in minibatches; epoch e's order comes from
    ``derive_seed(*seed, e, 7)`` (the trainer passes (run seed, iteration)).

    Returns (mean stats under their metric names, optimizer steps taken); `on_skip` is called
    after each skipped step (it may stop training by raising).
    """
    E = data.mask.shape[0]
    per_rank = cfg.minibatch_size // ctx.world_size
    if cfg.minibatch_size % ctx.world_size or E % per_rank:
        raise ValueError(f"ppo.minibatch_size ({cfg.minibatch_size}) must split evenly over "
                         f"{ctx.world_size} ranks and divide each rank's {E} episodes")
    models = [policy.model] + ([critic.model] if critic is not None else [])
    for m in models:
        m.train()
    totals: dict[str, float] = {}
    maxima, minima = [], []
    count = steps = 0
    for epoch in range(cfg.epochs):
        gen = torch.Generator().manual_seed(derive_seed(*seed, epoch, 7))
        perm = torch.randperm(E, generator=gen).to(data.mask.device)
        for start in range(0, E, per_rank):
            stats = optimizer_step(policy, critic, data.select(perm[start:start + per_rank]), cfg, temperature,
                                   ctx, autocast_dtype)
            maxima.append(stats.pop("ratio_max"))
            minima.append(stats.pop("ratio_min"))
            skipped = stats.pop("skipped")
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
            if skipped:
                totals["skipped"] = totals.get("skipped", 0.0) + 1
                on_skip()
            else:
                steps += 1
    for m in models:
        m.eval()
    out = {_METRIC_NAMES[k]: v / max(count, 1) for k, v in totals.items() if k in _METRIC_NAMES}
    out["optim/skipped_this_iteration"] = totals.get("skipped", 0.0)
    out["policy/ratio_max"] = max(maxima) if maxima else 1.0
    out["policy/ratio_min"] = min(minima) if minima else 1.0
    out["optim/lr"] = policy.scheduler.get_last_lr()[0]
    return out, steps
