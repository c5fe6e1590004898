"""Reading back the task a checkpoint was trained on (SFT folder or RL run folder)."""

import json

from vineppo.saved_task import choose_task, parse_task_args, saved_settings


def test_saved_settings_of_sft_and_run_folders(tmp_path):
    sft_dir = tmp_path / "sft" / "synthetic-abc"
    sft_dir.mkdir(parents=True)
    (sft_dir / "sft_settings.json").write_text(json.dumps(
        {"task": "synthetic", "task_path": "", "task_knobs": {"num_steps": 2}, "template": "plain", "seed": 4}))
    s = saved_settings(str(sft_dir))
    assert (s.task, s.template, s.task_kwargs) == ("synthetic", "plain", {"num_steps": 2, "seed": 4})

    from vineppo.config import load_config

    cfg = load_config(["--task.num_steps", "4", "--task.seed", "9", "--seed", "5"])
    run = tmp_path / "run"
    model_dir = run / "checkpoints" / "iter_000003" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))  # the HF config
    cfg.save(run)
    s = saved_settings(str(model_dir))
    assert s.task == cfg.task.name == "synthetic"
    assert s.task_kwargs["num_steps"] == 4 and s.task_kwargs["seed"] == 9   # the data seed, not --seed
    assert saved_settings(str(tmp_path / "nowhere")).task is None
    assert parse_task_args(["num_steps=3", "name=x"]) == {"num_steps": 3, "name": "x"}


def test_choose_task_layers_arguments_over_the_checkpoint(tmp_path):
    sft_dir = tmp_path / "sft"
    sft_dir.mkdir()
    (sft_dir / "sft_settings.json").write_text(json.dumps(
        {"task": "synthetic", "task_path": "", "task_knobs": {"num_steps": 2}, "template": "chat", "seed": 4}))
    c = choose_task(str(sft_dir), None, None, None, ["max_operand=5"], task_seed=7)
    assert (c.name, c.data, c.template) == ("synthetic", None, "chat")
    assert c.kwargs == {"num_steps": 2, "seed": 7, "max_operand": 5}
    other = choose_task(str(sft_dir), "gsm8k", "data/gsm8k", "plain", [])
    assert (other.name, other.data, other.kwargs, other.template) == ("gsm8k", "data/gsm8k", {}, "plain")
    bare = choose_task("HuggingFaceTB/SmolLM2-135M-Instruct", None, None, None, [])
    assert (bare.name, bare.kwargs, bare.template) == ("gsm8k", {}, "plain")
