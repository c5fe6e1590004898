"""Value-estimator analysis: ground truth from the drawn continuations, MAE and top-1 on hand-made
numbers, the critic's read-out position, next-step cutting, critic loading and the command line.

A random tiny Llama writes random characters, so the tests swap in a parity reward (right half the
time) and, where steps matter, 4-character steps: every state and alternative is then non-trivial.
"""

import json
import os

import pytest
import torch

from vineppo import analyze
from vineppo.analyze import (
    State,
    ValuesConfig,
    analyze_values,
    chance_accuracy,
    critic_values,
    load_value_model,
    mae_by_step,
    mean_absolute_error,
    next_step,
    top1_accuracy,
)
from vineppo.engine import (
    Completion,
    Engine,
    EngineConfig,
    SamplingParams,
    branch_seed,
    sample_seed,
)
from vineppo.engine.sequence import derive_seed
from vineppo.rollout import decode_response
from vineppo.tasks.synthetic import SyntheticTask

STEP_CHARS = 4


def _chunks(self, response):
    return [response[i:i + STEP_CHARS] for i in range(0, len(response), STEP_CHARS)] or [response]


def _parity(task, text, example, finish_reason):
    return float(sum(map(ord, text)) % 2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small gains nothing from threads, and on a busy 2-core machine OpenMP's
    spinning threads make every matmul ~1000x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(synthetic_lm):
    return synthetic_lm(max_position_embeddings=128)


@pytest.fixture
def chunked(monkeypatch):
    """The synthetic task with 4-character steps and the parity reward."""
    from vineppo.tasks import load_task

    monkeypatch.setattr(SyntheticTask, "_split", _chunks)
    monkeypatch.setattr("vineppo.rollout.score", _parity)
    return load_task("synthetic", None, num_train=10, num_test=6)


def _engine(model, tok):
    return Engine(model, tok, EngineConfig(num_pages=256, page_size=8))


CFG = {"gt_rollouts": 6, "ks": (1, 2), "alternatives": 3, "max_states_per_trajectory": 3, "max_tokens": 12,
       "seed": 5}


def test_values_are_means_of_the_drawn_continuations(tiny, chunked):
    model, tok = tiny
    engine = _engine(model, tok)
    cfg = ValuesConfig(**CFG)
    examples = chunked.test[:3]
    result = analyze_values(engine, chunked, tok, examples, cfg)
    assert engine.num_free_pages == engine.num_pages  # every kept trajectory released

    assert len(result.states) == sum(len(t.step_offsets) for t in result.trajectories)
    assert max(len(t.step_offsets) for t in result.trajectories) == 3  # 12 tokens = 3 steps
    assert result.estimators == ["mc_1", "mc_2"]
    # Re-draw every state's ground-truth continuations as fresh generations from the re-prefilled
    # prefix with the seeds the engine documents: V must be the mean parity of exactly those.
    gt_tokens = 0
    for s in result.states:
        t = result.trajectories[s.problem]
        request_seed = derive_seed(cfg.seed, analyze._TRAJECTORY, s.problem)
        [[again]] = engine.generate([t.prompt_ids], SamplingParams(
            temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, seed=request_seed))
        assert again.token_ids == t.response_ids
        prefix = t.response_ids[:s.offset]
        for name, seed, k in (("gt", derive_seed(cfg.seed, analyze._GT), cfg.gt_rollouts),
                              ("mc_2", derive_seed(cfg.seed, analyze._MC, 2), 2)):
            (group,) = engine.generate([t.prompt_ids + prefix], SamplingParams(
                temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens - s.offset, n=k,
                seed=branch_seed(seed, sample_seed(request_seed, 0), s.offset)))
            rewards = [_parity(None, decode_response(tok, prefix + c.token_ids), None, None) for c in group]
            value = s.ground_truth if name == "gt" else s.estimates["mc_2"]
            assert value == pytest.approx(sum(rewards) / k)
            gt_tokens += sum(len(c.token_ids) for c in group) if name == "gt" else 0
        assert 0.0 <= s.ground_truth <= 1.0 and s.ground_truth_sem >= 0.0
    assert result.phases["ground_truth"].tokens == gt_tokens
    assert result.phases["trajectories"].tokens == sum(len(t.response_ids) for t in result.trajectories)

    # best-of-n: every state, its alternatives are single steps (or the rest of the response)
    assert [c.state for c in result.choices] == list(range(len(result.states)))
    for c in result.choices:
        assert len(c.alternatives) == len(c.ground_truth) == cfg.alternatives
        assert set(c.estimates) == {"mc_1", "mc_2"}
        for j, (a, q) in enumerate(zip(c.alternatives, c.ground_truth)):
            assert 0.0 <= q <= 1.0
            if a.terminal:  # its reward is known: every estimator's Q is exact
                assert q == a.reward and all(c.estimates[n][j] == a.reward for n in c.estimates)
            else:
                assert len(a.text) == STEP_CHARS
    assert any(not a.terminal for c in result.choices for a in c.alternatives)
    for name in ("choice/alternatives", "choice/ground_truth", "choice/mc_1", "choice/mc_2"):
        assert result.phases[name].tokens > 0 and result.phases[name].seconds > 0


def test_estimators_draw_their_own_continuations(tiny, chunked):
    model, tok = tiny
    engine = _engine(model, tok)
    cfg = ValuesConfig(**CFG)
    trajectories = analyze.sample_trajectories(engine, chunked, tok, chunked.test[:2], cfg)
    try:
        states = analyze.states_of(trajectories)
        gt = analyze.branch_continuations(engine, trajectories, states, 3, derive_seed(cfg.seed, analyze._GT), cfg)
        mc = analyze.branch_continuations(engine, trajectories, states, 3, derive_seed(cfg.seed, analyze._MC, 3), cfg)
        same = analyze.branch_continuations(engine, trajectories, states, 3, derive_seed(cfg.seed, analyze._GT), cfg)
    finally:
        engine.release([t.handle for t in trajectories])
    ids = [[c.token_ids for c in g] for g in gt]
    assert ids == [[c.token_ids for c in g] for g in same]
    assert ids != [[c.token_ids for c in g] for g in mc]


def test_results_do_not_depend_on_chunking(tiny, chunked, monkeypatch):
    model, tok = tiny
    cfg = ValuesConfig(**CFG)
    whole = analyze_values(_engine(model, tok), chunked, tok, chunked.test[:2], cfg)
    monkeypatch.setattr(analyze, "SEQUENCES_PER_CALL", 4)  # one state / alternative per engine call
    chunked_result = analyze_values(_engine(model, tok), chunked, tok, chunked.test[:2], cfg)
    assert [(s.ground_truth, s.estimates) for s in chunked_result.states] == \
        [(s.ground_truth, s.estimates) for s in whole.states]
    assert [(c.ground_truth, c.estimates) for c in chunked_result.choices] == \
        [(c.ground_truth, c.estimates) for c in whole.choices]
    assert {k: p.tokens for k, p in chunked_result.phases.items()} == {k: p.tokens for k, p in whole.phases.items()}


@pytest.mark.parametrize("fail_after", [0, 5])
def test_kept_trajectories_are_released_on_failure(tiny, chunked, monkeypatch, fail_after):
    model, tok = tiny
    engine = _engine(model, tok)
    calls = []

    def failing(task, text, example, finish_reason):
        calls.append(text)
        if len(calls) > fail_after:  # 0: while grading trajectories; 5: in the ground-truth phase
            raise RuntimeError("grader broke")
        return 0.0
    monkeypatch.setattr("vineppo.rollout.score", failing)
    with pytest.raises(RuntimeError, match="grader broke"):
        analyze_values(engine, chunked, tok, chunked.test[:3], ValuesConfig(**CFG))
    assert engine.num_free_pages == engine.num_pages


def _state(step, gt, **estimates):
    return State(problem=0, example_id="x", step=step, offset=step, num_steps=3, trajectory_reward=0.0,
                 ground_truth=gt, estimates=estimates)


def test_mae_overall_and_by_step():
    states = [_state(0, 0.5, mc=0.0, critic=0.5), _state(0, 0.25, mc=1.0, critic=0.0),
              _state(1, 1.0, mc=1.0, critic=0.5), _state(2, 0.0, mc=0.5, critic=-0.5)]
    assert mean_absolute_error(states, "mc") == pytest.approx((0.5 + 0.75 + 0.0 + 0.5) / 4)
    assert mean_absolute_error(states, "critic") == pytest.approx((0.0 + 0.25 + 0.5 + 0.5) / 4)
    assert mae_by_step(states, "mc") == pytest.approx({0: 0.625, 1: 0.0, 2: 0.5})
    assert list(mae_by_step(states, "critic")) == [0, 1, 2]
    with pytest.raises(ValueError):
        mean_absolute_error([], "mc")


def test_top1_accuracy_with_ties():
    gt = [[0.2, 0.5, 0.5],   # pick 1: a best one
          [0.2, 0.5, 0.5],   # pick 2: tied best, also right
          [0.6, 0.5, 0.1],   # estimator tie 0/1 -> first index 0: right
          [0.1, 0.5, 0.1],   # pick 0: wrong
          [0.3, 0.3, 0.3]]   # all equal: any pick is right
    est = [[0.1, 0.9, 0.3], [0.1, 0.3, 0.9], [0.5, 0.5, 0.1], [0.9, 0.2, 0.1], [0.0, 1.0, 0.0]]
    out = top1_accuracy(gt, est)
    assert out["accuracy"] == pytest.approx(4 / 5)
    assert out["num_states"] == 5 and out["num_all_equal"] == 1 and out["num_differ"] == 4
    assert out["accuracy_when_differ"] == pytest.approx(3 / 4)
    chance = chance_accuracy(gt)
    assert chance["accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 3 + 1 / 3 + 1) / 5)
    assert chance["accuracy_when_differ"] == pytest.approx(0.5)
    assert top1_accuracy([[1.0, 1.0]], [[0.0, 1.0]])["accuracy_when_differ"] is None
    with pytest.raises(ValueError):
        top1_accuracy([[0.1, 0.2]], [[0.1]])


def test_critic_reads_the_last_token_of_each_state(tiny):
    from vineppo.models import ValueModel
    from vineppo.rollout import Episode, to_rollout_batch
    from vineppo.scoring import response_values

    model, tok = tiny
    vm = ValueModel.from_policy(model, head_seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    items = []
    for p_len, r_len in ((5, 7), (9, 3), (3, 10)):
        p = torch.randint(4, len(tok), (p_len,), generator=gen).tolist()
        r = torch.randint(4, len(tok), (r_len,), generator=gen).tolist()
        items.append((p, r, list(range(r_len + 1))))  # every state, the one after the last token too
    got = critic_values(vm, items, tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        for (p, r, offs), values in zip(items, got):
            for o, v in zip(offs, values):
                alone = vm(torch.tensor([p + r[:o]]))[0, -1]
                assert v == pytest.approx(float(alone), abs=1e-5)
        # and exactly where the trainer reads V(s_t) from the same padded episodes
        episodes = [Episode(example_id="x", group_id=i, prompt_ids=p, response_ids=r, engine_logprobs=[0.0] * len(r),
                            finish_reason="stop", text="", reward=0.0, step_offsets=[0])
                    for i, (p, r, _) in enumerate(items)]
        packed, _ = to_rollout_batch(episodes, tok.pad_token_id)
        trainer_values = response_values(vm, packed.input_ids, packed.attention_mask, packed.response_start)
    for i, ((_, r, _), values) in enumerate(zip(items, got)):
        assert values[:len(r)] == pytest.approx(trainer_values[i, :len(r)].tolist(), abs=1e-5)


def test_next_step_cuts_at_the_first_boundary(tiny):
    from vineppo.tasks import Example, load_task

    _, tok = tiny
    task = load_task("synthetic", None, num_train=10, num_test=2)
    example = Example(id="e", question="3 + 4 - 2 + 1", answer="6", solution="")

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]
    prefix = ids(" 3 + 4 = 7\n")
    cont = Completion(ids("7 - 2 = 5\n5 + 1 = 6\n#### 6") + [tok.eos_token_id], [], "stop")
    alt = next_step(task, tok, example, prefix, cont)
    assert not alt.terminal and alt.text == "7 - 2 = 5\n" and alt.token_ids == ids("7 - 2 = 5\n")
    # the answer line is merged into the step before it: that step ends the response
    last = Completion(ids("5 + 1 = 6\n#### 6") + [tok.eos_token_id], [], "stop")
    alt = next_step(task, tok, example, prefix + ids("7 - 2 = 5\n"), last)
    assert alt.terminal and alt.reward == 1.0 and alt.token_ids == last.token_ids
    wrong = Completion(ids("5 + 1 = 7\n#### 7"), [], "length")
    alt = next_step(task, tok, example, prefix, wrong)
    assert alt.terminal and alt.reward == 0.0


def _save_run_checkpoint(tmp_path, model, tok, vm, flat: bool) -> str:
    from vineppo.checkpoint import TrainState, save_checkpoint

    state = TrainState(iteration=2)
    if flat:  # as the trainer saves it: one flat safetensors file of the critic's state dict
        return save_checkpoint(str(tmp_path / "run"), state, model, value_model=torch.nn.Module(),
                               value_model_state_dict=vm.state_dict(), tokenizer=tok)
    return save_checkpoint(str(tmp_path / "run"), state, model, value_model=vm, tokenizer=tok)


@pytest.mark.parametrize("flat", [True, False])
def test_load_value_model_from_a_run_checkpoint(tiny, tmp_path, flat):
    from vineppo.models import ValueModel

    model, tok = tiny
    vm = ValueModel.from_policy(model, head_seed=7).eval()
    with torch.no_grad():
        vm.score.bias.fill_(0.25)
        next(vm.backbone.parameters()).add_(0.01)
    path = _save_run_checkpoint(tmp_path, model, tok, vm, flat)
    loaded = load_value_model(path, model, "cpu")
    x = torch.tensor([[5, 9, 12, 30, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(x), vm(x), atol=1e-6)
    with pytest.raises(ValueError, match="value_model"):
        load_value_model(str(tmp_path), model, "cpu")


def test_cli_end_to_end(tiny, tmp_path, monkeypatch, capsys):
    from vineppo.models import ValueModel

    monkeypatch.setattr(SyntheticTask, "_split", _chunks)
    monkeypatch.setattr("vineppo.rollout.score", _parity)
    model, tok = tiny
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    ckpt = _save_run_checkpoint(tmp_path, model, tok, ValueModel.from_policy(model, head_seed=1), flat=True)
    out = tmp_path / "out"
    summary = analyze.main(["values", "--model", model_dir, "--task", "synthetic", "--task-arg", "num_train=10",
                            "--task-arg", "num_test=5", "--num-problems", "3", "--gt-rollouts", "8", "--ks", "1,3",
                            "--alternatives", "2", "--max-tokens", "12", "--max-states-per-trajectory", "3",
                            "--value-model", ckpt, "--device", "cpu", "--num-pages", "256",
                            "--output-dir", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "Mean absolute error" in printed and "top-1" in printed
    assert sorted(os.listdir(out)) == ["mae_by_step.png", "scatter.png", "values.json", "values.md"]
    saved = json.loads((out / "values.json").read_text())
    for key in ("settings", "num_problems", "num_states", "estimators", "mae", "mae_by_step", "states_by_step",
                "choice", "seconds", "tokens", "trajectories", "states", "choices"):
        assert key in saved, key
    assert saved["estimators"] == ["mc_1", "mc_3", "critic"] == summary["estimators"]
    assert saved["num_problems"] == 3 and (saved["settings"]["task_config"]["num_train"],
                                            saved["settings"]["task_config"]["num_test"]) == (10, 5)
    assert saved["num_states"] == len(saved["states"]) == sum(len(t["step_offsets"]) for t in saved["trajectories"])
    assert set(saved["states"][0]) >= {"step", "ground_truth", "estimates"}
    assert set(saved["states"][0]["estimates"]) == {"mc_1", "mc_3", "critic"}
    assert set(saved["mae"]) == set(saved["mae_by_step"]) == {"mc_1", "mc_3", "critic"}
    assert all(0.0 <= saved["mae"][n] <= 1.0 for n in ("mc_1", "mc_3"))
    choice = saved["choice"]
    assert choice["num_states"] == saved["num_states"] == len(saved["choices"])
    assert set(choice["top1"]) == {"mc_1", "mc_3", "critic"}
    assert all(0.0 <= v["accuracy"] <= 1.0 for v in choice["top1"].values())
    phases = ("trajectories", "ground_truth", "mc_1", "mc_3", "critic", "choice/alternatives",
              "choice/ground_truth", "choice/mc_1", "choice/mc_3", "choice/critic", "total")
    assert set(saved["seconds"]) == set(saved["tokens"]) == set(phases)
    assert saved["tokens"]["total"] == sum(v for k, v in saved["tokens"].items() if k != "total") > 0
    assert saved["tokens"]["critic"] == 0 and saved["tokens"]["ground_truth"] > 0
    md = (out / "values.md").read_text()
    assert "| critic |" in md and "MAE by step index" in md and "random pick" in md
    for png in ("mae_by_step.png", "scatter.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
