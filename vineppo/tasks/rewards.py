"""Tasks and rewards from Python: ``--task.factory pkg.mod:make_task`` and ``--task.reward pkg.mod:score``.

    task = task_from_factory("my_pkg.tasks:make_task", cfg)    # make_task() or make_task(cfg) -> Task
    task = with_reward(task, "my_pkg.rewards:score", time_limit=5.0)
    task.grade(response_text, example)   # score(response_text, example), checked to be in [0, 1]

A reward function is a plain ``(response_text: str, example: Example) -> float`` returning a
number in [0, 1] (non-binary rewards are fine: VinePPO's Monte Carlo values are means of any
reward). One that raises, returns a non-number (None, a string, NaN) or a value outside [0, 1]
stops the run with a `RewardError` naming the example (the trainer keeps its last checkpoint).
One that runs longer than `time_limit` wall seconds is cut: that call scores 0 and counts as
timed out in the `grader/timed_out` metric, as the MATH grader's budget does. The limit uses
the MATH grader's SIGALRM budget in the main thread; in other threads the call runs in a
daemon thread that is abandoned when it overruns.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import threading

from vineppo.tasks.base import Example, Grade, GraderStats, Task

# What the package calls on a task (see `Task`); a factory's object must have all of them.
TASK_INTERFACE = ("name", "train", "test", "prompt", "sft_target", "grade", "split_steps", "final_answer",
                  "grader_stats")


class RewardError(RuntimeError):
    """A reward function raised or returned something other than a number in [0, 1]."""


def import_object(spec: str, setting_name: str):
    """The object ``module.path:attribute`` names; ValueError naming the setting otherwise."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{setting_name} must look like 'package.module:function'; got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, SyntaxError) as e:
        raise ValueError(f"{setting_name} {spec!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?") \
            from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{setting_name} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{setting_name} {spec!r}: {attr!r} is not callable")
    return obj


def check_task(task, origin: str):
    """`task` when it has the whole Task interface; ValueError naming what it lacks otherwise."""
    missing = [name for name in TASK_INTERFACE if not hasattr(task, name)]
    if missing:
        raise ValueError(f"{origin} returned {type(task).__name__}, which lacks {', '.join(missing)}; return a "
                         f"vineppo.tasks.Task (subclass it and implement _grade and _split)")
    if not isinstance(task.train, list) or not isinstance(task.test, list):
        raise ValueError(f"{origin}: the task's train and test must be lists of Example")
    for split in ("train", "test"):
        for ex in getattr(task, split)[:1]:
            if not isinstance(ex, Example):
                raise ValueError(f"{origin}: task.{split} holds {type(ex).__name__}, not vineppo.tasks.Example")
    if not task.test:
        raise ValueError(f"{origin}: the task has no test problems")
    return task


def task_from_factory(spec: str, cfg=None):
    """The Task a factory returns: called with the TaskConfig when it takes an argument, else with none."""
    factory = import_object(spec, "--task.factory")
    try:
        params = [p for p in inspect.signature(factory).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        params = []
    task = factory(cfg) if params else factory()
    return check_task(task, f"--task.factory {spec}")


def _call_with_limit(fn, args, time_limit: float):
    """(finished, value, exception) of fn(*args) within `time_limit` wall seconds."""
    if threading.current_thread() is threading.main_thread():
        from vineppo.tasks.math_grader import GradingTimeout, _budget

        try:
            with _budget(time_limit, time_limit):
                value = fn(*args)
        except GradingTimeout:
            return False, None, None
        except Exception as e:  # noqa: BLE001 - reported with the example
            return True, None, e
        return True, value, None
    box = {}

    def target():
        try:
            box["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True, name="vineppo-reward")
    worker.start()
    worker.join(time_limit)
    if worker.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("error")


def _describe(example) -> str:
    return f"example {getattr(example, 'id', '?')!r}"


def check_reward(value, spec: str, example, response: str) -> float:
    """`value` as a float when it is a finite number in [0, 1]; RewardError naming the example otherwise."""
    where = f"reward function {spec} on {_describe(example)} (response {response[:60]!r})"
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, numbers.Real):
        try:  # numpy / torch scalars
            value = float(value.item()) if hasattr(value, "item") else value
        except Exception:  # noqa: BLE001
            pass
    if not isinstance(value, numbers.Real):
        raise RewardError(f"{where} returned {type(value).__name__} {value!r:.60}, not a number in [0, 1]")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"{where} returned {value}, not a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise RewardError(f"{where} returned {value}, outside [0, 1]")
    return value


class RewardTask:
    """A task whose `grade` is a user reward function; everything else is the wrapped task's."""

    def __init__(self, task, reward, spec: str, time_limit: float):
        if not time_limit > 0:
            raise ValueError(f"--task.reward_time_limit must be > 0 seconds; got {time_limit!r}")
        self.task, self.reward, self.spec, self.time_limit = task, reward, spec, time_limit
        self._stats = GraderStats()

    def __getattr__(self, name):
        return getattr(self.__dict__["task"], name)

    def grade(self, response: str, example) -> float:
        finished, value, error = _call_with_limit(self.reward, (response, example), self.time_limit)
        self._stats.graded += 1
        if not finished:
            self._stats.timed_out += 1
            return 0.0
        if error is not None:
            raise RewardError(f"reward function {self.spec} raised {type(error).__name__}: {error} on "
                              f"{_describe(example)} (response {response[:60]!r})") from error
        return check_reward(value, self.spec, example, response)

    def grader_stats(self) -> GraderStats:
        stats, self._stats = self._stats, GraderStats()
        return stats


def with_reward(task, spec: str, time_limit: float = 5.0) -> RewardTask:
    """`task` graded by the reward function `spec` names (``module:function``)."""
    return RewardTask(task, import_object(spec, "--task.reward"), spec, time_limit)


__all__ = ["RewardError", "RewardTask", "Task", "Grade", "check_reward", "check_task", "import_object",
           "task_from_factory", "with_reward"]
