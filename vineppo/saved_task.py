"""The task a saved model was trained on, read back from the folder it was saved in.

An SFT checkpoint records its job (the task config and the prompt template) in
sft_settings.json; a run checkpoint's model folder (``<run>/checkpoints/iter_X/model``) sits
below the run's config.json. Evaluation and analysis default to that task, with the same
synthetic knobs and generator seed, so a checkpoint is measured on the problems it was held out
from rather than on a freshly drawn set.
"""

from __future__ import annotations

import dataclasses
import json
import os

from vineppo.settings import set_field
from vineppo.tasks import TaskConfig

SFT_SETTINGS_FILE = "sft_settings.json"   # written by vineppo.sft beside the checkpoint
RUN_CONFIG_FILE = "config.json"           # written by vineppo.train into the run folder


@dataclasses.dataclass
class SavedTask:
    """The task a checkpoint was trained on and its prompt template (None when not found)."""
    task: TaskConfig | None = None
    template: str | None = None


def _task_config(data: dict) -> TaskConfig:
    known = {f.name for f in dataclasses.fields(TaskConfig)}
    return TaskConfig(**{k: v for k, v in data.items() if k in known})


def saved_task(model_path: str, levels: int = 4) -> SavedTask:
    """An SFT checkpoint's sft_settings.json, or the config.json of the run a checkpoint's model
    folder sits in (``<run>/checkpoints/iter_X/model``), from the model folder up `levels` parents."""
    path = os.path.abspath(model_path)
    for _ in range(levels):
        if os.path.isdir(path):
            for name in (SFT_SETTINGS_FILE, RUN_CONFIG_FILE):
                file = os.path.join(path, name)
                if os.path.isfile(file):
                    with open(file) as f:
                        data = json.load(f)
                    # a run's config.json has a task section; a Hugging Face config.json has not
                    if isinstance(data.get("task"), dict) and "name" in data["task"]:
                        template = data.get("template") or data.get("rollout", {}).get("template")
                        return SavedTask(_task_config(data["task"]), template)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return SavedTask()


def choose_task(model_path: str, task: str | None, data: str | None, template: str | None,
                task_args: list[str], task_seed: int | None = None) -> tuple[TaskConfig, str]:
    """(task config, template) of a command: --task/--data/--template win; the checkpoint's task
    config applies when its task is the one chosen; --task-seed and --task-arg FIELD=VALUE
    (TaskConfig fields) go on top. Defaults: gsm8k, plain template."""
    saved = saved_task(model_path) if os.path.exists(model_path) else SavedTask()
    name = task or (saved.task.name if saved.task else "gsm8k")
    cfg = dataclasses.replace(saved.task) if saved.task and saved.task.name == name else TaskConfig(name=name)
    if data:
        cfg.path = data
    if task_seed is not None:
        cfg.seed = task_seed
    for item in task_args:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-arg expects FIELD=VALUE, got {item!r}")
        set_field(cfg, key, value, "--task-arg")
    cfg.__post_init__()   # validate what the arguments set
    return cfg, template or saved.template or "plain"
