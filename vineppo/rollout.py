"""Rollout collection: trajectories from the engine, their rewards, steps and Monte Carlo values.

One call of `collect_rollouts` is the data half of a VinePPO iteration:

1. every prompt is encoded once and the engine samples N responses to it (pages kept alive when
   values are wanted);
2. each response is decoded, graded, split into reasoning steps, and the steps are mapped to
   token offsets into the response;
3. from every step boundary s_t (offset 0 included: the paper estimates every state) the engine
   forks K continuations of the live KV pages (`engine.branch`; the prefix is never prefilled
   again); each continuation is graded as the whole response ``prefix + continuation``, and
   V(s_t) is the mean of those K rewards;
4. every kept sequence is released, also when something fails.

Text is only ever produced by decoding token ids; the model never sees re-tokenised text, so the
trainer scores exactly the tokens the engine sampled. `generate_episodes`, `continuation_rewards`
and `state_rewards` are the primitives; evaluation and the value analysis build on them too.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field, replace

import torch

from vineppo.algos import RolloutBatch, mc_step_values
from vineppo.engine import BranchRequest, SamplingParams, derive_seed
from vineppo.scoring import pack
from vineppo.settings import check_settings, setting
from vineppo.tasks import cap_offsets, decode_response, prompt_ids, step_token_offsets
from vineppo.tasks.base import TEMPLATES

VALUE_CAP_MODES = ("merge", "backfill")


@dataclass
class RolloutConfig:
    """What one iteration samples; the `rollout` section of the CLI."""

    num_prompts: int = setting(64, "prompts per iteration (all ranks together)", check=">= 1")
    num_samples: int = setting(8, "trajectories per prompt (N)", check=">= 1")
    mc_rollouts: int = setting(9, "VinePPO: Monte Carlo continuations per step boundary (K)", check=">= 1")
    max_steps: int = setting(25, "VinePPO: at most this many estimated states per trajectory (0 = every "
                             "step's state)", check=">= 0")
    value_cap_mode: str = setting("merge", "VinePPO, a response with more steps than max_steps: 'merge' keeps "
                                  "max_steps evenly spaced boundaries (the steps between merge); 'backfill' "
                                  "estimates the first max_steps states and gives every later state the "
                                  "response's reward, so later steps get advantage 0 (the paper's code)",
                                  choices=VALUE_CAP_MODES)
    temperature: float = setting(0.6, "sampling temperature (also divides the training logits)", check="> 0")
    top_p: float = setting(0.9, "nucleus sampling threshold", check="(0, 1]")
    max_tokens: int = setting(1024, "max new tokens per response", check=">= 1")
    template: str = setting("plain", "prompt template: plain (the paper's) or chat (the tokenizer's chat "
                            "template, for instruct models)", choices=TEMPLATES)

    def __post_init__(self):
        check_settings(self)

    def sampling(self, seed: int, n: int = 1) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_tokens,
                              seed=seed, n=n)


@dataclass
class Episode:
    example_id: str
    group_id: int                        # position of its example in the call (its prompt group)
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    finish_reason: str
    text: str
    reward: float
    step_offsets: list[int]              # token offset where each step starts (first 0)
    step_values: list[float] | None = None  # MC V(s_t) at each step start, VinePPO only
    handle: int | None = None            # the engine's kept sequence (keep_alive), until released

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets)


@dataclass
class RolloutResult:
    episodes: list[Episode]
    timings: dict[str, float] = field(default_factory=dict)  # "generation", "mc_rollouts", "grading" seconds
    num_generated_tokens: int = 0
    num_mc_tokens: int = 0


def fit_prompts(examples, split: str, task, tokenizer, template: str, context: int,
                on_error: str) -> tuple[list, int, int]:
    """(the examples whose prompt leaves room for at least one response token in a `context`-token
    window, how many were dropped, the longest kept prompt's tokens). A prompt that does not fit
    raises ValueError naming the example, unless `on_error` is "skip"."""
    kept, longest = [], 0
    for ex in examples:
        n = len(prompt_ids(task, ex, tokenizer, template))
        if n < context:
            kept.append(ex)
            longest = max(longest, n)
        elif on_error != "skip":
            raise ValueError(f"{split} problem {ex.id}: its prompt has {n} tokens, and the model's context "
                             f"holds {context} (prompt + at least one response token); shorten it, or pass "
                             f"--task.on_error skip to leave such problems out")
    return kept, len(examples) - len(kept), longest


def per_prompt_params(params: SamplingParams, count: int, first_index: int = 0) -> list[SamplingParams]:
    """`params` for each of `count` prompts, each with its own seed derived from ``params.seed``
    and the prompt's position (``first_index`` + i). One shared seed would give sample j of every
    prompt the same random numbers, so the samples of different prompts would be correlated."""
    if params.seed is None:
        return [params] * count
    return [replace(params, seed=derive_seed(params.seed, first_index + i)) for i in range(count)]


def score(task, text: str, example, finish_reason: str) -> float:
    """Terminal reward: the task's grade, and 0 for a response cut off by the token budget."""
    if finish_reason == "length":
        return 0.0
    return float(task.grade(text, example))


def response_step_offsets(task, tokenizer, response_ids: list[int], text: str, max_steps: int) -> list[int]:
    """Token offsets where the steps of a response start, always beginning with 0; with
    `max_steps` > 0, merged down to that many evenly spaced boundaries."""
    if not response_ids or not text:
        return [0]
    offsets = step_token_offsets(tokenizer, response_ids, task.split_steps(text, max_steps=0))
    # a step with no token of its own (inside a token of the step before) is no state of its own;
    # an offset at the very end would be an empty step
    offsets = sorted({o for o in offsets if o < len(response_ids)} | {0})
    return cap_offsets(offsets, max_steps) if max_steps > 0 else offsets


def generate_episodes(engine, task, examples, tokenizer, params: list[SamplingParams], template: str,
                      max_steps: int, keep_alive: bool) -> tuple[list[Episode], dict[str, float]]:
    """`params[i].n` responses to each example, decoded, graded and split into steps (merged down to
    at most `max_steps`; 0 = every step), in order (group id = the example's position), and the seconds spent generating and
    grading. With `keep_alive` every episode holds its engine `handle`; the caller releases them
    (here too, when grading fails)."""
    prompts = [prompt_ids(task, ex, tokenizer, template) for ex in examples]
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, keep_alive=keep_alive)
    timings = {"generation": time.perf_counter() - start}
    start = time.perf_counter()
    try:
        episodes = []
        for group_id, (example, prompt, group) in enumerate(zip(examples, prompts, outputs)):
            for c in group:
                text = decode_response(tokenizer, c.token_ids)
                episodes.append(Episode(
                    example_id=str(example.id), group_id=group_id, prompt_ids=list(prompt),
                    response_ids=list(c.token_ids), engine_logprobs=list(c.logprobs),
                    finish_reason=c.finish_reason, text=text,
                    reward=score(task, text, example, c.finish_reason),
                    step_offsets=response_step_offsets(task, tokenizer, c.token_ids, text, max_steps),
                    handle=c.handle))
    except BaseException:
        release([c for group in outputs for c in group], engine)
        raise
    timings["grading"] = time.perf_counter() - start
    return episodes, timings


def release(items, engine) -> None:
    """Frees the kept sequences of episodes (or completions) that hold a handle."""
    handles = [x.handle for x in items if x.handle is not None]
    if handles:
        engine.release(handles)
    for x in items:
        x.handle = None


def continuation_rewards(task, tokenizer, example, prefix: list[int], completions) -> list[float]:
    """Each continuation graded as the whole response ``prefix + continuation``."""
    return [score(task, decode_response(tokenizer, prefix + c.token_ids), example, c.finish_reason)
            for c in completions]


def state_rewards(engine, task, tokenizer, examples, episodes: list[Episode], offsets: list[list[int]],
                  k: int, params: SamplingParams) -> tuple[list[list[list[float]]], int]:
    """Rewards of `k` continuations from every state (episode i, offset in ``offsets[i]``), forked
    from the episodes' kept pages: ``[episode][state][k]``, and the continuation tokens generated.
    ``examples[episode.group_id]`` is the episode's example."""
    requests = []
    for e, offs in zip(episodes, offsets):
        if e.handle is None:
            raise ValueError("the episode holds no kept sequence; value estimation needs "
                             "generate_episodes(..., keep_alive=True)")
        requests.append(BranchRequest(handle=e.handle, offsets=list(offs)))
    branches = engine.branch(requests, k=k, params=params)
    rewards, num_tokens = [], 0
    for e, offs in zip(episodes, offsets):
        example = examples[e.group_id]
        per_state = []
        for offset in offs:
            continuations = branches[(e.handle, offset)]
            per_state.append(continuation_rewards(task, tokenizer, example, e.response_ids[:offset],
                                                  continuations))
            num_tokens += sum(len(c.token_ids) for c in continuations)
        rewards.append(per_state)
    return rewards, num_tokens


def collect_rollouts(engine, task, examples, tokenizer, cfg: RolloutConfig, seed: int,
                     estimate_values: bool) -> RolloutResult:
    """N responses per example, graded and split into steps; with `estimate_values`, the MC value
    of every step start from K continuations each. Group ids are the examples' positions; `seed`
    (vary it per iteration) fixes every sample."""
    if not examples:
        raise ValueError("collect_rollouts needs at least one example")
    params = per_prompt_params(cfg.sampling(seed, n=cfg.num_samples), len(examples))
    merge_to = cfg.max_steps if cfg.value_cap_mode == "merge" else 0
    episodes, timings = generate_episodes(engine, task, examples, tokenizer, params, cfg.template,
                                          merge_to, keep_alive=estimate_values)
    timings["mc_rollouts"] = 0.0
    num_mc_tokens = 0
    try:
        if estimate_values:
            start = time.perf_counter()
            estimated = [estimated_states(e, cfg) for e in episodes]
            rewards, num_mc_tokens = state_rewards(engine, task, tokenizer, examples, episodes,
                                                   [e.step_offsets[:n] for e, n in zip(episodes, estimated)],
                                                   cfg.mc_rollouts, cfg.sampling(seed))
            for e, n, per_state in zip(episodes, estimated, rewards):
                # past the cap (backfill), a state's value is the return the response realised
                e.step_values = mc_step_values(per_state) + [e.reward] * (e.num_steps - n)
            timings["mc_rollouts"] = time.perf_counter() - start
    finally:
        release(episodes, engine)
    return RolloutResult(episodes=episodes, timings=timings,
                         num_generated_tokens=sum(len(e.response_ids) for e in episodes),
                         num_mc_tokens=num_mc_tokens)


def estimated_states(episode: Episode, cfg: RolloutConfig) -> int:
    """How many of an episode's states get MC values: all under "merge" (the steps were merged
    down to max_steps), the first max_steps under "backfill"."""
    if cfg.value_cap_mode == "backfill" and cfg.max_steps > 0:
        return min(cfg.max_steps, episode.num_steps)
    return episode.num_steps


def step_ids_of(step_offsets: list[int], length: int) -> list[int]:
    """Step index of each of `length` response tokens, given where each step starts."""
    return [bisect.bisect_right(step_offsets, j) - 1 for j in range(length)]


def pad_right(rows: list[list], value, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """[len(rows), width] tensor of the rows, right-padded with `value`."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        if row:
            out[i, :len(row)] = torch.tensor(row[:width], dtype=dtype)
    return out


def to_rollout_batch(episodes: list[Episode], pad_token_id: int):
    """Padded tensors of `episodes` for the trainer.

    Returns ``(packed, batch)``: the token ids in `vineppo.scoring.pack`'s layout (response token j
    of every row at column ``packed.response_start + j``), and a `vineppo.algos.RolloutBatch` with
    ``step_values`` [E, S+1] (zeros after each episode's last step) when every episode has MC
    values, else None.
    """
    if not episodes:
        raise ValueError("to_rollout_batch needs at least one episode")
    for i, e in enumerate(episodes):
        if e.step_offsets[:1] != [0] or any(b <= a for a, b in zip(e.step_offsets, e.step_offsets[1:])):
            raise ValueError(f"episode {i}: step_offsets must start at 0 and increase, got {e.step_offsets}")
        if e.step_values is not None and len(e.step_values) != len(e.step_offsets):
            raise ValueError(f"episode {i}: {len(e.step_values)} step values for {len(e.step_offsets)} steps")
    packed = pack([e.prompt_ids for e in episodes], [e.response_ids for e in episodes], pad_token_id)
    response_mask = packed.response_mask
    L = response_mask.shape[1]
    step_ids = pad_right([step_ids_of(e.step_offsets, len(e.response_ids)) for e in episodes], 0, torch.long,
                         width=L)
    step_values = None
    if all(e.step_values is not None for e in episodes):
        S = max(len(e.step_offsets) for e in episodes)
        step_values = pad_right([e.step_values for e in episodes], 0.0, torch.float32, width=S + 1)
    batch = RolloutBatch(
        response_mask=response_mask,
        rewards=torch.tensor([e.reward for e in episodes], dtype=torch.float32),
        group_ids=torch.tensor([e.group_id for e in episodes], dtype=torch.long),
        step_ids=step_ids,
        step_values=step_values,
    )
    return packed, batch
