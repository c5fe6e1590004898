"""Reading back the task a checkpoint was trained on (SFT folder or RL run folder)."""

import dataclasses
import json

import pytest

from vineppo.saved_task import choose_task, saved_task
from vineppo.tasks import TaskConfig


def _sft_folder(path, template="plain", **task):
    path.mkdir(parents=True)
    (path / "sft_settings.json").write_text(json.dumps(
        {"task": dataclasses.asdict(TaskConfig(**task)), "template": template, "model": "tiny"}))
    return path


def test_saved_task_of_sft_and_run_folders(tmp_path):
    sft_dir = _sft_folder(tmp_path / "sft" / "synthetic-abc", num_steps=2, seed=4)
    s = saved_task(str(sft_dir))
    assert (s.task.name, s.template, s.task.num_steps, s.task.seed) == ("synthetic", "plain", 2, 4)

    from vineppo.config import load_config

    cfg = load_config(["--task.num_steps", "4", "--task.seed", "9", "--seed", "5"])
    run = tmp_path / "run"
    model_dir = run / "checkpoints" / "iter_000003" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))  # the HF config
    cfg.save(run)
    s = saved_task(str(model_dir))
    assert s.task.name == cfg.task.name == "synthetic"
    assert s.task.num_steps == 4 and s.task.seed == 9   # the data seed, not --seed
    assert s.template == cfg.rollout.template
    assert saved_task(str(tmp_path / "nowhere")).task is None


def test_choose_task_layers_arguments_over_the_checkpoint(tmp_path):
    sft_dir = _sft_folder(tmp_path / "sft", template="chat", num_steps=2, seed=4)
    c, template = choose_task(str(sft_dir), None, None, None, ["max_operand=5"], task_seed=7)
    assert (c.name, c.path, template) == ("synthetic", "", "chat")
    assert (c.num_steps, c.seed, c.max_operand) == (2, 7, 5)
    other, template = choose_task(str(sft_dir), "gsm8k", "data/gsm8k", "plain", [])
    assert (other.name, other.path, template) == ("gsm8k", "data/gsm8k", "plain")
    assert other == TaskConfig(name="gsm8k", path="data/gsm8k")
    bare, template = choose_task("HuggingFaceTB/SmolLM2-135M-Instruct", None, None, None, [])
    assert (bare.name, template) == ("gsm8k", "plain") and bare == TaskConfig(name="gsm8k")
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        choose_task(str(sft_dir), None, None, None, ["num_steps"])
    with pytest.raises(ValueError, match="num_steps"):
        choose_task(str(sft_dir), None, None, None, ["num_steps=0"])
