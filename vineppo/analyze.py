"""How good are value estimates? Monte Carlo V(s_t) with K continuations and the PPO critic,
measured against a many-rollout ground truth on states the policy itself visits.

    python -m vineppo.analyze values --model PATH [--task synthetic] [--value-model RUN/checkpoints/iter_X]
        [--num-problems 64 --gt-rollouts 256 --ks 1,3,9 --alternatives 5 --output-dir DIR]

1. One trajectory per problem from the policy (training's sampling: T=0.6, top-p 0.9); every step
   start s_t (offset 0 included, capped like training) is a state.
2. Per state: ground truth V = mean reward of `gt_rollouts` continuations; MC-K = mean reward of K
   other continuations (own seeds, independent of the ground truth); the critic's V(s_t) = its
   output at the last token of prompt + response[:t]. Continuations fork the trajectory's kept
   pages (`engine.branch`), so a prefix is never prefilled again.
3. Best-of-n next steps (the paper's value-prediction comparison): from each chosen state,
   `alternatives` sampled next steps; the ground-truth Q of each is the ground-truth V of the state
   after it (its reward when it ends the response); an estimator is right when its argmax is a
   truly best step.

Outputs in --output-dir: values.json (every number and per-state record), values.md (the tables
printed to stdout), mae_by_step.png and scatter.png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from vineppo import rollout, scoring
from vineppo.checkpoint import read_model_state_dict
from vineppo.engine import BranchRequest, SamplingParams, derive_seed
from vineppo.evaluate import load_for_evaluation
from vineppo.models import VALUE_HEAD_FILE, ValueModel
from vineppo.rollout import Episode
from vineppo.tasks import step_token_offsets

# Random streams, mixed into --seed: trajectories, ground truth and every estimator draw their own.
_TRAJECTORY, _GT, _MC, _ALTERNATIVES, _CHOICE_GT, _CHOICE_MC = range(6)
TIE_TOLERANCE = 1e-9
# Continuations per engine call: far above what runs at once (max_num_seqs), and small enough that
# the completions of 256 ground-truth rollouts from thousands of states never sit in memory together.
SEQUENCES_PER_CALL = 4096


@dataclass
class ValuesConfig:
    gt_rollouts: int = 256
    ks: tuple[int, ...] = (1, 3, 9)
    alternatives: int = 5
    choice_states: int = 0          # states that get the best-of-n analysis (0 = all)
    max_states_per_trajectory: int = 25
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 1024
    seed: int = 0
    template: str = "plain"
    progress: bool = False

    def __post_init__(self):
        self.ks = tuple(int(k) for k in self.ks)
        for name in ("gt_rollouts", "alternatives", "max_states_per_trajectory", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.ks or min(self.ks) < 1 or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks must be distinct positive ints, got {self.ks}")
        if self.choice_states < 0:
            raise ValueError(f"choice_states must be >= 0 (0 = all), got {self.choice_states}")


@dataclass
class State:
    """s_t = (prompt, response[:offset]) of one trajectory, and each estimator's V(s_t)."""
    problem: int
    example_id: str
    step: int                       # t
    offset: int                     # response tokens kept
    num_steps: int                  # states of its trajectory
    trajectory_reward: float
    ground_truth: float = 0.0
    ground_truth_sem: float = 0.0   # standard error of the ground truth mean
    estimates: dict[str, float] = field(default_factory=dict)


@dataclass
class Alternative:
    """One sampled next step after a state; `terminal` when it ends the response."""
    token_ids: list[int]
    text: str
    terminal: bool
    reward: float                   # the response's reward when terminal, else 0


@dataclass
class Choice:
    state: int                      # index into the states
    alternatives: list[Alternative]
    ground_truth: list[float] = field(default_factory=list)            # Q of each alternative
    estimates: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Phase:
    seconds: float = 0.0
    tokens: int = 0                 # generated tokens (every continuation token)


@dataclass
class ValuesResult:
    examples: list                  # the analysed problems; trajectory i answers examples[i]
    trajectories: list[Episode]     # one per example (group id = its index)
    states: list[State]
    choices: list[Choice]
    estimators: list[str]
    phases: dict[str, Phase]
    seconds: float


@contextmanager
def _timed(phases: dict[str, Phase], name: str):
    phase = phases.setdefault(name, Phase())
    start = time.perf_counter()
    try:
        yield phase
    finally:
        phase.seconds += time.perf_counter() - start


def _params(cfg: ValuesConfig, seed: int, max_tokens: int | None = None, n: int = 1) -> SamplingParams:
    return SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, n=n, seed=seed,
                          max_tokens=cfg.max_tokens if max_tokens is None else max_tokens)


# ---------------------------------------------------------------------------------------------
# states

def sample_trajectories(engine, task, tokenizer, examples, cfg: ValuesConfig) -> list[Episode]:
    """One kept trajectory per example; the caller releases them. Each prompt has its own seed:
    with one request seed every prompt's first sample would share the same random draws."""
    params = [_params(cfg, derive_seed(cfg.seed, _TRAJECTORY, i)) for i in range(len(examples))]
    episodes, _ = rollout.generate_episodes(engine, task, examples, tokenizer, params, cfg.template,
                                            cfg.max_states_per_trajectory, keep_alive=True)
    return episodes


def states_of(trajectories: list[Episode]) -> list[State]:
    return [State(problem=t.group_id, example_id=t.example_id, step=j, offset=o, num_steps=t.num_steps,
                  trajectory_reward=t.reward)
            for t in trajectories for j, o in enumerate(t.step_offsets)]


# ---------------------------------------------------------------------------------------------
# Monte Carlo estimates

def branch_continuations(engine, trajectories, states, k: int, seed: int, cfg: ValuesConfig):
    """k continuations from every state, forking its trajectory's kept pages: [state][k]."""
    offsets: dict[int, list[int]] = {}
    for s in states:
        offsets.setdefault(s.problem, []).append(s.offset)
    requests = [BranchRequest(trajectories[p].handle, offs) for p, offs in offsets.items()]
    out = engine.branch(requests, k=k, params=_params(cfg, seed), progress=cfg.progress)
    return [out[(trajectories[s.problem].handle, s.offset)] for s in states]


def state_rewards(engine, task, tokenizer, examples, trajectories, states, k: int, seed: int,
                  cfg: ValuesConfig) -> tuple[list[list[float]], int]:
    """Rewards of k continuations from each state (forked from its trajectory's kept pages), and
    the number of tokens generated."""
    rewards, tokens = [], 0
    step = max(1, SEQUENCES_PER_CALL // k)
    for start in range(0, len(states), step):  # seeds are per state: chunking changes nothing
        chunk = states[start:start + step]
        by_problem: dict[int, list[int]] = {}
        for s in chunk:
            by_problem.setdefault(s.problem, []).append(s.offset)
        episodes = [trajectories[p] for p in by_problem]
        per_episode, n = rollout.state_rewards(engine, task, tokenizer, examples, episodes,
                                               list(by_problem.values()), k, _params(cfg, seed))
        found = {(p, o): r for p, offs, rs in zip(by_problem, by_problem.values(), per_episode)
                 for o, r in zip(offs, rs)}
        rewards += [found[(s.problem, s.offset)] for s in chunk]
        tokens += n
    return rewards, tokens


def prefix_rewards(engine, task, tokenizer, items, k: int, seed: int,
                   cfg: ValuesConfig) -> tuple[list[list[float]], int]:
    """Rewards of k continuations after each (example, prompt_ids, response_prefix), prefilled as
    a new prompt (its k samples share one prefill); the prefix counts against max_tokens."""
    rewards, tokens = [], 0
    step = max(1, SEQUENCES_PER_CALL // k)
    for start in range(0, len(items), step):
        chunk = items[start:start + step]
        prompts = [list(p) + list(r) for _, p, r in chunk]
        params = [_params(cfg, derive_seed(seed, start + i), max_tokens=cfg.max_tokens - len(r), n=k)
                  for i, (_, _, r) in enumerate(chunk)]
        for (ex, _, r), group in zip(chunk, engine.generate(prompts, params, progress=cfg.progress)):
            rewards.append(rollout.continuation_rewards(task, tokenizer, ex, list(r), group))
            tokens += sum(len(c.token_ids) for c in group)
    return rewards, tokens


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _sem(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5


# ---------------------------------------------------------------------------------------------
# the critic

def load_value_model(path: str, policy, device=None):
    """The PPO critic of run checkpoint `path` (``<run>/checkpoints/iter_X``, whose value_model/
    holds the flat state dict the trainer saves), or of a `ValueModel.save_pretrained` folder."""
    for folder in (path, os.path.join(path, "value_model")):
        if os.path.isfile(os.path.join(folder, VALUE_HEAD_FILE)):
            model = ValueModel.from_pretrained(folder, dtype="float32", device=device)
            return model.eval().requires_grad_(False)
    if not os.path.isdir(os.path.join(path, "value_model")):
        raise ValueError(f"--value-model {path}: no value_model/ folder (is it a PPO run checkpoint?)")
    # built like vineppo.train does it (a copy of the policy's backbone + head), then loaded
    model = ValueModel.from_policy(policy)
    missing, unexpected = model.load_state_dict(read_model_state_dict(path, "value_model"), strict=False)
    if missing or unexpected:
        raise ValueError(f"--value-model {path}: the critic does not fit this policy (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return model.to(device=device, dtype=next(policy.parameters()).dtype).eval().requires_grad_(False)


def critic_values(value_model, items, pad_token_id: int, batch_size: int = 16) -> list[list[float]]:
    """The critic's V at each of `offsets` for items (prompt_ids, response_ids, offsets): its output
    at the last token of prompt + response[:offset], as the trainer reads it (`scoring.values`)."""
    device = next(value_model.parameters()).device
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        # one column past the longest response: a state after a response's last token
        # (offset == len) needs the output at that token too
        packed = scoring.pack([p for p, _, _ in chunk], [r for _, r, _ in chunk], pad_token_id, extra_columns=1)
        values = scoring.values(value_model, packed.to(device), batch_size).cpu()
        out.extend([float(values[row, o]) for o in offs] for row, (_, _, offs) in enumerate(chunk))
    return out


# ---------------------------------------------------------------------------------------------
# best-of-n next steps

def next_step(task, tokenizer, example, prefix: list[int], completion) -> Alternative:
    """The continuation cut where its first step ends (the task's own, uncapped steps of the whole
    response prefix + continuation); a continuation without a later boundary is terminal."""
    full = prefix + list(completion.token_ids)
    text = rollout.decode_response(tokenizer, full)
    ends = []
    if text:
        offsets = step_token_offsets(tokenizer, full, task.split_steps(text, max_steps=0))
        ends = [o for o in offsets if len(prefix) < o < len(full)]
    if ends:
        ids = full[len(prefix):ends[0]]
        return Alternative(ids, rollout.decode_response(tokenizer, ids), terminal=False, reward=0.0)
    reward = rollout.score(task, text, example, completion.finish_reason)
    return Alternative(list(completion.token_ids), rollout.decode_response(tokenizer, completion.token_ids),
                       terminal=True, reward=reward)


def choose_states(num_states: int, count: int, seed: int) -> list[int]:
    """A seeded random subset of `count` state indices, in order (all when count is 0 or too big)."""
    if count <= 0 or count >= num_states:
        return list(range(num_states))
    return sorted(random.Random(seed).sample(range(num_states), count))


def analyze_choices(engine, task, tokenizer, examples, trajectories, states, picks, cfg: ValuesConfig, phases,
                    value_model=None, pad_token_id: int = 0) -> list[Choice]:
    """Alternatives from each picked state and every estimator's Q of them. A terminal alternative's
    Q is its reward for every estimator (V(terminal) = 0): only non-terminal ones are estimated."""
    picked = [states[i] for i in picks]
    with _timed(phases, "choice/alternatives") as ph:
        groups = branch_continuations(engine, trajectories, picked, cfg.alternatives,
                                      derive_seed(cfg.seed, _ALTERNATIVES), cfg)
        ph.tokens = sum(len(c.token_ids) for g in groups for c in g)
    # the states after non-terminal alternatives, each distinct one estimated once: a peaked policy
    # often samples the same step twice, and one state has one value (so its copies tie exactly)
    choices, items, after, index = [], [], [], {}
    for i, s, group in zip(picks, picked, groups):
        t, example = trajectories[s.problem], examples[s.problem]
        prefix = t.response_ids[:s.offset]
        choice = Choice(state=i, alternatives=[next_step(task, tokenizer, example, prefix, c) for c in group])
        for j, alt in enumerate(choice.alternatives):
            if not alt.terminal:
                key = (len(choices), tuple(alt.token_ids))
                if key not in index:
                    index[key] = len(items)
                    items.append((example, t.prompt_ids, prefix + alt.token_ids))
                after.append((len(choices), j, index[key]))
        choices.append(choice)

    def q_table(values: list[float]) -> list[list[float]]:
        table = [[a.reward for a in c.alternatives] for c in choices]
        for ci, j, item in after:
            table[ci][j] = values[item]
        return table

    with _timed(phases, "choice/ground_truth") as ph:
        rewards, ph.tokens = prefix_rewards(engine, task, tokenizer, items, cfg.gt_rollouts,
                                            derive_seed(cfg.seed, _CHOICE_GT), cfg)
    tables = {"ground_truth": q_table([_mean(r) for r in rewards])}
    for k in cfg.ks:
        with _timed(phases, f"choice/mc_{k}") as ph:
            rewards, ph.tokens = prefix_rewards(engine, task, tokenizer, items, k,
                                                derive_seed(cfg.seed, _CHOICE_MC, k), cfg)
        tables[f"mc_{k}"] = q_table([_mean(r) for r in rewards])
    if value_model is not None:
        with _timed(phases, "choice/critic"):
            values = critic_values(value_model, [(p, r, [len(r)]) for _, p, r in items], pad_token_id)
        tables["critic"] = q_table([v[0] for v in values])
    for ci, c in enumerate(choices):
        c.ground_truth = tables["ground_truth"][ci]
        c.estimates = {name: table[ci] for name, table in tables.items() if name != "ground_truth"}
    return choices


# ---------------------------------------------------------------------------------------------
# the whole measurement

def analyze_values(engine, task, tokenizer, examples, cfg: ValuesConfig, value_model=None) -> ValuesResult:
    """States from one trajectory per example, every estimator's V of them, and the best-of-n
    analysis; kept trajectories are released whatever happens."""
    if not examples:
        raise ValueError("analyze_values needs at least one example")
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    phases: dict[str, Phase] = {}
    start = time.perf_counter()
    trajectories: list[Episode] = []
    try:
        with _timed(phases, "trajectories") as ph:
            trajectories = sample_trajectories(engine, task, tokenizer, examples, cfg)
            ph.tokens = sum(len(t.response_ids) for t in trajectories)
        states = states_of(trajectories)
        with _timed(phases, "ground_truth") as ph:
            rewards, ph.tokens = state_rewards(engine, task, tokenizer, examples, trajectories, states,
                                               cfg.gt_rollouts, derive_seed(cfg.seed, _GT), cfg)
        for s, r in zip(states, rewards):
            s.ground_truth, s.ground_truth_sem = _mean(r), _sem(r)
        for k in cfg.ks:
            with _timed(phases, f"mc_{k}") as ph:
                rewards, ph.tokens = state_rewards(engine, task, tokenizer, examples, trajectories, states, k,
                                                   derive_seed(cfg.seed, _MC, k), cfg)
            for s, r in zip(states, rewards):
                s.estimates[f"mc_{k}"] = _mean(r)
        if value_model is not None:
            with _timed(phases, "critic"):
                values = critic_values(value_model, [(t.prompt_ids, t.response_ids, t.step_offsets)
                                                     for t in trajectories], pad_token_id)
            for s, v in zip(states, (v for vs in values for v in vs)):
                s.estimates["critic"] = v
        picks = choose_states(len(states), cfg.choice_states, cfg.seed)
        choices = analyze_choices(engine, task, tokenizer, examples, trajectories, states, picks, cfg, phases,
                                  value_model, pad_token_id)
    finally:
        rollout.release(trajectories, engine)
    estimators = [f"mc_{k}" for k in cfg.ks] + (["critic"] if value_model is not None else [])
    return ValuesResult(list(examples), trajectories, states, choices, estimators, phases,
                        time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# metrics

def mean_absolute_error(states: list[State], name: str) -> float:
    if not states:
        raise ValueError("no states")
    return _mean([abs(s.estimates[name] - s.ground_truth) for s in states])


def mae_by_step(states: list[State], name: str) -> dict[int, float]:
    by_step: dict[int, list[State]] = {}
    for s in states:
        by_step.setdefault(s.step, []).append(s)
    return {step: mean_absolute_error(group, name) for step, group in sorted(by_step.items())}


def top1_accuracy(ground_truth: list[list[float]], estimates: list[list[float]],
                  tol: float = TIE_TOLERANCE) -> dict:
    """How often the estimator's argmax (first index on ties) has the maximal ground-truth Q (any
    of tied maxima counts), over all states and over the states whose ground-truth Qs differ."""
    if len(ground_truth) != len(estimates):
        raise ValueError(f"{len(ground_truth)} ground-truth rows for {len(estimates)} estimate rows")
    hits, hits_differ, all_equal = 0, 0, 0
    for gt, est in zip(ground_truth, estimates):
        if len(gt) != len(est) or not gt:
            raise ValueError(f"rows must be non-empty and of equal length, got {len(gt)} and {len(est)}")
        pick = max(range(len(est)), key=lambda j: (est[j], -j))
        hit = gt[pick] >= max(gt) - tol
        equal = max(gt) - min(gt) <= tol
        hits += hit
        all_equal += equal
        hits_differ += hit and not equal
    n, n_differ = len(ground_truth), len(ground_truth) - all_equal
    return {"accuracy": hits / n if n else None, "num_states": n, "num_all_equal": all_equal,
            "accuracy_when_differ": hits_differ / n_differ if n_differ else None, "num_differ": n_differ}


def chance_accuracy(ground_truth: list[list[float]], tol: float = TIE_TOLERANCE) -> dict:
    """Expected top-1 accuracy of a uniformly random pick, the floor any estimator should beat."""
    rows = [(sum(q >= max(gt) - tol for q in gt) / len(gt), max(gt) - min(gt) <= tol) for gt in ground_truth]
    differ = [p for p, equal in rows if not equal]
    return {"accuracy": _mean([p for p, _ in rows]) if rows else None,
            "accuracy_when_differ": _mean(differ) if differ else None}


def summarize(result: ValuesResult) -> dict:
    states, choices, names = result.states, result.choices, result.estimators
    steps = sorted({s.step for s in states})
    gt_table = [c.ground_truth for c in choices]
    top1 = {name: top1_accuracy(gt_table, [c.estimates[name] for c in choices]) for name in names}
    return {
        "num_problems": len(result.trajectories),
        "mean_trajectory_reward": _mean([t.reward for t in result.trajectories]),
        "num_states": len(states),
        "mean_ground_truth": _mean([s.ground_truth for s in states]),
        "mean_ground_truth_sem": _mean([s.ground_truth_sem for s in states]),
        "estimators": names,
        "mae": {name: mean_absolute_error(states, name) for name in names},
        "states_by_step": {str(t): sum(s.step == t for s in states) for t in steps},
        "mae_by_step": {name: {str(t): v for t, v in mae_by_step(states, name).items()} for name in names},
        "choice": {
            "num_states": len(choices),
            "alternatives": max((len(c.alternatives) for c in choices), default=0),
            "num_alternatives": sum(len(c.alternatives) for c in choices),
            "num_distinct_alternatives": sum(len({tuple(a.token_ids) for a in c.alternatives}) for c in choices),
            "num_terminal_alternatives": sum(a.terminal for c in choices for a in c.alternatives),
            "num_all_equal": top1[names[0]]["num_all_equal"] if choices else 0,
            "top1": {name: {k: top1[name][k] for k in ("accuracy", "accuracy_when_differ")} for name in names},
            "chance": chance_accuracy(gt_table),
        },
        "seconds": dict({k: p.seconds for k, p in result.phases.items()}, total=result.seconds),
        "tokens": dict({k: p.tokens for k, p in result.phases.items()},
                       total=sum(p.tokens for p in result.phases.values())),
    }


# ---------------------------------------------------------------------------------------------
# reports

def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_tables(summary: dict, device: str = "cpu") -> str:
    names, choice = summary["estimators"], summary["choice"]
    head = (f"{summary['num_problems']} problems (mean trajectory reward {summary['mean_trajectory_reward']:.3f}), "
            f"{summary['num_states']} states; mean ground-truth V {summary['mean_ground_truth']:.3f} "
            f"(mean standard error {summary['mean_ground_truth_sem']:.3f})")
    lines = [head, "", "## Mean absolute error vs ground truth", "", "| estimator | MAE |", "|---|---|"]
    lines += [f"| {n} | {summary['mae'][n]:.4f} |" for n in names]
    lines += ["", "## MAE by step index", "", "| step | states | " + " | ".join(names) + " |",
              "|---" * (len(names) + 2) + "|"]
    for step, count in summary["states_by_step"].items():
        lines.append(f"| {step} | {count} | " + " | ".join(f"{summary['mae_by_step'][n][step]:.4f}" for n in names)
                     + " |")
    counts = (f"{choice['num_states']} states, {choice['num_all_equal']} of them with all-equal ground-truth Q "
              f"(any pick is right there); {choice['num_distinct_alternatives']} distinct of "
              f"{choice['num_alternatives']} alternatives, {choice['num_terminal_alternatives']} ending the response")
    lines += ["", f"## Best of {choice['alternatives']} next steps: top-1 accuracy", "", counts, "",
              "| estimator | top-1 | top-1 where ground-truth Qs differ |", "|---|---|---|"]
    for n, acc in list(choice["top1"].items()) + [("random pick", choice["chance"])]:
        lines.append(f"| {n} | {_pct(acc['accuracy'])} | {_pct(acc['accuracy_when_differ'])} |")
    lines += ["", "## Time and generated tokens", "", "| phase | seconds | tokens |", "|---|---|---|"]
    lines += [f"| {k} | {summary['seconds'][k]:.1f} | {summary['tokens'].get(k, 0)} |" for k in summary["seconds"]]
    if str(device).startswith("cuda"):
        lines += ["", "The engine compiles kernels and captures CUDA graphs on first use, mostly in the first phases."]
    return "\n".join(lines) + "\n"


def plot_values(result: ValuesResult, out_dir: str) -> list[str]:
    """mae_by_step.png (one line per estimator) and scatter.png (estimate vs ground truth)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = [os.path.join(out_dir, "mae_by_step.png"), os.path.join(out_dir, "scatter.png")]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in result.estimators:
        by_step = mae_by_step(result.states, name)
        ax.plot(list(by_step), list(by_step.values()), marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step index t")
    ax.set_ylabel("mean |V estimate - ground truth|")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    n = len(result.estimators)
    fig, axes = plt.subplots(1, n, figsize=(3.5 * n, 3.5), squeeze=False)
    for ax, name in zip(axes[0], result.estimators):
        ax.scatter([s.ground_truth for s in result.states], [s.estimates[name] for s in result.states],
                   s=8, alpha=0.4)
        lo = min([0.0] + [s.estimates[name] for s in result.states])
        hi = max([1.0] + [s.estimates[name] for s in result.states])
        ax.plot([lo, hi], [lo, hi], color="gray", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("ground-truth V")
    axes[0][0].set_ylabel("estimate")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def write_outputs(result: ValuesResult, summary: dict, settings: dict, out_dir: str) -> str:
    """values.json, values.md and the plots; returns the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    trajectories = [{"problem": t.group_id, "example_id": t.example_id, "reward": t.reward,
                     "finish_reason": t.finish_reason, "num_tokens": len(t.response_ids),
                     "step_offsets": t.step_offsets} for t in result.trajectories]
    record = dict(settings=settings, **summary, trajectories=trajectories,
                  states=[asdict(s) for s in result.states], choices=[asdict(c) for c in result.choices])
    with open(os.path.join(out_dir, "values.json"), "w") as f:
        json.dump(record, f, indent=1)
    title = f"# Value estimators: {settings.get('model')} on {settings.get('task')} ({settings.get('split')})\n\n"
    tables = format_tables(summary, settings.get("device", "cpu"))
    with open(os.path.join(out_dir, "values.md"), "w") as f:
        f.write(title + tables)
    plot_values(result, out_dir)
    return tables


# ---------------------------------------------------------------------------------------------
# command line

def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m vineppo.analyze", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("values", help="MAE of MC and critic values vs ground truth; best-of-n next steps")
    v.add_argument("--model", required=True, help="save_pretrained folder (SFT checkpoint or a run checkpoint's "
                   "model/), .gguf file, hub name, or 'smollm2' for the packaged SmolLM2-135M-Instruct")
    v.add_argument("--task", default=None, help="synthetic | gsm8k | math (default: the checkpoint's, else gsm8k)")
    v.add_argument("--data", default=None, help="local data folder/file or hub dataset (gsm8k / math)")
    v.add_argument("--split", default="test", choices=("test", "train"))
    v.add_argument("--task-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="load_task knob, e.g. num_steps=4 (synthetic: defaults to the checkpoint's knobs and seed)")
    v.add_argument("--template", default=None, choices=("plain", "chat"), help="default: the checkpoint's, else plain")
    v.add_argument("--num-problems", type=int, default=64)
    v.add_argument("--gt-rollouts", type=int, default=256, help="continuations per ground-truth value")
    v.add_argument("--ks", default="1,3,9", help="MC estimators' continuation counts, comma-separated")
    v.add_argument("--alternatives", type=int, default=5, help="next steps sampled per state for top-1")
    v.add_argument("--choice-states", type=int, default=0, help="states given the best-of-n analysis (0 = all)")
    v.add_argument("--max-states-per-trajectory", type=int, default=25)
    v.add_argument("--value-model", default=None, help="PPO run checkpoint folder holding value_model/")
    v.add_argument("--temperature", type=float, default=0.6)
    v.add_argument("--top-p", type=float, default=0.9)
    v.add_argument("--max-tokens", type=int, default=1024, help="response budget (continuations included)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    v.add_argument("--num-pages", type=int, default=0, help="KV cache pages (0 = engine default)")
    v.add_argument("--output-dir", default=None, help="default: runs/analysis-values-<timestamp>")
    v.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def run_values(args) -> dict:
    if args.num_problems < 1:
        raise SystemExit(f"--num-problems must be >= 1, got {args.num_problems}")
    run = load_for_evaluation(args.model, args.task, args.data, args.template, args.task_arg,
                              device=args.device, dtype="float32", num_pages=args.num_pages)
    cfg = ValuesConfig(gt_rollouts=args.gt_rollouts, ks=tuple(int(k) for k in args.ks.split(",") if k.strip()),
                       alternatives=args.alternatives, choice_states=args.choice_states,
                       max_states_per_trajectory=args.max_states_per_trajectory, temperature=args.temperature,
                       top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                       template=run.template, progress=not args.no_progress)
    examples = (run.task.test if args.split == "test" else run.task.train)[:args.num_problems]
    value_model = load_value_model(args.value_model, run.model, run.device) if args.value_model else None
    result = analyze_values(run.engine, run.task, run.tokenizer, examples, cfg, value_model)

    summary = summarize(result)
    out_dir = args.output_dir or os.path.join("runs", f"analysis-values-{time.strftime('%Y%m%d-%H%M%S')}")
    settings = dict(vars(args), model_path=run.model_path, task=run.task_config.name,
                    task_config=vars(run.task_config), data=run.task_config.path, template=cfg.template,
                    ks=list(cfg.ks), device=run.device)
    tables = write_outputs(result, summary, settings, out_dir)
    print(tables)
    print(f"wrote {os.path.join(out_dir, 'values.json')}, values.md, mae_by_step.png, scatter.png")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    return run_values(args)


if __name__ == "__main__":
    main()
