"""The task's settings (the command line's `task` section) and the one place they become a Task.

    cfg = TaskConfig(name="math", path="../shared/data/math", splitter="paper")
    task = load_task_from_config(cfg)        # load_task("math", path, seed=0, **task_knobs(cfg))
"""

from __future__ import annotations

from dataclasses import dataclass

from vineppo.settings import check_settings, setting

TASK_NAMES = ("synthetic", "gsm8k", "math", "custom")
ON_ERROR = ("raise", "skip")
# MATH step splitters: the official VinePPO in-place splitter's boundaries, or math blocks kept
# whole (fewer, longer steps; see docs/steps.md for both on MATH-500).
SPLITTERS = ("whole-math", "paper")
SYNTHETIC_KNOBS = ("num_steps", "min_steps", "max_operand", "max_multiplier", "max_value",
                   "carry_slip", "early_answer", "carry_line", "num_train", "num_test", "eval_split")
EVAL_SPLITS = ("test", "val")


@dataclass
class TaskConfig:
    name: str = setting("synthetic", "task: synthetic | gsm8k | math | custom (a dataset with the "
                        "column, grader, steps and prompt settings below); ignored with task.factory",
                        choices=TASK_NAMES)
    path: str = setting("", "local data folder/file or hub dataset name (gsm8k / math / custom); empty = "
                        "the task's default; custom: one file is both the train and the test split unless "
                        "train_path is set")
    on_error: str = setting("raise", "gsm8k / math: a malformed data row stops loading with its "
                            "file and line ('raise') or is skipped and counted ('skip')",
                            choices=ON_ERROR)
    splitter: str = setting("whole-math", "math: reasoning steps as the paper's splitter cuts "
                            "them ('paper': every line of a math block, long formulas at '=') or "
                            "with math blocks kept whole ('whole-math'); gsm8k and synthetic "
                            "always cut at newlines (the paper's GSM8K steps)", choices=SPLITTERS)
    seed: int = setting(0, "synthetic: seed of the generated train/test problems (independent of "
                        "the RL --seed, so runs with different seeds are scored on the same test "
                        "set)", check=">= 0")
    num_steps: int = setting(3, "synthetic: arithmetic steps per problem (the most)", check=">= 1")
    min_steps: int = setting(0, "synthetic: the fewest steps per problem (0 = num_steps - 1)",
                             check=">= 0")
    max_operand: int = setting(9, "synthetic: largest start value and +/- operand", check=">= 1")
    max_multiplier: int = setting(1, "synthetic: '* k' steps with k up to this (< 2 = no "
                                  "multiplication)", check=">= 0")
    max_value: int = setting(30, "synthetic: every intermediate value stays in [0, max_value]",
                             check=">= 1")
    carry_slip: float = setting(0.0, "synthetic: probability that a train demonstration (SFT "
                                "target) forgets a carry/borrow; answers and rewards stay exact",
                                check="[0, 1]")
    early_answer: float = setting(0.0, "synthetic: probability that a train demonstration (SFT "
                                  "target) writes its answer one operation before the end; "
                                  "answers and rewards stay exact", check="[0, 1]")
    carry_line: float = setting(0.0, "synthetic: probability that a train demonstration writes "
                                "the units column ('c 7 + 5 = 12') before a carry/borrow step; "
                                "such steps are exact, and carry_slip applies only to the others",
                                check="[0, 1]")
    eval_split: str = setting("test", "synthetic: the split evaluations score: 'test' (held out) "
                              "or 'val' (a disjoint validation split, to choose settings)",
                              choices=EVAL_SPLITS)
    num_train: int = setting(20000, "synthetic: train problems generated", check=">= 1")
    num_test: int = setting(500, "synthetic: test problems generated", check=">= 1")
    max_train: int = setting(0, "use at most this many train problems (0 = all)", check=">= 0")
    # ---- custom: a task without code (name=custom)
    train_path: str = setting("", "custom: train split's file or hub name when it differs from path")
    hub_config: str = setting("", "custom: hub dataset configuration name")
    question_field: str = setting("question", "custom: column holding the question")
    answer_field: str = setting("answer", "custom: column holding the gold final answer")
    solution_field: str = setting("", "custom: column holding a reference solution (the SFT target; "
                                  "empty = the gold answer)")
    grader: str = setting("exact", "custom: gsm8k-number | math-verify | exact (last line equals the answer) "
                          "| regex:<pattern> (its last match's first group equals the answer)")
    steps: str = setting("newline", "custom: step splitter: newline | paragraph | math | regex:<pattern> "
                         "(a step ends after each match)")
    prompt: str = setting("", "custom: plain prompt template, a format string with {question} (empty = "
                          "the package's plain template); rollout.template=chat uses the tokenizer's "
                          "chat template with task.instruction instead")
    instruction: str = setting("", "custom: instruction appended to the question in chat prompts")
    max_steps: int = setting(0, "custom: most steps per response (0 = 25)", check=">= 0")
    time_limit: float = setting(2.0, "custom math-verify grader: CPU seconds per comparison try", check="> 0")
    # ---- from Python
    factory: str = setting("", "'package.module:function' returning a vineppo.tasks.Task (called with this "
                           "TaskConfig when it takes an argument); overrides name")
    reward: str = setting("", "'package.module:function', a reward (response_text, example) -> float in "
                          "[0, 1] that replaces the task's grader")
    reward_time_limit: float = setting(5.0, "wall seconds a reward call may take; longer calls score 0 and "
                                       "count as timed out", check="> 0")

    def __post_init__(self):
        self.check()

    def check(self, prefix: str | None = None) -> None:
        """ValueError naming the field unless every value is allowed, the synthetic knobs
        together included (min_steps <= num_steps, max_operand <= max_value). Call again after
        changing fields; errors name fields as ``prefix + name`` (default ``TaskConfig.``)."""
        prefix = "TaskConfig." if prefix is None else prefix
        check_settings(self, prefix)
        from vineppo.tasks.custom import check_grader, check_splitter, check_template

        check_grader(self.grader, f"{prefix}grader")
        check_splitter(self.steps, f"{prefix}steps")
        check_template(self.prompt, f"{prefix}prompt")
        for name in ("factory", "reward"):
            spec = getattr(self, name)
            module, sep, attr = spec.partition(":")
            if spec and not (sep and module and attr):
                raise ValueError(f"{prefix}{name} must look like 'package.module:function'; got {spec!r}")
        if self.name == "custom" and not self.factory and not self.path:
            raise ValueError(f"{prefix}path: the custom task needs a data file, folder or hub dataset name")
        if self.name != "synthetic" or self.factory:
            return
        if self.path:
            raise ValueError(f"{prefix}path must be empty for the synthetic task (it is "
                             f"generated); got {self.path!r}")
        if self.min_steps > self.num_steps:
            raise ValueError(f"{prefix}min_steps must be <= {prefix}num_steps ({self.num_steps}; "
                             f"0 = num_steps - 1); got {self.min_steps}")
        if self.max_operand > self.max_value:
            raise ValueError(f"{prefix}max_operand must be <= {prefix}max_value "
                             f"({self.max_value}); got {self.max_operand}")


def _synthetic_knobs(cfg: TaskConfig) -> dict:
    knobs = {k: getattr(cfg, k) for k in SYNTHETIC_KNOBS}
    if knobs["min_steps"] == 0:
        knobs["min_steps"] = None  # the config's 0 means "num_steps - 1"
    return knobs


def task_knobs(cfg: TaskConfig) -> dict:
    """The `load_task` keyword arguments of `cfg` besides name, path and seed. For the synthetic
    task these are the generator's knobs, which with the seed decide every problem; on_error
    and splitter never change which problems a dataset task has."""
    if cfg.name == "synthetic":
        return _synthetic_knobs(cfg)
    if cfg.name == "gsm8k":
        return {"on_error": cfg.on_error}
    return {"on_error": cfg.on_error, "splitter": cfg.splitter}


def load_task_from_config(cfg: TaskConfig):
    """The Task that `cfg` describes (checked first). `max_train` is not applied here: it
    limits the train problems a run draws from (`task.train[:max_train]`), not the task."""
    from vineppo.tasks import load_task

    cfg.check()
    if cfg.factory:
        from vineppo.tasks.rewards import task_from_factory

        task = task_from_factory(cfg.factory, cfg)
    elif cfg.name == "custom":
        from vineppo.tasks.custom import load_custom_task

        task = load_custom_task(cfg)
    else:
        task = load_task(cfg.name, cfg.path or None, seed=cfg.seed, **task_knobs(cfg))
    if cfg.reward:
        from vineppo.tasks.rewards import with_reward

        task = with_reward(task, cfg.reward, cfg.reward_time_limit)
    return task
