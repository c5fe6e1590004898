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
trainer scores exactly the tokens the engine sampled.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

import torch


@dataclass
class RolloutConfig:
    num_samples: int = 8        # N trajectories per prompt
    mc_rollouts: int = 9        # K continuations per step boundary (VinePPO)
    max_steps: int = 25         # cap on estimated states per trajectory
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 1024
    seed: int = 0               # vary per iteration: the same seed gives the same samples
    template: str = "plain"

    def __post_init__(self):
        for name in ("num_samples", "mc_rollouts", "max_steps", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"RolloutConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"RolloutConfig.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"RolloutConfig.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Episode:
    example_id: str
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    engine_logprobs: list[float]
    finish_reason: str
    text: str
    reward: float
    step_offsets: list[int]              # token offset where each step starts (first 0)
    step_values: list[float] | None = None  # MC V(s_t) at each step start, VinePPO only

    @property
    def num_steps(self) -> int:
        return len(self.step_offsets)


@dataclass
class RolloutResult:
    episodes: list[Episode]
    timings: dict[str, float] = field(default_factory=dict)  # "generation", "mc_rollouts", "grading" seconds
    num_generated_tokens: int = 0
    num_mc_tokens: int = 0


def encode_prompt(tokenizer, text: str, template: str = "plain") -> list[int]:
    """Prompt token ids. Chat-templated text already carries its special tokens."""
    ids = tokenizer(text, add_special_tokens=(template != "chat"))["input_ids"]
    if not ids:
        raise ValueError(f"prompt {text[:60]!r} encodes to no tokens")
    return list(ids)


def per_prompt_params(params, count: int, first_index: int = 0) -> list:
    """`params` for each of `count` prompts, each with its own seed derived from ``params.seed``
    and the prompt's position (``first_index`` + i). One shared seed would give sample j of every
    prompt the same random numbers, so the samples of different prompts would be correlated."""
    from dataclasses import replace

    from vineppo.engine import derive_seed

    if params.seed is None:
        return [params] * count
    return [replace(params, seed=derive_seed(params.seed, first_index + i)) for i in range(count)]


def decode_response(tokenizer, token_ids: list[int]) -> str:
    """Response text as graded and split into steps: the tasks' decoding (special tokens such as
    eos skipped, no whitespace clean-up), so step boundaries map back onto the same tokens."""
    from vineppo.tasks import decode_response as _decode

    return _decode(tokenizer, token_ids)


def score(task, text: str, example, finish_reason: str) -> float:
    """Terminal reward: the task's grade, and 0 for a response cut off by the token budget."""
    if finish_reason == "length":
        return 0.0
    return float(task.grade(text, example))


def response_step_offsets(task, tokenizer, response_ids: list[int], text: str, max_steps: int) -> list[int]:
    """Token offsets where the (capped) steps of a response start; always begins with 0."""
    from vineppo.tasks import cap_offsets, step_token_offsets

    steps = task.split_steps(text)
    if not response_ids or not text:
        return [0]
    offsets = step_token_offsets(tokenizer, response_ids, steps)
    # a step with no token of its own (inside a token of the step before) is no state of its own;
    # an offset at the very end would be an empty step
    return cap_offsets([o for o in offsets if o < len(response_ids)], max_steps)


def collect_rollouts(engine, task, examples, tokenizer, cfg: RolloutConfig,
                     estimate_values: bool) -> RolloutResult:
    """N responses per example, graded and split into steps; with `estimate_values`, the MC value
    of every step start from K continuations each. Group ids are the examples' positions."""
    from vineppo.engine import BranchRequest, SamplingParams

    if not examples:
        raise ValueError("collect_rollouts needs at least one example")
    prompts = [encode_prompt(tokenizer, task.prompt(ex, tokenizer, cfg.template), cfg.template)
               for ex in examples]
    params = per_prompt_params(SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                              max_tokens=cfg.max_tokens, seed=cfg.seed, n=cfg.num_samples),
                               len(prompts))
    timings = {"generation": 0.0, "grading": 0.0, "mc_rollouts": 0.0}
    handles: list[int] = []
    try:
        start = time.perf_counter()
        outputs = engine.generate(prompts, params, keep_alive=estimate_values)
        handles = [c.handle for group in outputs for c in group if c.handle is not None]
        timings["generation"] = time.perf_counter() - start

        start = time.perf_counter()
        episodes, kept = [], []
        for group_id, (example, prompt_ids, group) in enumerate(zip(examples, prompts, outputs)):
            for completion in group:
                text = decode_response(tokenizer, completion.token_ids)
                episodes.append(Episode(
                    example_id=str(example.id), group_id=group_id, prompt_ids=list(prompt_ids),
                    response_ids=list(completion.token_ids), engine_logprobs=list(completion.logprobs),
                    finish_reason=completion.finish_reason, text=text,
                    reward=score(task, text, example, completion.finish_reason),
                    step_offsets=response_step_offsets(task, tokenizer, completion.token_ids, text,
                                                       cfg.max_steps)))
                kept.append((example, completion.handle))
        timings["grading"] = time.perf_counter() - start

        num_mc_tokens = 0
        if estimate_values:
            start = time.perf_counter()
            num_mc_tokens = _estimate_values(engine, task, tokenizer, cfg, episodes, kept, BranchRequest,
                                             SamplingParams)
            timings["mc_rollouts"] = time.perf_counter() - start
    finally:
        if handles:
            engine.release(handles)
    return RolloutResult(episodes=episodes, timings=timings,
                         num_generated_tokens=sum(len(e.response_ids) for e in episodes),
                         num_mc_tokens=num_mc_tokens)


def _estimate_values(engine, task, tokenizer, cfg, episodes, kept, BranchRequest, SamplingParams) -> int:
    """Fills `episode.step_values` in place; returns the number of continuation tokens."""
    requests = []
    for episode, (_, handle) in zip(episodes, kept):
        if handle is None:
            raise ValueError("the engine returned no handle for a kept sequence; "
                             "value estimation needs generate(..., keep_alive=True)")
        requests.append(BranchRequest(handle=handle, offsets=list(episode.step_offsets)))
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            seed=cfg.seed, n=1)
    branches = engine.branch(requests, k=cfg.mc_rollouts, params=params)
    num_tokens = 0
    for episode, (example, handle) in zip(episodes, kept):
        values = []
        for offset in episode.step_offsets:
            continuations = branches[(handle, offset)]
            prefix = episode.response_ids[:offset]
            rewards = [score(task, decode_response(tokenizer, prefix + c.token_ids), example, c.finish_reason)
                       for c in continuations]
            num_tokens += sum(len(c.token_ids) for c in continuations)
            values.append(sum(rewards) / len(rewards))
        episode.step_values = values
    return num_tokens


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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row sees the positions the engine used."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def to_rollout_batch(episodes: list[Episode], pad_token_id: int):
    """Padded tensors of `episodes` for the trainer.

    Returns ``(input_ids [E, P+L], attention_mask [E, P+L], response_start, batch)``: prompts are
    left-padded to P tokens and responses right-padded to L, so response token j of every row sits
    at column ``response_start + j`` (= P + j); its logit is at column P + j - 1. Pass
    `position_ids_from_mask(attention_mask)` to the model so left padding does not shift RoPE
    positions. `batch` is a `vineppo.algos.RolloutBatch` with ``step_values`` [E, S+1] (zeros after
    each episode's last step) when every episode has MC values, else None.
    """
    from vineppo.algos import RolloutBatch

    if not episodes:
        raise ValueError("to_rollout_batch needs at least one episode")
    P = max(len(e.prompt_ids) for e in episodes)
    L = max(max(len(e.response_ids) for e in episodes), 1)
    E = len(episodes)
    input_ids = torch.full((E, P + L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((E, P + L), dtype=torch.long)
    response_mask = torch.zeros((E, L), dtype=torch.float32)
    step_ids = torch.zeros((E, L), dtype=torch.long)
    for i, e in enumerate(episodes):
        p, r = len(e.prompt_ids), len(e.response_ids)
        if e.step_offsets[:1] != [0] or any(b <= a for a, b in zip(e.step_offsets, e.step_offsets[1:])):
            raise ValueError(f"episode {i}: step_offsets must start at 0 and increase, got {e.step_offsets}")
        input_ids[i, P - p:P] = torch.tensor(e.prompt_ids, dtype=torch.long)
        attention_mask[i, P - p:P] = 1
        if r:
            input_ids[i, P:P + r] = torch.tensor(e.response_ids, dtype=torch.long)
            attention_mask[i, P:P + r] = 1
            response_mask[i, :r] = 1.0
            step_ids[i, :r] = torch.tensor(step_ids_of(e.step_offsets, r), dtype=torch.long)
    step_values = None
    if all(e.step_values is not None for e in episodes):
        for i, e in enumerate(episodes):
            if len(e.step_values) != len(e.step_offsets):
                raise ValueError(f"episode {i}: {len(e.step_values)} step values for "
                                 f"{len(e.step_offsets)} steps")
        S = max(len(e.step_offsets) for e in episodes)
        step_values = pad_right([e.step_values for e in episodes], 0.0, torch.float32, width=S + 1)
    batch = RolloutBatch(
        response_mask=response_mask,
        rewards=torch.tensor([e.reward for e in episodes], dtype=torch.float32),
        group_ids=torch.tensor([e.group_id for e in episodes], dtype=torch.long),
        step_ids=step_ids,
        step_values=step_values,
    )
    return input_ids, attention_mask, P, batch
