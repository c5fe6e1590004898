"""The task a saved model was trained on, read back from the folder it was saved in.

An SFT checkpoint records its task in sft_settings.json; a run checkpoint's model folder
(``<run>/checkpoints/iter_X/model``) sits below the run's config.json. Evaluation and analysis
default to that task, with the same synthetic knobs and generator seed, so a checkpoint is
measured on the problems it was held out from rather than on a freshly drawn set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


@dataclass
class SavedSettings:
    """The task a checkpoint was trained on, as its SFT folder or its RL run folder recorded it."""
    task: str | None = None
    data: str | None = None
    template: str | None = None
    task_kwargs: dict = field(default_factory=dict)


def saved_settings(model_path: str, levels: int = 4) -> SavedSettings:
    """An SFT checkpoint's sft_settings.json, or the config.json of the run a checkpoint's model
    folder sits in (``<run>/checkpoints/iter_X/model``), from the model folder up `levels` parents."""
    from vineppo.sft import SETTINGS_FILE

    path = os.path.abspath(model_path)
    for _ in range(levels):
        if not os.path.isdir(path):
            path = os.path.dirname(path)
            continue
        sft_file, run_file = os.path.join(path, SETTINGS_FILE), os.path.join(path, "config.json")
        if os.path.isfile(sft_file):
            with open(sft_file) as f:
                s = json.load(f)
            kwargs = {}
            if s.get("task") == "synthetic":
                kwargs = dict(s.get("task_knobs", {}), seed=s.get("task_seed", s.get("seed", 0)))
            return SavedSettings(s.get("task"), s.get("task_path") or None, s.get("template"), kwargs)
        if os.path.isfile(run_file):
            with open(run_file) as f:
                raw = json.load(f)
            if isinstance(raw.get("task"), dict) and "name" in raw["task"]:
                from vineppo.config import TrainConfig
                from vineppo.sft import synthetic_knobs

                cfg = TrainConfig.load(run_file)
                kwargs = {}
                if cfg.task.name == "synthetic":
                    kwargs = dict(synthetic_knobs(cfg.task), seed=cfg.task.seed)
                return SavedSettings(cfg.task.name, cfg.task.path or None, cfg.rollout.template, kwargs)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return SavedSettings()


def parse_task_args(items: list[str]) -> dict:
    """--task-arg KEY=VALUE pairs; values are JSON when they parse, else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--task-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@dataclass
class TaskChoice:
    """The task a command runs on: what the user said, else the checkpoint's, else the defaults."""
    name: str
    data: str | None
    kwargs: dict
    template: str


def choose_task(model_path: str, task: str | None, data: str | None, template: str | None,
                task_args: list[str], task_seed: int | None = None) -> TaskChoice:
    """--task/--data/--template win; the checkpoint's data and knobs apply when its task is the one
    chosen; --task-seed and --task-arg KEY=VALUE go on top. Defaults: gsm8k, plain template."""
    saved = saved_settings(model_path) if os.path.exists(model_path) else SavedSettings()
    name = task or saved.task or "gsm8k"
    same = saved.task == name
    kwargs = dict(saved.task_kwargs) if same else {}
    if task_seed is not None:
        kwargs["seed"] = task_seed
    kwargs.update(parse_task_args(task_args))
    return TaskChoice(name, data or (saved.data if same else None), kwargs, template or saved.template or "plain")
