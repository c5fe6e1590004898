"""The task section of a run's config and the task it loads (moving to vineppo.tasks.config)."""

from __future__ import annotations

from dataclasses import dataclass

from vineppo.settings import check_settings, setting
from vineppo.tasks import TASK_NAMES, load_task


@dataclass
class TaskConfig:
    """Which task, where its data is, and the synthetic task's generator; the `task` section."""

    name: str = setting("synthetic", "task: synthetic | gsm8k | math", choices=TASK_NAMES)
    path: str = setting("", "local data folder/file or hub dataset name (gsm8k / math); empty = the task's default")
    on_error: str = setting("raise", "gsm8k / math: a malformed data row stops loading with its file and line "
                            "('raise') or is skipped and counted ('skip')", choices=("raise", "skip"))
    seed: int = setting(0, "synthetic: seed of the generated train/test problems (independent of the RL "
                        "--seed, so runs with different seeds are scored on the same test set)")
    num_steps: int = setting(3, "synthetic: arithmetic steps per problem (the most)", check=">= 1")
    min_steps: int = setting(0, "synthetic: the fewest steps per problem (0 = num_steps - 1)", check=">= 0")
    max_operand: int = setting(9, "synthetic: largest start value and +/- operand", check=">= 1")
    max_multiplier: int = setting(1, "synthetic: '* k' steps with k up to this (< 2 = no multiplication)",
                                  check=">= 0")
    max_value: int = setting(30, "synthetic: every intermediate value stays in [0, max_value]", check=">= 1")
    carry_slip: float = setting(0.0, "synthetic: probability that a train demonstration (SFT target) forgets "
                                "a carry/borrow; answers and rewards stay exact", check="[0, 1]")
    early_answer: float = setting(0.0, "synthetic: probability that a train demonstration (SFT target) writes "
                                  "its answer one operation before the end; answers and rewards stay exact",
                                  check="[0, 1]")
    num_train: int = setting(20000, "synthetic: train problems generated", check=">= 1")
    num_test: int = setting(500, "synthetic: test problems generated", check=">= 1")
    max_train: int = setting(0, "use at most this many train problems (0 = all)", check=">= 0")

    def __post_init__(self):
        check_settings(self)


SYNTHETIC_KNOBS = ("num_steps", "min_steps", "max_operand", "max_multiplier", "max_value", "carry_slip",
                   "early_answer", "num_train", "num_test")


def load_task_from_config(cfg: TaskConfig):
    """The task `cfg` describes: the synthetic generator with its knobs, or a dataset."""
    if cfg.name == "synthetic":
        knobs = {k: getattr(cfg, k) for k in SYNTHETIC_KNOBS}
        knobs["min_steps"] = knobs["min_steps"] or None      # 0 means "num_steps - 1"
        return load_task("synthetic", None, seed=cfg.seed, **knobs)
    return load_task(cfg.name, cfg.path or None, seed=cfg.seed, on_error=cfg.on_error)
