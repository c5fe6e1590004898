"""Advantage estimators and losses: small pure functions over padded tensors.

Every advantage estimator has the signature ``(batch: RolloutBatch, cfg: AdvantageConfig) ->
(advantages [E, L], returns [E, L])`` and is registered by name in ``ESTIMATORS``, with what the
iteration must collect for it (MC values, a critic, groups of two or more samples):

- ``"vineppo"``: A_t = r_t + gamma * V(s_{t+1}) - V(s_t) per reasoning step t, with V the Monte
  Carlo values estimated by the rollout engine; every token of step t takes A_t.
- ``"ppo"``: GAE(gamma, lambda) over tokens with a value network's per-token predictions.
- ``"grpo"``: (r - mean of the group) / (std of the group + eps), broadcast to every token.
- ``"rloo"``: r - mean of the other members of the group, broadcast to every token.

Padding positions (``response_mask == 0``) are zero in every output. Whitening is a separate step
(``whiten``), applied by the trainer over every rank's episodes when ``cfg.whiten`` is set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from vineppo.settings import check_settings, setting


@dataclass
class AdvantageConfig:
    """Settings of the advantage estimators (paper defaults); the `advantage` section of the CLI."""

    gamma: float = setting(1.0, "discount (per step for vineppo, per token for ppo/GAE)", check="[0, 1]")
    lam: float = setting(1.0, "GAE lambda (ppo)", check="[0, 1]")
    whiten: bool = setting(True, "whiten advantages over the iteration's episodes (all ranks) before the "
                           "policy loss")
    grpo_std_normalize: bool = setting(True, "grpo: divide by the group's reward std (off = Dr. GRPO "
                                       "style mean-centering)")
    grpo_eps: float = setting(1e-6, "grpo: added to the group std", check="> 0")

    def __post_init__(self):
        check_settings(self)


@dataclass
class RolloutBatch:
    """One iteration's episodes, padded to ``[E, L]`` over response tokens (right padding)."""

    response_mask: Tensor            # float [E, L], 1 on real response tokens
    rewards: Tensor                  # float [E], terminal reward
    group_ids: Tensor                # int64 [E], episodes of the same prompt share a group id
    step_ids: Tensor | None = None   # int64 [E, L], step index of each token (vineppo)
    step_values: Tensor | None = None  # float [E, S], MC V(s_t) for t < num_steps (vineppo)
    values: Tensor | None = None     # float [E, L], value-network predictions (ppo)

    def __post_init__(self):
        if self.response_mask.dim() != 2:
            raise ValueError(f"response_mask must be [E, L], got shape {tuple(self.response_mask.shape)}")
        if not self.response_mask.is_floating_point():
            self.response_mask = self.response_mask.to(torch.float32)
        E, L = self.response_mask.shape
        if self.rewards.shape != (E,):
            raise ValueError(f"rewards must be [E]={E}, got {tuple(self.rewards.shape)}")
        if self.group_ids.shape != (E,):
            raise ValueError(f"group_ids must be [E]={E}, got {tuple(self.group_ids.shape)}")
        for name in ("step_ids", "values"):
            t = getattr(self, name)
            if t is not None and t.shape != (E, L):
                raise ValueError(f"{name} must be [E, L]=({E}, {L}), got {tuple(t.shape)}")
        if self.step_values is not None and (self.step_values.dim() != 2
                                              or self.step_values.shape[0] != E):
            raise ValueError(f"step_values must be [E, S] with E={E}, "
                             f"got {tuple(self.step_values.shape)}")

    @property
    def num_episodes(self) -> int:
        return self.response_mask.shape[0]


def _check_right_padded(mask: Tensor) -> None:
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("response_mask must be right-padded (ones then zeros in every row)")


def _last_token_index(mask: Tensor) -> Tensor:
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def vineppo_advantages(batch: RolloutBatch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """A_t = r_t + gamma * V(s_{t+1}) - V(s_t), every token of step t taking A_t.

    The number of steps of episode e is ``max(step_ids[e] over real tokens) + 1``; r_t is the
    terminal reward on the last step and 0 before it, and V(terminal) = 0 whatever ``step_values``
    holds past the last step. Returns are A_t + V(s_t) (the MC target of step t).
    """
    if batch.step_ids is None or batch.step_values is None:
        raise ValueError("vineppo needs batch.step_ids and batch.step_values")
    mask = batch.response_mask
    real = mask > 0
    step_ids = torch.where(real, batch.step_ids.long(), torch.zeros_like(batch.step_ids.long()))
    if bool((step_ids < 0).any()):
        raise ValueError("step_ids must be >= 0 on response tokens")
    num_steps = step_ids.amax(dim=1) + 1                         # [E]
    S = batch.step_values.shape[1]
    if bool((num_steps > S).any()):
        raise ValueError(f"step_ids reach step {int(num_steps.max()) - 1} but step_values has only "
                         f"{S} columns")
    values = batch.step_values.to(mask.dtype)
    # one zero column so that s_{t+1} of the last possible step is gatherable; it is overwritten
    # with V(terminal) = 0 below for every episode's own last step anyway
    padded = torch.cat([values, values.new_zeros(values.shape[0], 1)], dim=1)
    v_t = padded.gather(1, step_ids)
    is_last = step_ids == (num_steps - 1).unsqueeze(1)
    v_next = torch.where(is_last, torch.zeros_like(v_t), padded.gather(1, step_ids + 1))
    r_t = torch.where(is_last, batch.rewards.to(mask.dtype).unsqueeze(1), torch.zeros_like(v_t))
    advantages = (r_t + cfg.gamma * v_next - v_t) * mask
    returns = (advantages + v_t) * mask
    return advantages, returns


def gae_advantages(batch: RolloutBatch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """GAE over response tokens; the reward sits on the last response token, V after it is 0."""
    if batch.values is None:
        raise ValueError("ppo (GAE) needs batch.values")
    mask = batch.response_mask
    _check_right_padded(mask)
    E, L = mask.shape
    values = batch.values.to(mask.dtype) * mask
    token_rewards = torch.zeros_like(values)
    has_tokens = mask.sum(dim=1) > 0
    last = _last_token_index(mask)
    token_rewards[torch.arange(E), last] = batch.rewards.to(mask.dtype) * has_tokens
    advantages = torch.zeros_like(values)
    next_adv = values.new_zeros(E)
    next_value = values.new_zeros(E)
    for t in range(L - 1, -1, -1):
        # positions past the end carry mask 0, so next_value / next_adv are 0 beyond the last token
        delta = token_rewards[:, t] + cfg.gamma * next_value - values[:, t]
        adv = (delta + cfg.gamma * cfg.lam * next_adv) * mask[:, t]
        advantages[:, t] = adv
        next_adv, next_value = adv, values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def _group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Dense group index of each episode and the size of each group."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError("group baselines need at least 2 episodes per group (num_samples >= 2)")
    return inverse, counts


def grpo_advantages(batch: RolloutBatch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """(r - group mean) / (group std + eps), std unbiased (Bessel); broadcast over tokens."""
    mask = batch.response_mask
    r = batch.rewards.to(torch.float64)
    inverse, counts = _group_index(batch.group_ids)
    G = counts.numel()
    sums = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
    mean = sums / counts
    centered = r - mean[inverse]
    if cfg.grpo_std_normalize:
        sq = torch.zeros(G, dtype=r.dtype, device=r.device).index_add_(0, inverse, centered ** 2)
        std = (sq / (counts - 1)).sqrt()
        centered = centered / (std[inverse] + cfg.grpo_eps)
    advantages = centered.to(mask.dtype).unsqueeze(1) * mask
    returns = batch.rewards.to(mask.dtype).unsqueeze(1) * mask
    return advantages, returns


def rloo_advantages(batch: RolloutBatch, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """r_i - mean_{j != i, same group} r_j; broadcast over tokens."""
    mask = batch.response_mask
    r = batch.rewards.to(torch.float64)
    inverse, counts = _group_index(batch.group_ids)
    sums = torch.zeros(counts.numel(), dtype=r.dtype, device=r.device).index_add_(0, inverse, r)
    baseline = (sums[inverse] - r) / (counts[inverse] - 1)
    advantages = (r - baseline).to(mask.dtype).unsqueeze(1) * mask
    returns = batch.rewards.to(mask.dtype).unsqueeze(1) * mask
    return advantages, returns


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and what the iteration must collect for it."""

    name: str
    advantages: Callable[[RolloutBatch, AdvantageConfig], tuple[Tensor, Tensor]]
    needs_mc_values: bool = False   # K continuations from every step boundary (VinePPO)
    needs_critic: bool = False      # a value network trained beside the policy (PPO)
    needs_groups: bool = False      # at least two samples per prompt (GRPO, RLOO)


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("vineppo", vineppo_advantages, needs_mc_values=True),
    Estimator("ppo", gae_advantages, needs_critic=True),
    Estimator("grpo", grpo_advantages, needs_groups=True),
    Estimator("rloo", rloo_advantages, needs_groups=True),
)}
ALGOS = tuple(ESTIMATORS)


def estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; choose one of {', '.join(ALGOS)}")
    return ESTIMATORS[name]


def compute_advantages(batch: RolloutBatch, name: str, cfg: AdvantageConfig) -> tuple[Tensor, Tensor]:
    """Run estimator `name`, then whiten the advantages over the batch when ``cfg.whiten``."""
    advantages, returns = estimator(name).advantages(batch, cfg)
    if cfg.whiten:
        advantages = whiten(advantages, batch.response_mask)
    return advantages, returns


def mc_step_values(rewards_per_state: list[list[float]]) -> list[float]:
    """Monte Carlo value of each state: the mean reward of the continuations sampled from it."""
    out = []
    for i, rewards in enumerate(rewards_per_state):
        if len(rewards) == 0:
            raise ValueError(f"state {i} has no continuation rewards")
        out.append(math.fsum(float(r) for r in rewards) / len(rewards))
    return out


# ---- masked reductions and losses -------------------------------------------------------------

def masked_mean(x: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """sum(x * mask) / num_tokens (default: mask.sum()); a global ``num_tokens`` lets several
    minibatches or ranks add up to the mean over all of them."""
    total = (x * mask).sum()
    denom = mask.sum() if num_tokens is None else num_tokens
    if isinstance(denom, Tensor):
        return total / denom.clamp(min=1)
    return total / max(float(denom), 1.0)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the positions where mask is 1 (population variance); 0 elsewhere.

    With ``shift_mean=False`` the mean is added back (scale only)."""
    if x.shape != mask.shape:
        raise ValueError(f"x {tuple(x.shape)} and mask {tuple(mask.shape)} differ in shape")
    mask = mask.to(x.dtype)
    n = mask.sum()
    if float(n) == 0:
        return torch.zeros_like(x)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float, num_tokens: float | Tensor | None = None
                ) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip loss: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    Returns the scalar loss and stats (python floats over real tokens): ``clip_frac`` (fraction of
    tokens where the clipped term is the active one), ``ratio_mean``, ``ratio_min``,
    ``ratio_max`` and ``approx_kl`` (k3 estimate of KL(old || new)).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        real = mask > 0
        n = max(int(real.sum()), 1)
        r = ratio.detach()
        stats = {
            "clip_frac": float(((clipped > unclipped) & real).sum()) / n,
            "ratio_mean": float((r * mask).sum()) / n,
            "ratio_min": float(r[real].min()) if real.any() else 1.0,
            "ratio_max": float(r[real].max()) if real.any() else 1.0,
            "approx_kl": float((((r - 1.0) - log_ratio.detach()) * mask).sum()) / n,
        }
    return loss, stats


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || ref): exp(d) - d - 1 with d = ref - logp, clamped to
    [0, 10] (large values come from rare tokens and would dominate the loss)."""
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = ref_logprobs - logprobs
    return torch.clamp(torch.exp(d) - d - 1.0, min=0.0, max=10.0)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
               num_tokens: float | Tensor | None = None) -> Tensor:
    """Scalar: masked mean over tokens of ``kl_k3`` (the loss adds ``kl_coef`` times this)."""
    _check_same_shape(logprobs=logprobs, mask=mask)
    return masked_mean(kl_k3(logprobs, ref_logprobs), mask.to(logprobs.dtype), num_tokens)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range: float, num_tokens: float | Tensor | None = None) -> Tensor:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clip(V - V_old, -c, c)."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = torch.maximum((values - returns) ** 2, (v_clipped - returns) ** 2)
    return 0.5 * masked_mean(err, mask.to(values.dtype), num_tokens)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dimension: logsumexp(z) - sum(p * z)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # softmax in half precision loses the small probabilities
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)
