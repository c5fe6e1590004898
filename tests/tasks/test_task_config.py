"""TaskConfig: checked values, the one mapping to load_task, and prompt token ids."""

import os

import pytest

from vineppo.tasks import (
    TaskConfig, build_synthetic_tokenizer, load_task, load_task_from_config, prompt_ids, task_knobs,
)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="shared data not present")


@pytest.mark.parametrize("values,message", [
    (dict(on_error="bogus"), "TaskConfig.on_error must be one of raise, skip; got 'bogus'"),
    (dict(name="mmlu"), "TaskConfig.name must be one of synthetic, gsm8k, math"),
    (dict(splitter="sentences"), "TaskConfig.splitter must be one of whole-math, paper"),
    (dict(seed=-1), "TaskConfig.seed must be >= 0"),
    (dict(num_steps=0), "TaskConfig.num_steps must be >= 1"),
    (dict(min_steps=-1), "TaskConfig.min_steps must be >= 0"),
    (dict(min_steps=4), "TaskConfig.min_steps must be <= TaskConfig.num_steps"),
    (dict(max_operand=0), "TaskConfig.max_operand must be >= 1"),
    (dict(max_operand=40), "TaskConfig.max_operand must be <= TaskConfig.max_value"),
    (dict(max_multiplier=-2), "TaskConfig.max_multiplier must be >= 0"),
    (dict(max_value=0), "TaskConfig.max_value must be >= 1"),
    (dict(carry_slip=1.5), r"TaskConfig.carry_slip must be in \[0, 1\]"),
    (dict(early_answer=-0.1), r"TaskConfig.early_answer must be in \[0, 1\]"),
    (dict(num_train=0), "TaskConfig.num_train must be >= 1"),
    (dict(num_test=0), "TaskConfig.num_test must be >= 1"),
    (dict(max_train=-5), "TaskConfig.max_train must be >= 0"),
    (dict(path="data/gsm8k"), "TaskConfig.path must be empty for the synthetic task"),
])
def test_bad_values_are_named_when_the_config_is_built(values, message):
    with pytest.raises(ValueError, match=message):
        TaskConfig(**values)


def test_check_after_changes_names_the_flag():
    cfg = TaskConfig(name="gsm8k", on_error="skip")
    cfg.check("--task.")
    cfg.on_error = "bogus"
    with pytest.raises(ValueError, match="^--task.on_error must be one of raise, skip; got 'bogus'$"):
        cfg.check("--task.")
    # the synthetic knobs together only matter for the synthetic task
    TaskConfig(name="math", min_steps=7, path="somewhere")


def test_task_knobs_are_the_load_task_arguments():
    assert task_knobs(TaskConfig(name="gsm8k", on_error="skip", splitter="paper")) == {"on_error": "skip"}
    assert task_knobs(TaskConfig(name="math", splitter="paper")) == {"on_error": "raise",
                                                                      "splitter": "paper"}
    knobs = task_knobs(TaskConfig(num_steps=4, carry_slip=0.25))
    assert knobs == dict(num_steps=4, min_steps=None, max_operand=9, max_multiplier=1, max_value=30,
                         carry_slip=0.25, early_answer=0.0, carry_line=0.0, num_train=20000, num_test=500,
                         eval_split="test")
    assert task_knobs(TaskConfig(num_steps=4, min_steps=2))["min_steps"] == 2


def test_synthetic_from_config_is_load_task_with_its_knobs():
    cfg = TaskConfig(seed=3, num_steps=4, min_steps=0, num_train=50, num_test=20, early_answer=0.5)
    task = load_task_from_config(cfg)
    same = load_task("synthetic", seed=3, num_steps=4, min_steps=3, num_train=50, num_test=20,
                     early_answer=0.5)
    assert [(e.question, e.solution) for e in task.train + task.test] == [
        (e.question, e.solution) for e in same.train + same.test]
    assert task.config.fewest_steps == 3  # min_steps 0 means num_steps - 1


@needs_data
def test_dataset_tasks_from_config(tmp_path):
    math = load_task_from_config(TaskConfig(name="math", path=os.path.join(DATA, "math", "test.jsonl"),
                                            splitter="paper"))
    assert math.splitter == "paper" and len(math.test) == 500 and math.train == []
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "q?", "answer": "#### 4"}\n{"question": "q?", "answer": "#### x"}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:2: malformed row"):
        load_task_from_config(TaskConfig(name="gsm8k", path=str(path)))
    task = load_task_from_config(TaskConfig(name="gsm8k", path=str(path), on_error="skip"))
    assert len(task.test) == 1 and task.num_skipped == 1
    cfg = TaskConfig(name="gsm8k", path=str(path))
    cfg.on_error = "ignore"  # changed after construction: checked again before loading
    with pytest.raises(ValueError, match="TaskConfig.on_error must be one of"):
        load_task_from_config(cfg)


def test_prompt_ids_add_special_tokens_for_plain_text_only():
    task = load_task("synthetic", num_train=2, num_test=2)
    ex = task.test[0]
    tok = build_synthetic_tokenizer(add_bos_token=True)
    plain = prompt_ids(task, ex, tok)
    assert plain == [tok.bos_token_id] + build_synthetic_tokenizer().encode(task.prompt(ex))
    # a chat template writes its own BOS: it must not be doubled
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    chat = prompt_ids(task, ex, tok, "chat")
    assert chat[0] == tok.bos_token_id and chat[1] != tok.bos_token_id
    assert tok.decode(chat[1:]) == task.prompt(ex, tok, "chat")[len("<bos>"):]
    tok.chat_template = "{% for m in messages %}{% endfor %}"
    with pytest.raises(ValueError, match="encodes to no tokens"):
        prompt_ids(task, ex, tok, "chat")
