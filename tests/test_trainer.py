"""The training loop end to end on a tiny random model: every algo, engine/trainer agreement,
resume equality, NaN handling and the command line."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from vineppo.config import load_config
from vineppo.distributed import DistContext
from vineppo.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("time/", "wall_clock_s", "eval/seconds")


@pytest.fixture
def parity_reward(monkeypatch):
    """Reward = parity of the response's character codes: a random model earns it half the time,
    so every estimator sees non-zero advantages and the policy really changes."""
    # responses of a random model run into the token budget, which the real reward scores 0
    monkeypatch.setattr("vineppo.rollout.score",
                        lambda task, text, example, finish_reason: float(sum(map(ord, text)) % 2))


@dataclass
class Trained:
    run: object
    state: object


def train(argv) -> Trained:
    from vineppo.train import build_run, resume_config
    from vineppo.trainer import train as train_run

    cfg = load_config(argv)
    if cfg.run.resume:
        cfg = resume_config(cfg, argv)
    run, state = build_run(cfg, DistContext())
    try:
        train_run(run, state)
    finally:
        run.log.close()
    return Trained(run, state)


def training_lines(run_dir):
    return [m for m in read_metrics(str(run_dir)) if "reward/mean" in m]


@pytest.mark.parametrize("algo", ["vineppo", "ppo", "grpo", "rloo"])
def test_two_iterations_each_algo(algo, tiny_model_dir, tmp_path, parity_reward, train_args):
    initial = {k: v.clone() for k, v in train_initial(tiny_model_dir).items()}
    run = train(train_args(tiny_model_dir, tmp_path / "run", algo)).run
    lines = training_lines(tmp_path / "run")
    assert [m["iteration"] for m in lines] == [1, 2]
    evals = [m for m in read_metrics(str(tmp_path / "run")) if "eval/accuracy" in m]
    assert [m["iteration"] for m in evals] == [0, 2]   # before training and at the end
    for m in lines:
        for key in ("reward/mean", "loss/policy", "loss/kl", "policy/entropy", "policy/clip_frac",
                    "policy/ratio_mean", "policy/engine_ratio_mean", "tokens/generated", "time/generation",
                    "time/logprobs", "time/update", "time/weight_sync", "wall_clock_s", "optim/lr"):
            assert m[key] is not None, key
        # engine and trainer score the sampled tokens alike before the update (fp32, no top-p);
        # in iteration 2 this also shows the engine serves the updated weights
        assert m["policy/engine_ratio_max_abs_log"] < 1e-4
        assert m["train/grad_steps"] == 2 * m["iteration"] * 2   # 2 epochs x 2 minibatches
        assert m["episodes"] == 8 * m["iteration"]
    if algo == "vineppo":
        assert lines[0]["rollout/num_states"] > 0 and lines[0]["tokens/mc"] > 0
        assert lines[0]["time/mc_rollouts"] > 0
    if algo == "ppo":
        assert lines[0]["loss/value"] is not None and "value/mean" in lines[0]
    moved = max(float((p.detach() - initial[n]).abs().max()) for n, p in run.policy.model.named_parameters())
    assert moved > 1e-4
    assert run.engine_model is run.policy.model     # one process: the engine reads the weights in place
    ckpts = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert ckpts == ["iter_000001", "iter_000002"]
    samples = [json.loads(l) for l in open(tmp_path / "run" / "samples.jsonl")]
    assert samples and all(len(s["steps"]) == len(s["step_advantages"]) for s in samples)
    assert os.path.isfile(tmp_path / "run" / "config.yaml")
    if algo == "grpo":   # the final policy folder loads with plain transformers and equals the trained weights
        from transformers import AutoModelForCausalLM, AutoTokenizer

        final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
        AutoTokenizer.from_pretrained(tmp_path / "run" / "policy")
        trained = run.policy.model.state_dict()
        assert all(torch.equal(v, trained[k]) for k, v in final.state_dict().items())


def test_engine_ratio_under_top_p(tiny_model_dir, tmp_path, parity_reward, train_args):
    """With top-p the engine scores tokens within the kept set; the trainer renormalises alike."""
    train(train_args(tiny_model_dir, tmp_path / "run", "grpo", "--rollout.top_p", "0.8",
                     "--ppo.num_iterations", "1"))
    (m,) = training_lines(tmp_path / "run")
    assert m["policy/top_p_log_mass_mean"] < -1e-3        # the filter did cut mass
    assert m["policy/engine_ratio_max_abs_log"] < 1e-4


def train_initial(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def test_engine_sees_update_in_place(tiny_model_dir, tmp_path, parity_reward, train_args):
    """After an iteration, the engine's logprobs of a fixed response equal the updated policy's."""
    from vineppo.engine import SamplingParams
    from vineppo.scoring import token_logprobs

    run = train(train_args(tiny_model_dir, tmp_path / "run", "grpo", "--ppo.num_iterations", "1",
                           "--eval.at_start", "false")).run
    prompt = [run.tokenizer.bos_token_id or 1] + run.tokenizer("Start with 3.")["input_ids"]
    out = run.engine.generate([prompt], SamplingParams(temperature=0.6, max_tokens=10, seed=5,
                                                       ignore_eos=True))[0][0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logits = run.policy.model(ids).logits[0, len(prompt) - 1:-1]
    ours = token_logprobs(logits, ids[0, len(prompt):], 0.6)
    torch.testing.assert_close(ours, torch.tensor(out.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("algo", ["vineppo", "ppo"])
def test_resume_is_bit_for_bit(algo, tiny_model_dir, tmp_path, parity_reward, train_args):
    straight = train(train_args(tiny_model_dir, tmp_path / "a", algo))
    train(train_args(tiny_model_dir, tmp_path / "b", algo, "--run.max_iterations", "1"))
    assert len(training_lines(tmp_path / "b")) == 1
    resumed = train(["--resume", str(tmp_path / "b"), "--run.progress", "false", "--run.tensorboard", "false"])
    assert resumed.state.iteration == 2
    straight, resumed = straight.run, resumed.run
    for (n, a), (_, b) in zip(straight.policy.model.named_parameters(), resumed.policy.model.named_parameters()):
        assert torch.equal(a, b), n
    for (n, a), (_, b) in zip(straight.policy.optimizer.state_dict()["state"].items(),
                              resumed.policy.optimizer.state_dict()["state"].items()):
        assert all(torch.equal(a[k], b[k]) for k in a), n
    if algo == "ppo":
        for (n, a), (_, b) in zip(straight.critic.model.state_dict().items(),
                                  resumed.critic.model.state_dict().items()):
            assert torch.equal(a, b), n
        assert resumed.critic.scheduler.last_epoch == straight.critic.scheduler.last_epoch

    # the budget-capped first half also evaluated at its end; apart from that, every logged value
    # (rewards, losses, ratios, advantages, eval accuracies) is the same
    def strip(lines):
        out = [{k: v for k, v in m.items() if not k.startswith(TIMING + ("eval/",))} for m in lines]
        return [m for m in out if len(m) > 1]
    a, b = read_metrics(str(tmp_path / "a")), read_metrics(str(tmp_path / "b"))
    assert strip(a) == strip(b) and len(strip(a)) == 2
    evals = lambda lines: {m["iteration"]: m["eval/accuracy"] for m in lines if "eval/accuracy" in m}  # noqa: E731
    assert evals(a) == {k: v for k, v in evals(b).items() if k != 1}


def test_nan_loss_is_skipped_then_stops(tiny_model_dir, tmp_path, parity_reward, monkeypatch, train_args):
    from vineppo import algos
    from vineppo.learner import TrainingStopped

    real = algos.policy_loss
    calls = {"n": 0}

    def flaky(*args, **kw):
        loss, stats = real(*args, **kw)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] <= 2 else loss), stats
    monkeypatch.setattr(algos, "policy_loss", flaky)
    # micro-batches 1 and 2 form the first minibatch: one skipped update, then training goes on
    trained = train(train_args(tiny_model_dir, tmp_path / "ok", "grpo", "--ppo.num_iterations", "1",
                               "--run.max_nan_skips", "3"))
    (line,) = training_lines(tmp_path / "ok")
    assert line["optim/skipped_updates"] == 1 and line["train/grad_steps"] == 3
    assert trained.state.nan_skips == 1

    monkeypatch.setattr(algos, "policy_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(TrainingStopped, match="max_nan_skips=2"):
        train(train_args(tiny_model_dir, tmp_path / "bad", "grpo", "--run.max_nan_skips", "2"))


def test_cli_default_with_budget(tiny_model_dir, tmp_path, train_args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "vineppo.train", *train_args(tiny_model_dir, tmp_path / "cli", "vineppo"),
           "--run.max_iterations", "1", "--eval.at_start", "false"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run folder: {tmp_path / 'cli'}" in proc.stdout
    assert "done: 1 iterations" in proc.stdout
    assert "python bench/compare_algos.py" in proc.stdout     # the default preset names its comparison
    assert [m["iteration"] for m in training_lines(tmp_path / "cli")] == [1]
    bad = subprocess.run([sys.executable, "-m", "vineppo.train", "--ppo.lrr", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown option --ppo.lrr" in bad.stderr


def test_training_time_budget_excludes_evaluation(tiny_model_dir, tmp_path, parity_reward, monkeypatch, train_args):
    """run.max_train_minutes counts iterations only (the metrics' wall_clock_s), not evaluation,
    and the run goes on while one more iteration as long as the last one still fits."""
    import vineppo.trainer as trainer_mod

    real_iteration = trainer_mod.iteration

    def one_second_iteration(run, state):      # a fixed clock keeps the test independent of load
        return dict(real_iteration(run, state), **{"time/iteration": 1.0})

    monkeypatch.setattr(trainer_mod, "iteration", one_second_iteration)
    monkeypatch.setattr(trainer_mod, "evaluate",
                        lambda run: {"eval/accuracy": 0.0, "eval/num_problems": 0, "time/eval": 100.0})
    train(train_args(tiny_model_dir, tmp_path / "budget", "grpo", "--ppo.num_iterations", "50",
                     "--eval.every", "1", "--ppo.epochs", "1", "--run.max_minutes", "0",
                     "--run.max_train_minutes", str(3.5 / 60)))
    lines = training_lines(tmp_path / "budget")
    # 1 + 1 and 2 + 1 seconds fit in 3.5; 3 + 1 does not
    assert [m["wall_clock_s"] for m in lines] == [1.0, 2.0, 3.0]


class SlowClock:
    """A stand-in for the `time` module whose clocks jump ten minutes at every reading: a machine
    thousands of times slower, or one crowded by other work."""

    def __init__(self):
        self.now = 0.0

    def _tick(self) -> float:
        self.now += 600.0
        return self.now

    perf_counter = time = monotonic = _tick


def test_same_seed_same_metrics_on_a_slow_machine(tmp_path, monkeypatch):
    """Budgets are steps and iterations, not minutes: SFT from scratch and two VinePPO iterations
    give the same logged values, and the same weights, however slow the clock says the machine is."""
    def run(run_dir, output_dir):
        argv = ["--model.name", "tiny", "--run.output_dir", str(output_dir), "--run.run_dir", str(run_dir),
                "--sft.num_examples", "48", "--sft.batch_size", "16", "--task.num_train", "64",
                "--task.num_test", "8", "--rollout.num_prompts", "2", "--rollout.num_samples", "2",
                "--rollout.mc_rollouts", "2", "--rollout.max_steps", "3", "--rollout.max_tokens", "24",
                "--ppo.num_iterations", "2", "--ppo.minibatch_size", "4", "--ppo.micro_batch_size", "2",
                "--eval.limit", "4", "--eval.every", "1", "--run.progress", "false",
                "--run.tensorboard", "false", "--run.device", "cpu"]
        return train(argv).run

    quick = run(tmp_path / "quick", tmp_path / "out-quick")
    for module in ("sft", "trainer", "train", "rollout", "evaluate"):
        monkeypatch.setattr(f"vineppo.{module}.time", SlowClock())
    slow = run(tmp_path / "slow", tmp_path / "out-slow")

    def logged(run_dir):
        lines = [{k: v for k, v in m.items() if not k.startswith(TIMING)} for m in read_metrics(str(run_dir))]
        return [m for m in lines if len(m) > 1]
    assert logged(tmp_path / "quick") == logged(tmp_path / "slow")
    assert [m["iteration"] for m in training_lines(tmp_path / "slow")] == [1, 2]
    for (n, a), (_, b) in zip(quick.policy.model.named_parameters(), slow.policy.model.named_parameters()):
        assert torch.equal(a, b), n
