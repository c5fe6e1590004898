import math

import pytest
import torch

from vineppo.algos import (ESTIMATORS, AdvantageConfig, RolloutBatch, compute_advantages,
                           entropy_from_logits, estimator, kl_k3, kl_penalty, masked_mean, mc_step_values,
                           policy_loss, value_loss, whiten)
from vineppo.learner import PPOConfig

D = torch.float64


def t(x, dtype=D):
    return torch.tensor(x, dtype=dtype)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, atol=tol, rtol=0)


def test_registry_names():
    assert set(ESTIMATORS) == {"vineppo", "ppo", "grpo", "rloo"}
    needs = {n: (e.needs_mc_values, e.needs_critic, e.needs_groups) for n, e in ESTIMATORS.items()}
    assert needs == {"vineppo": (True, False, False), "ppo": (False, True, False),
                     "grpo": (False, False, True), "rloo": (False, False, True)}


# ---- vineppo ---------------------------------------------------------------------------------

def _vine_batch():
    # episode 0: 3 steps of 2 tokens, reward 1; the 4th step value is junk past the end
    # episode 1: steps of 3 and 1 tokens, reward 0, then 2 pad tokens with junk step ids
    return RolloutBatch(
        response_mask=t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
        rewards=t([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
        step_ids=torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 5, 7]]),
        step_values=t([[0.5, 0.25, 0.75, 9.0], [0.4, 0.2, 7.0, 7.0]]),
    )


def test_vineppo_hand_computed_gamma_1():
    adv, ret = ESTIMATORS["vineppo"].advantages(_vine_batch(), AdvantageConfig(whiten=False))
    # ep0: A0 = V1 - V0 = -0.25, A1 = V2 - V1 = 0.5, A2 = 1 + 0 - V2 = 0.25
    # ep1: A0 = V1 - V0 = -0.2, A1 = 0 + 0 - V1 = -0.2
    close(adv, [[-0.25, -0.25, 0.5, 0.5, 0.25, 0.25], [-0.2, -0.2, -0.2, -0.2, 0, 0]])
    # returns = A_t + V(s_t)
    close(ret, [[0.25, 0.25, 0.75, 0.75, 1.0, 1.0], [0.2, 0.2, 0.2, 0.0, 0, 0]])


def test_vineppo_hand_computed_gamma_half():
    adv, _ = ESTIMATORS["vineppo"].advantages(_vine_batch(), AdvantageConfig(gamma=0.5, whiten=False))
    # ep0: A0 = .5*.25 - .5 = -.375, A1 = .5*.75 - .25 = .125, A2 = 1 - .75 = .25
    # ep1: A0 = .5*.2 - .4 = -.3, A1 = -.2
    close(adv, [[-0.375, -0.375, 0.125, 0.125, 0.25, 0.25], [-0.3, -0.3, -0.3, -0.2, 0, 0]])


def test_vineppo_telescopes_on_random_inputs():
    # with gamma = 1 the step advantages of an episode sum to R - V(s_0)
    g = torch.Generator().manual_seed(0)
    E, L, S = 7, 40, 9
    lengths = torch.randint(1, L + 1, (E,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).to(D)
    step_ids = torch.zeros(E, L, dtype=torch.long)
    first_tokens = []
    for e in range(E):
        n = int(lengths[e])
        cuts = sorted(torch.randperm(max(n - 1, 1), generator=g)[: min(S - 1, n - 1)].add(1).tolist())
        sid = torch.zeros(n, dtype=torch.long)
        for c in cuts:
            sid[c:] += 1
        step_ids[e, :n] = sid
        first_tokens.append([0] + cuts)
    values = torch.rand(E, S, generator=g, dtype=D)
    rewards = torch.randint(0, 2, (E,), generator=g).to(D)
    batch = RolloutBatch(mask, rewards, torch.arange(E), step_ids=step_ids, step_values=values)
    adv, ret = ESTIMATORS["vineppo"].advantages(batch, AdvantageConfig(whiten=False))
    for e in range(E):
        step_adv = adv[e, first_tokens[e]]
        assert math.isclose(float(step_adv.sum()), float(rewards[e] - values[e, 0]), abs_tol=1e-12)
        # each step's tokens share one advantage
        for s in range(len(first_tokens[e])):
            sel = (step_ids[e] == s) & (mask[e] > 0)
            assert torch.all(adv[e, sel] == adv[e, sel][0])
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_vineppo_validation():
    b = _vine_batch()
    with pytest.raises(ValueError, match="step_values"):
        ESTIMATORS["vineppo"].advantages(
            RolloutBatch(b.response_mask, b.rewards, b.group_ids, step_ids=b.step_ids),
            AdvantageConfig())
    with pytest.raises(ValueError, match="columns"):
        ESTIMATORS["vineppo"].advantages(
            RolloutBatch(b.response_mask, b.rewards, b.group_ids, step_ids=b.step_ids,
                         step_values=b.step_values[:, :2]), AdvantageConfig())


# ---- ppo / GAE -------------------------------------------------------------------------------

def _gae_batch():
    return RolloutBatch(
        response_mask=t([[1, 1, 1], [1, 1, 0]]),
        rewards=t([1.0, 0.0]),
        group_ids=torch.tensor([0, 1]),
        values=t([[0.5, 0.6, 0.8], [0.3, 0.1, 5.0]]),
    )


def test_gae_lambda_gamma_1_is_return_minus_value():
    adv, ret = ESTIMATORS["ppo"].advantages(_gae_batch(), AdvantageConfig(whiten=False))
    close(adv, [[0.5, 0.4, 0.2], [-0.3, -0.1, 0.0]])
    close(ret, [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])


def test_gae_hand_computed():
    adv, ret = ESTIMATORS["ppo"].advantages(_gae_batch(), AdvantageConfig(gamma=0.9, lam=0.5, whiten=False))
    # ep0 deltas: t2 = 1 - .8 = .2; t1 = .9*.8 - .6 = .12; t0 = .9*.6 - .5 = .04
    #   A2 = .2, A1 = .12 + .45*.2 = .21, A0 = .04 + .45*.21 = .1345
    # ep1 deltas: t1 = -.1; t0 = .9*.1 - .3 = -.21;  A1 = -.1, A0 = -.21 + .45*-.1 = -.255
    close(adv, [[0.1345, 0.21, 0.2], [-0.255, -0.1, 0.0]])
    close(ret, [[0.6345, 0.81, 1.0], [0.045, 0.0, 0.0]])


def test_gae_random_telescopes_and_rejects_left_padding():
    g = torch.Generator().manual_seed(1)
    E, L = 5, 17
    lengths = torch.randint(1, L + 1, (E,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).to(D)
    values = torch.randn(E, L, generator=g, dtype=D)
    rewards = torch.rand(E, generator=g, dtype=D)
    batch = RolloutBatch(mask, rewards, torch.arange(E), values=values)
    adv, ret = ESTIMATORS["ppo"].advantages(batch, AdvantageConfig(whiten=False))
    close(ret, rewards[:, None] * mask, tol=1e-12)
    close(adv, (rewards[:, None] - values) * mask, tol=1e-12)
    with pytest.raises(ValueError, match="right-padded"):
        ESTIMATORS["ppo"].advantages(RolloutBatch(mask.flip(1), rewards, torch.arange(E),
                                                 values=values), AdvantageConfig())
    with pytest.raises(ValueError, match="values"):
        ESTIMATORS["ppo"].advantages(RolloutBatch(mask, rewards, torch.arange(E)), AdvantageConfig())


# ---- grpo / rloo -----------------------------------------------------------------------------

def _group_batch():
    # group 0 (interleaved): rewards 1, 0, 0, 1 ; group 7: rewards 1, 1, 0 ; group 3: 1, 1
    gid = torch.tensor([0, 7, 0, 7, 0, 7, 0, 3, 3])
    r = t([1, 1, 0, 1, 0, 0, 1, 1, 1])
    mask = t([[1, 1, 0]] * 9)
    return RolloutBatch(mask, r, gid)


def test_grpo_hand_computed():
    adv, ret = ESTIMATORS["grpo"].advantages(_group_batch(), AdvantageConfig())
    # group 0: mean .5, unbiased std sqrt(1/3): +-.5 / .57735 = +-.866025
    # group 7: mean 2/3, unbiased std sqrt(1/3): 1/3/.57735 = .57735, -2/3/.57735 = -1.154701
    # group 3: all equal -> 0
    s = math.sqrt(1 / 3) + 1e-6
    expected = [0.5 / s, (1 / 3) / s, -0.5 / s, (1 / 3) / s, -0.5 / s, (-2 / 3) / s, 0.5 / s, 0, 0]
    close(adv[:, 0], expected, tol=1e-9)
    close(adv[:, 1], expected, tol=1e-9)
    assert torch.all(adv[:, 2] == 0)
    close(ret, t([1, 1, 0, 1, 0, 0, 1, 1, 1])[:, None] * t([[1, 1, 0]]))


def test_grpo_without_std():
    adv, _ = ESTIMATORS["grpo"].advantages(_group_batch(), AdvantageConfig(grpo_std_normalize=False))
    close(adv[:, 0], [0.5, 1 / 3, -0.5, 1 / 3, -0.5, -2 / 3, 0.5, 0, 0])


def test_rloo_hand_computed():
    adv, _ = ESTIMATORS["rloo"].advantages(_group_batch(), AdvantageConfig())
    # group 0: r=1 -> 1 - 1/3 = 2/3 ; r=0 -> 0 - 2/3 ; group 7: r=1 -> 1 - .5 ; r=0 -> 0 - 1
    close(adv[:, 0], [2 / 3, 0.5, -2 / 3, 0.5, -2 / 3, -1.0, 2 / 3, 0, 0])
    assert torch.all(adv[:, 2] == 0)


def test_group_baselines_need_two_members():
    b = RolloutBatch(t([[1.0]] * 3), t([1, 0, 1]), torch.tensor([0, 0, 1]))
    for name in ("grpo", "rloo"):
        with pytest.raises(ValueError, match="at least 2"):
            ESTIMATORS[name].advantages(b, AdvantageConfig())


# ---- whitening, config, batch validation -----------------------------------------------------

def test_whiten_hand_computed_and_masked():
    x = t([[1, 2, 3], [4, 100, -100]])
    m = t([[1, 1, 1], [1, 0, 0]])
    # mean 2.5, population var 1.25
    out = whiten(x, m)
    close(out, t([[-1.5, -0.5, 0.5], [1.5, 0, 0]]) / math.sqrt(1.25 + 1e-8))
    out2 = whiten(x, m, shift_mean=False)
    close(out2, (t([[-1.5, -0.5, 0.5], [1.5, 0, 0]]) / math.sqrt(1.25 + 1e-8) + 2.5) * m)
    assert torch.all(whiten(x, torch.zeros_like(m)) == 0)
    with pytest.raises(ValueError):
        whiten(x, m[:, :2])


def test_compute_advantages_whitens():
    b = _vine_batch()
    adv, _ = compute_advantages(b, "vineppo", AdvantageConfig(whiten=True))
    m = b.response_mask
    assert abs(float(masked_mean(adv, m))) < 1e-9
    assert abs(float(masked_mean(adv ** 2, m)) - 1) < 1e-6
    assert torch.all(adv[m == 0] == 0)


def test_config_and_batch_validation():
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        estimator("a2c")
    with pytest.raises(ValueError, match="gamma"):
        AdvantageConfig(gamma=1.5)
    with pytest.raises(ValueError, match="clip_range"):
        PPOConfig(clip_range=0)
    with pytest.raises(ValueError, match="rewards"):
        RolloutBatch(t([[1, 1]]), t([1, 0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="values"):
        RolloutBatch(t([[1, 1]]), t([1]), torch.tensor([0]), values=t([[1, 1, 1]]))
    b = RolloutBatch(torch.tensor([[True, False]]), t([1]), torch.tensor([0]))
    assert b.response_mask.dtype == torch.float32


def test_mc_step_values():
    assert mc_step_values([[1, 0, 1], [0, 0], [1]]) == pytest.approx([2 / 3, 0.0, 1.0])
    with pytest.raises(ValueError, match="no continuation"):
        mc_step_values([[1], []])


# ---- losses ----------------------------------------------------------------------------------

def test_policy_loss_clip_cases():
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1, 50.0]
    adv = t([1.0, 1.0, -1.0, -1.0, 2.0, 3.0])
    mask = t([1, 1, 1, 1, 1, 0])      # the last token is padding with an extreme ratio
    old = t([-1.0, -2.0, -0.5, -3.0, -1.0, -1.0])
    logp = (old + torch.log(t(ratios))).requires_grad_(True)
    loss, stats = policy_loss(logp, old, adv, mask, clip_range=0.2)
    # per token max(-A r, -A clip(r)):
    #   A=+1 r=1.5 -> -1.2 (clipped) ; A=+1 r=.5 -> -.5 ; A=-1 r=1.5 -> 1.5 ; A=-1 r=.5 -> .8 (clipped)
    #   A=+2 r=1.1 -> -2.2
    assert float(loss.detach()) == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5, abs=1e-12)
    assert stats["clip_frac"] == pytest.approx(2 / 5)
    assert stats["ratio_mean"] == pytest.approx(5.1 / 5)
    assert stats["ratio_min"] == pytest.approx(0.5)
    assert stats["ratio_max"] == pytest.approx(1.5)
    k = [(r - 1) - math.log(r) for r in ratios[:5]]
    assert stats["approx_kl"] == pytest.approx(sum(k) / 5)
    loss.backward()
    # clipped tokens pass no gradient; elsewhere d(-A r)/d logp = -A r, divided by 5 tokens
    close(logp.grad, [0.0, -0.5 / 5, 1.5 / 5, 0.0, -2.2 / 5, 0.0], tol=1e-12)


def test_policy_loss_global_token_count():
    old = t([[0.0, 0.0]])
    loss, _ = policy_loss(old.clone(), old, t([[1.0, 3.0]]), t([[1, 1]]), 0.2, num_tokens=8)
    assert float(loss.detach()) == pytest.approx(-4 / 8)
    with pytest.raises(ValueError, match="shape"):
        policy_loss(old, old, t([1.0]), t([[1, 1]]), 0.2)


def test_kl_penalty_values_and_clamp():
    logp = t([-1.0, -2.0, -0.5, -1.0, -3.0])
    ref = t([-1.0, -1.0, -10.0, 11.0, 99.0])
    mask = t([1, 1, 1, 1, 0])
    # d = ref - logp: 0 -> 0 ; 1 -> e - 2 ; -9.5 -> e^-9.5 + 8.5 ; 12 -> e^12 - 13 clamped to 10
    per_token = [0.0, math.e - 2, math.exp(-9.5) + 8.5, 10.0, 10.0]
    close(kl_k3(logp, ref), per_token, tol=1e-9)
    assert float(kl_penalty(logp, ref, mask)) == pytest.approx(sum(per_token[:4]) / 4)
    assert torch.all(kl_k3(logp, logp) == 0)


def test_value_loss_clipping():
    values = t([1.0, 0.5, 0.0]).requires_grad_(True)
    old = t([0.5, 0.45, 0.0])
    returns = t([2.0, 0.3, 4.0])
    mask = t([1, 1, 0])
    loss = value_loss(values, old, returns, mask, clip_range=0.2)
    # token 0: V - V_old = .5 -> clipped to .2, V_clip = .7: max((1-2)^2, (.7-2)^2) = 1.69
    # token 1: inside the clip: (.5 - .3)^2 = .04
    assert float(loss.detach()) == pytest.approx(0.5 * (1.69 + 0.04) / 2, abs=1e-12)
    loss.backward()
    # the clipped branch is constant in V (no gradient); token 1: 0.5 * 2 * 0.2 / 2
    close(values.grad, [0.0, 0.1, 0.0], tol=1e-12)


def test_entropy_from_logits():
    logits = t([[0.0, 0.0], [0.0, math.log(3.0)], [5.0, -1e9]])
    h = entropy_from_logits(logits)
    close(h, [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0], tol=1e-9)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 11, generator=g, dtype=D)
    p = torch.softmax(z, -1)
    close(entropy_from_logits(z), -(p * p.log()).sum(-1), tol=1e-12)
    assert entropy_from_logits(z.to(torch.bfloat16)).dtype == torch.float32
