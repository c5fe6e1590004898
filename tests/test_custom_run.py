"""A user's own task, reward and model through the training command: a task defined in this file
(by import path and by YAML), the custom-task preset, every algo, a fractional reward, rewards
that fail, other architectures, the saved policy, wandb and the completions table."""

import json
import os
import sys
import types

import pytest

from vineppo.metrics import read_jsonl, read_metrics
from vineppo.tasks import Example, Grade, Task
from vineppo.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = __name__
CALLS = {"n": 0}


# --- the user's code --------------------------------------------------------------------------------

class CountTask(Task):
    """'Count to N': reward 1 when the last line is N; a step per line."""

    def _grade(self, response, example):
        lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
        return Grade(float(bool(lines) and lines[-1] == example.answer))

    def _split(self, response):
        from vineppo.tasks import split_newline_steps

        return split_newline_steps(response)


def make_task():
    ex = [Example(id=f"count-{n}", question=f"Count to {n}.", answer=str(n),
                  solution="\n".join(str(i) for i in range(1, n + 1))) for n in range(1, 9)]
    return CountTask(name="count", train=ex, test=ex[:4])


def digit_fraction(text, example):
    """A non-binary reward: the fraction of the response's characters that are digits."""
    CALLS["n"] += 1
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def _after(n, bad):
    def reward(text, example):
        CALLS["n"] += 1
        return bad() if CALLS["n"] > n else 0.5
    return reward


def _raise():
    raise KeyError("missing")


def _sleep():
    import time

    time.sleep(30)
    return 1.0


# fine for the initial evaluation (2) and the first grpo iteration (8), then bad
raises_later = _after(10, _raise)
nan_later = _after(10, lambda: float("nan"))
string_later = _after(10, lambda: "0.5")
big_later = _after(10, lambda: 1.5)
hangs_later = _after(10, _sleep)


# --- helpers ----------------------------------------------------------------------------------------

@pytest.fixture
def grade_truncated(monkeypatch):
    """Grade every response, also those cut off by the token budget (a random model's usually
    are, and the real rule scores those 0), so that the reward function really decides."""
    def score(task, text, example, finish_reason):
        return float(task.grade(text, example))

    monkeypatch.setattr("vineppo.rollout.score", score)
    monkeypatch.setattr("vineppo.evaluate.score", score)
    CALLS["n"] = 0


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def train(argv):
    from vineppo.config import load_config
    from vineppo.distributed import DistContext
    from vineppo.train import build_run
    from vineppo.trainer import train as train_run

    run, state = build_run(load_config(argv), DistContext())
    try:
        train_run(run, state)
    finally:
        run.log.close()
    return run, state


def training_lines(run_dir):
    return [m for m in read_metrics(str(run_dir)) if "reward/mean" in m]


# --- runs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algo", ["vineppo", "ppo", "grpo", "rloo"])
def test_factory_task_with_fractional_reward_each_algo(algo, tiny_model_dir, tmp_path, train_args, grade_truncated):
    run_dir = tmp_path / "run"
    run, state = train(train_args(tiny_model_dir, run_dir, algo, "--task.factory", f"{HERE}:make_task",
                                  "--task.reward", f"{HERE}:digit_fraction"))
    assert run.task.name == "count" and state.iteration == 2 and CALLS["n"] > 0
    lines = training_lines(run_dir)
    assert [m["iteration"] for m in lines] == [1, 2]
    samples = read_jsonl(str(run_dir / "samples.jsonl"))
    rewards = [s["reward"] for s in samples]
    assert all(0 <= r <= 1 for r in rewards) and any(0 < r < 1 for r in rewards), rewards
    if algo == "vineppo":   # MC values are means of fractional rewards, not 0/1 fractions of K
        values = [v for s in samples for v in s["step_values"]]
        assert any(0 < v < 1 and v != 0.5 for v in values), values
    completions = read_jsonl(str(run_dir / "completions.jsonl"))
    assert completions and {c["iteration"] for c in completions} == {2}
    assert set(completions[0]) >= {"prompt", "response", "steps", "values", "advantages", "reward"}
    assert completions[0]["prompt"].startswith("[MATH_TASK] Problem:\nCount to")
    assert "".join(completions[0]["steps"]) == completions[0]["response"]


def test_factory_task_from_yaml(tiny_model_dir, tmp_path, train_args, grade_truncated):
    path = tmp_path / "task.yaml"
    path.write_text(f"task:\n  factory: {HERE}:make_task\n  reward: {HERE}:digit_fraction\n")
    run, state = train(["--config", str(path), *train_args(tiny_model_dir, tmp_path / "run", "vineppo")])
    assert run.task.name == "count" and state.iteration == 2 and CALLS["n"] > 0
    saved = json.load(open(tmp_path / "run" / "config.json"))["task"]
    assert saved["factory"] == f"{HERE}:make_task" and saved["reward"] == f"{HERE}:digit_fraction"


def test_custom_task_preset(tiny_model_dir, tmp_path, train_args, monkeypatch, capsys):
    """configs/custom-task.yaml (a JSONL file, regex grader, own prompt) through the command line."""
    monkeypatch.chdir(REPO)
    args = ["--preset", "custom-task", *train_args(tiny_model_dir, tmp_path / "run", "grpo"),
            "--rollout.template", "plain"]
    result = main(args)
    assert "eval/accuracy" in result
    samples = read_jsonl(str(tmp_path / "run" / "samples.jsonl"))
    assert samples[0]["prompt"].startswith("Question: What is") and samples[0]["prompt"].endswith("Solution:")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = tmp_path / "run" / "policy"
    model = AutoModelForCausalLM.from_pretrained(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.decode(tok("Answer: 5")["input_ids"]) == "Answer: 5"


@pytest.mark.parametrize("reward, message", [
    ("raises_later", "raised KeyError: 'missing' on example 'count-"),
    ("nan_later", "returned nan, not a number in [0, 1]"),
    ("string_later", "returned str '0.5', not a number in [0, 1]"),
    ("big_later", "returned 1.5, outside [0, 1]"),
])
def test_bad_reward_stops_with_the_last_checkpoint(reward, message, tiny_model_dir, tmp_path, train_args,
                                                   grade_truncated, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run_cli(train_args(tiny_model_dir, run_dir, "grpo", "--task.factory", f"{HERE}:make_task",
                                      "--task.reward", f"{HERE}:{reward}", "--eval.at_start", "true"), capsys)
    assert code == 1 and "Traceback" not in err, err
    assert message in err and f"reward function {HERE}:{reward}" in err
    assert "last checkpoint:" in err and "iter_000001" in err and "--resume" in err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["iter_000001"]


def test_hanging_reward_is_cut_and_counted(tiny_model_dir, tmp_path, train_args, grade_truncated, capsys):
    run_dir = tmp_path / "run"
    result = main(train_args(tiny_model_dir, run_dir, "grpo", "--task.factory", f"{HERE}:make_task",
                             "--task.reward", f"{HERE}:hangs_later", "--task.reward_time_limit", "0.2",
                             "--eval.at_start", "true"))
    lines = training_lines(run_dir)
    assert lines[0]["grader/timed_out"] == 0 and lines[1]["grader/timed_out"] == lines[1]["grader/graded"] == 8
    assert result["eval/grader_timed_out"] == 2   # every final evaluation call hung and was cut
    assert "ran out of the grader's budget" in capsys.readouterr().out


def test_bad_task_settings_stop_before_any_work(tiny_model_dir, tmp_path, train_args, capsys):
    for extra, message in [(["--task.grader", "regex:(("], "--task.grader: bad regular expression"),
                           (["--task.factory", "nowhere_xyz:f"], "cannot import 'nowhere_xyz'"),
                           (["--task.reward", "nowhere_xyz:f"], "cannot import 'nowhere_xyz'"),
                           (["--task.name", "custom"], "--task.path: the custom task needs")]:
        code, _, err = run_cli(train_args(tiny_model_dir, tmp_path / "run", "grpo", *extra), capsys)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "run").exists()


# --- models -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_train(arch, tiny_lm, tmp_path, train_args, grade_truncated):
    from vineppo.tasks import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    model = tiny_lm(arch, vocab=len(tok), layers=1, hidden=32, intermediate=64, heads=2, kv_heads=1)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    run, state = train(train_args(str(tmp_path / "model"), tmp_path / "run", "grpo", "--task.factory",
                                  f"{HERE}:make_task", "--ppo.num_iterations", "1", "--model.dtype", "float32"))
    assert type(run.policy.model).__name__.lower().startswith(arch) and state.iteration == 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    assert type(loaded).__name__ == type(model).__name__
    assert len(AutoTokenizer.from_pretrained(tmp_path / "run" / "policy")) == len(tok)


def test_unsupported_architecture_names_the_supported(tmp_path, tiny_model_dir, train_args, capsys):
    import transformers

    cfg = transformers.GPT2Config(vocab_size=104, n_embd=32, n_layer=1, n_head=2, n_positions=128)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    from vineppo.tasks import build_synthetic_tokenizer

    build_synthetic_tokenizer().save_pretrained(tmp_path / "gpt2")
    code, _, err = run_cli(train_args(str(tmp_path / "gpt2"), tmp_path / "run", "grpo"), capsys)
    assert code == 2 and "GPT2LMHeadModel" in err
    assert "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM" in err and "Traceback" not in err


# --- logging ----------------------------------------------------------------------------------------

class FakeWandb(types.ModuleType):
    """Records what a run hands to wandb."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((step, data))

            def finish(self):
                fake.finished += 1

        class Table:
            def __init__(self, columns, data):
                self.columns, self.data = columns, data

        self.Run, self.Table = Run, Table

    def init(self, **kw):
        self.inits.append(kw)
        return self.Run()


def test_wandb_gets_metrics_and_completions(tiny_model_dir, tmp_path, train_args, monkeypatch, grade_truncated):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(train_args(tiny_model_dir, tmp_path / "run", "grpo", "--task.factory", f"{HERE}:make_task",
                     "--task.reward", f"{HERE}:digit_fraction", "--log.wandb_project", "vineppo-test",
                     "--log.num_completions", "3", "--eval.every", "1"))
    assert len(fake.inits) == 1 and fake.inits[0]["project"] == "vineppo-test" and fake.finished == 1
    assert fake.inits[0]["config"]["task"]["factory"] == f"{HERE}:make_task"
    steps = [step for step, data in fake.logged if "reward/mean" in data]
    assert steps == [1, 2]
    tables = [(step, data["completions"]) for step, data in fake.logged if "completions" in data]
    assert [s for s, _ in tables] == [1, 2]
    table = tables[0][1]
    assert table.columns[:2] == ["iteration", "eval_accuracy"] and len(table.data) == 3
    assert {"prompt", "response", "steps", "values", "advantages", "reward"} <= set(table.columns)
    rows = read_jsonl(str(tmp_path / "run" / "completions.jsonl"))
    assert [r["iteration"] for r in rows] == [1, 1, 1, 2, 2, 2]


def test_wandb_project_without_wandb_is_a_clear_error(tiny_model_dir, tmp_path, train_args, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)   # import wandb raises ImportError
    code, _, err = run_cli(train_args(tiny_model_dir, tmp_path / "run", "grpo", "--log.wandb_project", "p"),
                           capsys)
    assert code == 2 and "--log.wandb_project is set but wandb is not installed" in err
    assert not (tmp_path / "run").exists()
