"""Rollout collection end to end: a briefly fine-tuned tiny Llama, the synthetic task, the engine."""

import pytest
import torch

from vineppo.algos import ESTIMATORS, AdvantageConfig
from vineppo.engine import Engine, EngineConfig, SamplingParams, branch_seed, derive_seed, sample_seed
from vineppo.rollout import (Episode, RolloutConfig, collect_rollouts, decode_response, score,
                             step_ids_of, to_rollout_batch)
from vineppo.scoring import position_ids_from_mask
from vineppo.tasks import prompt_ids, step_token_offsets


@pytest.fixture(scope="module")
def policy(short_sft):
    return short_sft.model, short_sft.tokenizer


@pytest.fixture(scope="module")
def task(short_sft):
    return short_sft.task


def _engine(model, tokenizer):
    return Engine(model, tokenizer, EngineConfig(num_pages=512, page_size=8))


CFG = dict(num_samples=3, mc_rollouts=4, max_steps=3, temperature=0.7, top_p=0.95, max_tokens=40)
SEED = 11


def test_collect_rollouts_with_values(policy, task):
    model, tokenizer = policy
    engine = _engine(model, tokenizer)
    examples = task.test[:8]
    cfg = RolloutConfig(**CFG)
    result = collect_rollouts(engine, task, examples, tokenizer, cfg, seed=SEED, estimate_values=True)

    assert engine.num_free_pages == engine.num_pages  # every kept sequence released
    assert len(result.episodes) == len(examples) * cfg.num_samples
    assert result.num_generated_tokens == sum(len(e.response_ids) for e in result.episodes)
    assert result.num_mc_tokens > 0
    assert set(result.timings) >= {"generation", "mc_rollouts"}
    rewards = [e.reward for e in result.episodes]
    assert set(rewards) <= {0.0, 1.0}
    multi_step = 0
    for i, e in enumerate(result.episodes):
        ex = examples[e.group_id]
        assert e.group_id == i // cfg.num_samples and e.example_id == ex.id
        assert e.prompt_ids == prompt_ids(task, ex, tokenizer, "plain")
        assert len(e.engine_logprobs) == len(e.response_ids) > 0
        assert all(lp <= 1e-6 for lp in e.engine_logprobs)
        assert e.text == decode_response(tokenizer, e.response_ids)
        assert e.reward == score(task, e.text, ex, e.finish_reason)
        # step offsets: start at 0, strictly increasing, inside the response, capped
        assert e.step_offsets[0] == 0 and len(e.step_offsets) <= cfg.max_steps
        assert all(a < b for a, b in zip(e.step_offsets, e.step_offsets[1:]))
        assert e.step_offsets[-1] < len(e.response_ids)
        # each boundary is a boundary of the task's own steps
        full = step_token_offsets(tokenizer, e.response_ids, task.split_steps(e.text))
        assert set(e.step_offsets) <= set(full) | {0}
        multi_step += len(e.step_offsets) > 1
        assert len(e.step_values) == len(e.step_offsets)
        for v in e.step_values:
            assert 0.0 <= v <= 1.0 and (v * cfg.mc_rollouts) == pytest.approx(round(v * cfg.mc_rollouts))
    assert multi_step >= len(result.episodes) // 4, "the fine-tuned model should write several steps"
    # the model is neither always right nor always wrong, so the values carry information
    values = [v for e in result.episodes for v in e.step_values]
    assert 0.0 < sum(values) / len(values) < 1.0


def test_values_equal_fresh_generation_from_each_prefix(policy, task):
    """V(s_t) recomputed by re-prefilling prompt + response[:t] and sampling with the branch seed."""
    model, tokenizer = policy
    engine = _engine(model, tokenizer)
    examples = task.test[4:6]
    cfg = RolloutConfig(**CFG)
    result = collect_rollouts(engine, task, examples, tokenizer, cfg, seed=SEED, estimate_values=True)
    checked = 0
    for i, e in enumerate(result.episodes):
        prompt_seed = derive_seed(SEED, e.group_id)      # every prompt samples its own stream
        trajectory_seed = sample_seed(prompt_seed, i % cfg.num_samples)
        # the recorded trajectory itself is what the seed gives
        again = engine.generate([e.prompt_ids], SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=prompt_seed,
            n=cfg.num_samples))[0][i % cfg.num_samples]
        assert again.token_ids == e.response_ids
        ex = examples[e.group_id]
        for t, value in zip(e.step_offsets, e.step_values):
            params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                    max_tokens=cfg.max_tokens - t, n=cfg.mc_rollouts,
                                    seed=branch_seed(SEED, trajectory_seed, t))
            conts = engine.generate([e.prompt_ids + e.response_ids[:t]], params)[0]
            rewards = [score(task, decode_response(tokenizer, e.response_ids[:t] + c.token_ids), ex,
                             c.finish_reason) for c in conts]
            assert value == pytest.approx(sum(rewards) / len(rewards))
            checked += 1
    assert checked > len(result.episodes)
    assert engine.num_free_pages == engine.num_pages


def test_every_prompt_samples_its_own_stream(policy, task):
    """With one request seed for all prompts, sample j of a repeated prompt would repeat exactly."""
    model, tokenizer = policy
    cfg = RolloutConfig(**dict(CFG, num_samples=4, temperature=1.0, top_p=1.0))
    result = collect_rollouts(_engine(model, tokenizer), task, [task.test[0]] * 3, tokenizer, cfg,
                              seed=SEED, estimate_values=False)
    groups = [[tuple(e.response_ids) for e in result.episodes if e.group_id == g] for g in range(3)]
    assert groups[0] != groups[1] and groups[1] != groups[2]


def test_collect_without_values_keeps_nothing(policy, task):
    model, tokenizer = policy
    engine = _engine(model, tokenizer)
    cfg = RolloutConfig(**dict(CFG, num_samples=2))
    result = collect_rollouts(engine, task, task.test[:3], tokenizer, cfg, seed=SEED, estimate_values=False)
    assert all(e.step_values is None for e in result.episodes)
    assert result.num_mc_tokens == 0 and engine.num_free_pages == engine.num_pages
    _, batch = to_rollout_batch(result.episodes, tokenizer.pad_token_id)
    assert batch.step_values is None


def test_pages_released_when_grading_fails(policy, task):
    model, tokenizer = policy
    engine = _engine(model, tokenizer)

    class Broken:
        def __getattr__(self, name):
            return getattr(task, name)

        def split_steps(self, response, max_steps=None):
            raise RuntimeError("splitter failed")

    with pytest.raises(RuntimeError, match="splitter failed"):
        collect_rollouts(engine, Broken(), task.test[:2], tokenizer, RolloutConfig(**CFG), seed=SEED, estimate_values=True)
    assert engine.num_free_pages == engine.num_pages


def _episode(prompt, response, offsets, values, reward=1.0, group=0):
    return Episode(example_id="x", group_id=group, prompt_ids=prompt, response_ids=response,
                   engine_logprobs=[-0.5] * len(response), finish_reason="stop", text="", reward=reward,
                   step_offsets=offsets, step_values=values)


def test_to_rollout_batch_layout():
    episodes = [
        _episode([5, 6, 7], [10, 11, 12, 13, 14], [0, 2, 4], [0.5, 0.25, 1.0], reward=1.0, group=0),
        _episode([8], [20, 21], [0], [0.75], reward=0.0, group=0),
        _episode([9, 9], [30, 31, 32], [0, 1], [0.0, 0.5], reward=0.0, group=1),
    ]
    packed, batch = to_rollout_batch(episodes, pad_token_id=0)
    input_ids, attention_mask, start = packed.input_ids, packed.attention_mask, packed.response_start
    assert start == 3 and input_ids.shape == (3, 8) and attention_mask.shape == (3, 8)
    assert input_ids[1].tolist() == [0, 0, 8, 20, 21, 0, 0, 0]
    assert attention_mask[1].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert input_ids[0].tolist() == [5, 6, 7, 10, 11, 12, 13, 14]
    assert batch.response_mask.tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert batch.step_ids.tolist()[0] == [0, 0, 1, 1, 2]
    assert batch.step_ids.tolist()[2][:3] == [0, 1, 1]
    assert batch.rewards.tolist() == [1.0, 0.0, 0.0] and batch.group_ids.tolist() == [0, 0, 1]
    assert batch.step_values.shape == (3, 4)
    assert batch.step_values[0].tolist() == [0.5, 0.25, 1.0, 0.0]
    assert batch.step_values[1].tolist() == [0.75, 0.0, 0.0, 0.0]
    # response token j of every row sits at column start + j
    for row, e in enumerate(episodes):
        n = len(e.response_ids)
        assert input_ids[row, start:start + n].tolist() == e.response_ids
    positions = position_ids_from_mask(attention_mask)
    assert positions[1, 2:5].tolist() == [0, 1, 2] and positions[0, :3].tolist() == [0, 1, 2]


def test_to_rollout_batch_feeds_vineppo_advantages():
    episodes = [_episode([1], [3, 4, 5, 6], [0, 2], [0.25, 0.5], reward=1.0)]
    _, batch = to_rollout_batch(episodes, pad_token_id=0)
    adv, _ = ESTIMATORS["vineppo"].advantages(batch, AdvantageConfig(whiten=False))
    # A_0 = V(s_1) - V(s_0) = 0.25 on step 0; A_1 = r - V(s_1) = 0.5 on step 1
    assert adv[0].tolist() == pytest.approx([0.25, 0.25, 0.5, 0.5])


def test_position_ids_give_engine_logprobs(policy, task):
    """The trainer's view of a left-padded batch reproduces the engine's logprobs (ratio ~ 1)."""
    model, tokenizer = policy
    engine = _engine(model, tokenizer)
    cfg = RolloutConfig(**dict(CFG, num_samples=2, temperature=1.0, top_p=1.0))
    result = collect_rollouts(engine, task, task.test[:3], tokenizer, cfg, seed=SEED, estimate_values=False)
    packed, batch = to_rollout_batch(result.episodes, tokenizer.pad_token_id)
    input_ids, attention_mask, start = packed.input_ids, packed.attention_mask, packed.response_start
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=position_ids_from_mask(attention_mask)).logits.double()
    L = batch.response_mask.shape[1]
    logp = torch.log_softmax(logits[:, start - 1:start - 1 + L], -1)
    logp = logp.gather(-1, input_ids[:, start:start + L].unsqueeze(-1)).squeeze(-1)
    for row, e in enumerate(result.episodes):
        n = len(e.response_ids)
        torch.testing.assert_close(logp[row, :n], torch.tensor(e.engine_logprobs, dtype=torch.float64),
                                   rtol=0, atol=2e-4)


def test_step_ids_of():
    assert step_ids_of([0], 3) == [0, 0, 0]
    assert step_ids_of([0, 1, 3], 5) == [0, 1, 1, 2, 2]


def test_rollout_config_validation():
    with pytest.raises(ValueError):
        RolloutConfig(num_samples=0)
    with pytest.raises(ValueError):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError):
        to_rollout_batch([], pad_token_id=0)
    with pytest.raises(ValueError):
        to_rollout_batch([_episode([1], [2, 3], [1], [0.5])], pad_token_id=0)


def test_backfill_cap_estimates_the_first_states_only(policy, task):
    """value_cap_mode=backfill: the first max_steps states get MC values, every later one the
    response's reward; merge keeps max_steps evenly spaced states instead."""
    model, tokenizer = policy
    engine = _engine(model, tokenizer)
    merged = collect_rollouts(engine, task, task.test[:4], tokenizer, RolloutConfig(**dict(CFG, max_steps=1)),
                              seed=SEED, estimate_values=True)
    full = collect_rollouts(engine, task, task.test[:4], tokenizer, RolloutConfig(**dict(CFG, max_steps=0)),
                            seed=SEED, estimate_values=True)
    cfg = RolloutConfig(**dict(CFG, max_steps=1, value_cap_mode="backfill"))
    back = collect_rollouts(engine, task, task.test[:4], tokenizer, cfg, seed=SEED, estimate_values=True)
    assert back.num_mc_tokens < full.num_mc_tokens
    long = 0
    for m, f, b in zip(merged.episodes, full.episodes, back.episodes):
        assert b.response_ids == f.response_ids and b.step_offsets == f.step_offsets   # every step kept
        assert m.step_offsets == [0] and set(m.step_offsets) <= set(f.step_offsets)
        assert b.step_values[:1] == f.step_values[:1]                  # the same continuations
        assert b.step_values[1:] == [b.reward] * (b.num_steps - 1)
        long += b.num_steps > 1
    assert long > 0
    assert engine.num_free_pages == engine.num_pages


def test_backfilled_states_get_zero_advantage():
    # 3 steps, only the first estimated (V = 0.25), reward 1: A = (1 - 0.25, 0, 0)
    episodes = [_episode([1], [3, 4, 5, 6, 7, 8], [0, 2, 4], [0.25, 1.0, 1.0], reward=1.0)]
    _, batch = to_rollout_batch(episodes, pad_token_id=0)
    adv, _ = ESTIMATORS["vineppo"].advantages(batch, AdvantageConfig(whiten=False))
    assert adv[0].tolist() == pytest.approx([0.75, 0.75, 0.0, 0.0, 0.0, 0.0])
