"""Tasks: datasets, prompt templates, graders and step splitters.

    task = load_task("gsm8k", "/data/gsm8k")        # or "synthetic", "math"; a hub name works too
    task = load_task_from_config(TaskConfig(name="math", splitter="paper"))  # the CLI's way
    prompt = task.prompt(task.test[0])             # "[MATH_TASK] Problem:\\n...\\n\\nSolution:"
    ids = prompt_ids(task, task.test[0], tokenizer, "plain")
    reward = task.grade(response_text, task.test[0])
    stats = task.grader_stats()                    # graded / timed_out / retried since last call
    steps = task.split_steps(decode_response(tokenizer, response_ids))
    offsets = step_token_offsets(tokenizer, response_ids, steps)

Your own task (README "Your own task"): TaskConfig(name="custom", path=..., question_field=...,
grader=..., steps=..., prompt=...) builds one from settings (`tasks.custom`);
TaskConfig(factory="pkg.mod:make_task") imports one, and TaskConfig(reward="pkg.mod:score")
grades any task with a plain function (`tasks.rewards`). The Task protocol is in `tasks.base`.
"""

from __future__ import annotations

from vineppo.tasks.base import PLAIN_TEMPLATE, Example, Grade, GraderStats, Task, prompt_ids
from vineppo.tasks.config import SPLITTERS, TASK_NAMES, TaskConfig, load_task_from_config, task_knobs
from vineppo.tasks.paper_steps import split_paper_math_steps
from vineppo.tasks.steps import merge_steps, split_math_steps, split_newline_steps
from vineppo.tasks.tokenizer import build_synthetic_tokenizer
from vineppo.tasks.tokens import cap_offsets, decode_response, step_token_offsets


def load_task(name: str, path: str | None = None, seed: int = 0, **knobs) -> Task:
    """Load a task by name.

    synthetic: generated in memory; knobs are `SyntheticConfig` fields (num_steps, min_steps,
        max_operand, max_multiplier, max_value, num_train, num_test) plus max_steps. `path` must
        be None.
    gsm8k / math: `path` is a local JSONL/JSON/CSV/Parquet file (used as the test split) or
        directory (`train.jsonl`, `test.jsonl`, .csv, or Parquet shards), or a hub dataset name
        (needs `datasets`); None means the public hub copies (openai/gsm8k "main"; MATH-500 for
        test and the 7.5k MATH train split).
        Knobs: on_error ("raise" | "skip"), num_train / num_test (keep the first N), train_path /
        test_path (override one split's source), hub_config, max_steps (default 25);
        gsm8k: fallback_last_number; math: time_limit (CPU seconds per comparison try),
        splitter ("whole-math" or "paper", see `SPLITTERS`).
    `seed` seeds the synthetic generator; dataset order is kept as stored.
    """
    name = name.lower()
    if name == "synthetic":
        if path is not None:
            raise ValueError("the synthetic task is generated; pass knobs, not a path")
        from vineppo.tasks.synthetic import load_synthetic

        return load_synthetic(seed=seed, **knobs)
    if name == "gsm8k":
        return _load_dataset_task(name, path, knobs)
    if name == "math":
        return _load_dataset_task(name, path, knobs)
    raise ValueError(f"unknown task {name!r}; expected one of {TASK_NAMES}")


def _load_dataset_task(name: str, path: str | None, knobs: dict) -> Task:
    import os

    from vineppo.tasks import gsm8k, math_task
    from vineppo.tasks.loading import read_rows, to_examples

    on_error = knobs.pop("on_error", "raise")
    limits = {"train": knobs.pop("num_train", None), "test": knobs.pop("num_test", None)}
    paths = {"train": knobs.pop("train_path", None), "test": knobs.pop("test_path", None)}
    hub_config = knobs.pop("hub_config", None)
    max_steps = knobs.pop("max_steps", 25)
    extra = {"gsm8k": ("fallback_last_number",), "math": ("time_limit", "splitter")}[name]
    task_kw = {k: knobs.pop(k) for k in extra if k in knobs}
    if knobs:
        raise ValueError(f"unknown {name} knobs {sorted(knobs)}")

    module = gsm8k if name == "gsm8k" else math_task
    if name == "gsm8k":
        hub = {s: (gsm8k.HUB_NAME, gsm8k.HUB_CONFIG, s) for s in ("train", "test")}
    else:
        hub = {"train": math_task.HUB_TRAIN, "test": math_task.HUB_TEST}

    splits, skipped = {}, 0
    for split in ("train", "test"):
        source = paths[split] or path
        if source is None:
            source, config, hub_split = hub[split]
        else:
            config, hub_split = hub_config, split
            if os.path.isfile(source) and paths[split] is None and split == "train":
                splits[split] = []  # a single file is the test split
                continue
        rows = read_rows(source, hub_split, hub_config=config, on_error=on_error)
        examples, n = to_examples(rows, split, module.example_from_record, on_error, limits[split])
        splits[split], skipped = examples, skipped + n

    if name == "gsm8k":
        return gsm8k.GSM8KTask(
            name=name, train=splits["train"], test=splits["test"], max_steps=max_steps,
            num_skipped=skipped, chat_instruction=gsm8k.GSM8K_CHAT_INSTRUCTION, **task_kw,
        )
    return math_task.MathTask(
        name=name, train=splits["train"], test=splits["test"], max_steps=max_steps,
        num_skipped=skipped, chat_instruction=math_task.MATH_CHAT_INSTRUCTION, **task_kw,
    )


__all__ = [
    "Example", "Task", "Grade", "GraderStats", "PLAIN_TEMPLATE", "TASK_NAMES", "SPLITTERS",
    "TaskConfig", "load_task", "load_task_from_config", "task_knobs", "prompt_ids",
    "step_token_offsets", "decode_response", "cap_offsets", "build_synthetic_tokenizer",
    "merge_steps", "split_newline_steps", "split_math_steps", "split_paper_math_steps",
]
