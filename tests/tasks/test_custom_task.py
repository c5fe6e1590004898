"""Tasks without code (task.name=custom) and from Python (task.factory, task.reward)."""

import math
import os
import threading
import time

import pytest

from vineppo.tasks import Example, Task, TaskConfig, load_task_from_config
from vineppo.tasks.custom import CustomTask
from vineppo.tasks.rewards import RewardError, check_reward, import_object, with_reward

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "tests", "data", "custom_qa.jsonl")


def qa_config(**kw):
    base = dict(name="custom", path=DATA, question_field="q", answer_field="a", solution_field="sol",
                grader="regex:Answer: *(-?\\d+)", steps="newline", prompt="Q: {question}\nA:")
    base.update(kw)
    return TaskConfig(**base)


# --- a task and rewards defined here, loaded by import path -------------------------------------

class EchoTask(Task):
    """Reward 1 when the response contains the answer; steps are sentences ending in '.'."""

    def _grade(self, response, example):
        from vineppo.tasks import Grade

        return Grade(float(example.answer in response))

    def _split(self, response):
        parts, start = [], 0
        for i, c in enumerate(response):
            if c == ".":
                parts.append(response[start:i + 1])
                start = i + 1
        if start < len(response) or not parts:
            parts.append(response[start:])
        return parts


def make_task():
    examples = [Example(id=f"e{i}", question=f"say {i}", answer=str(i), solution=f"I say {i}.") for i in range(4)]
    return EchoTask(name="echo", train=examples, test=examples[:2])


def make_task_with_config(cfg):
    task = make_task()
    task.max_steps = cfg.max_steps or 7
    return task


def not_a_task():
    return {"train": []}


def digit_fraction(text, example):
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def raising(text, example):
    raise ZeroDivisionError("boom")


def returns_none(text, example):
    return None


def returns_nan(text, example):
    return float("nan")


def returns_two(text, example):
    return 2.0


def hangs(text, example):
    time.sleep(30)
    return 1.0


def spins(text, example):
    while True:
        pass


HERE = __name__


# --- custom task from settings ----------------------------------------------------------------------

def test_custom_task_from_settings():
    task = load_task_from_config(qa_config())
    assert isinstance(task, CustomTask) and len(task.train) == len(task.test) == 8
    ex = task.test[0]
    assert (ex.id, ex.question, ex.answer) == ("c0", "What is 2 + 3?", "5")
    assert task.prompt(ex) == "Q: What is 2 + 3?\nA:"
    assert task.sft_target(ex) == " 2 + 3 = 5\nAnswer: 5"
    assert task.grade("2 + 3 = 5\nAnswer: 5", ex) == 1.0
    assert task.grade("Answer: 4", ex) == 0.0
    assert task.grade("Answer: 5 no wait Answer: 6", ex) == 0.0   # the last match counts
    assert task.final_answer("x Answer: 5") == "5"
    assert task.split_steps("a\nb\nAnswer: 5") == ["a\n", "b\n", "Answer: 5"]
    assert task.grader_stats().graded == 3


@pytest.mark.parametrize("grader, response, gold, reward", [
    ("exact", "work\n  42  \n", "42", 1.0),
    ("exact", "42\nmore", "42", 0.0),
    ("gsm8k-number", "so\n#### 1,000", "1000", 1.0),
    ("gsm8k-number", "#### 7", "8", 0.0),
    ("regex:=\\s*(\\d+)", "2+2 = 4", "4", 1.0),
    ("regex:yes|no", "no", "no", 1.0),
])
def test_graders(grader, response, gold, reward):
    task = CustomTask(name="c", train=[], test=[], grader=grader)
    assert task.grade(response, Example("x", "q", gold, gold)) == reward


def test_math_verify_grader():
    pytest.importorskip("math_verify")
    task = CustomTask(name="c", train=[], test=[], grader="math-verify")
    assert task.grade("so $\\boxed{\\frac{1}{2}}$", Example("x", "q", "0.5", "")) == 1.0
    assert task.grade("so $\\boxed{3}$", Example("x", "q", "0.5", "")) == 0.0


@pytest.mark.parametrize("steps, text, expected", [
    ("newline", "a\nb", ["a\n", "b"]),
    ("paragraph", "one\ntwo\n\nthree\n\n\nfour", ["one\ntwo\n\n", "three\n\n\n", "four"]),
    ("regex:;\\s*", "a; b;c", ["a; ", "b;", "c"]),
    ("regex:x*", "abc", ["abc"]),            # empty matches never cut
])
def test_splitters(steps, text, expected):
    task = CustomTask(name="c", train=[], test=[], steps=steps)
    out = task.split_steps(text)
    assert out == expected and "".join(out) == text


def test_math_splitter_keeps_substrings():
    task = CustomTask(name="c", train=[], test=[], steps="math")
    text = "We have $x = 1$. Then $y = 2$.\nSo the answer is 3."
    assert "".join(task.split_steps(text)) == text and len(task.split_steps(text)) >= 2


@pytest.mark.parametrize("field, value, message", [
    ("grader", "regex:(", "TaskConfig.grader: bad regular expression"),
    ("grader", "regex:", "regex: needs a pattern"),
    ("grader", "fuzzy", "TaskConfig.grader must be one of gsm8k-number, math-verify, exact or regex:<pattern>"),
    ("steps", "regex:[", "TaskConfig.steps: bad regular expression"),
    ("steps", "sentences", "TaskConfig.steps must be one of newline, paragraph, math"),
    ("prompt", "Q: {q}", "must contain {question}"),
    ("prompt", "Q: {question", "bad format string"),
    ("factory", "no_colon", "must look like 'package.module:function'"),
    ("reward", "mod:", "must look like 'package.module:function'"),
    ("grader", "regex:" + "a" * 600, "at most 500"),
])
def test_bad_settings_fail_at_config_time(field, value, message):
    with pytest.raises(ValueError, match=None) as exc:
        qa_config(**{field: value})
    assert message in str(exc.value)


def test_custom_needs_a_path():
    with pytest.raises(ValueError, match="needs a data file"):
        TaskConfig(name="custom")


def test_catastrophic_regex_is_bounded():
    """A backtracking pattern on a long response ends within the budget (no match, reward 0)."""
    task = CustomTask(name="c", train=[], test=[], grader="regex:(a+)+$")
    start = time.monotonic()
    assert task.grade("a" * 5000 + "b", Example("x", "q", "a", "")) == 0.0
    assert time.monotonic() - start < 10


def test_bad_rows_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"q": "fine", "a": "1"}\n{"q": "no answer"}\n\xff\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:3: malformed row: not valid UTF-8"):
        load_task_from_config(qa_config(path=str(path), solution_field=""))
    good = tmp_path / "e.jsonl"
    good.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"e\.jsonl:2: malformed row: no field 'a' \(the row has: q\)"):
        load_task_from_config(qa_config(path=str(good), solution_field=""))
    task = load_task_from_config(qa_config(path=str(path), solution_field="", on_error="skip"))
    assert len(task.test) == 1 and task.num_skipped == 4   # two bad rows, in each of the two splits
    assert task.sft_target(task.test[0]) == " 1"           # no solution column: the answer is the target


def test_number_grader_checks_gold_at_load(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "x", "a": "seven"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: .*must be a number for grader gsm8k-number"):
        load_task_from_config(qa_config(path=str(path), grader="gsm8k-number", solution_field=""))


def test_csv_and_train_path(tmp_path):
    (tmp_path / "train.csv").write_text('question,answer\n"What, then?",4\n')
    (tmp_path / "test.csv").write_text("question,answer\nA?,1\nB?,2\n")
    task = load_task_from_config(TaskConfig(name="custom", path=str(tmp_path)))
    assert [e.question for e in task.train] == ["What, then?"] and len(task.test) == 2
    task = load_task_from_config(TaskConfig(name="custom", path=str(tmp_path / "test.csv"),
                                            train_path=str(tmp_path / "train.csv")))
    assert len(task.train) == 1 and len(task.test) == 2


def test_parquet(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"question": ["a?", "b?"], "answer": [1, 2]}), tmp_path / "d.parquet")
    task = load_task_from_config(TaskConfig(name="custom", path=str(tmp_path / "d.parquet")))
    assert [e.answer for e in task.test] == ["1", "2"]


def test_chat_template_with_instruction():
    from vineppo.tasks import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    task = load_task_from_config(qa_config(instruction="Be brief."))
    assert task.prompt(task.test[0], tok, "chat") == "<What is 2 + 3?\n\nBe brief.>"


# --- from Python ---------------------------------------------------------------------------------------

def test_factory_by_import_path():
    task = load_task_from_config(TaskConfig(factory=f"{HERE}:make_task"))
    assert task.name == "echo" and task.grade("I say 0.", task.test[0]) == 1.0
    assert task.split_steps("a. b.") == ["a.", " b."]
    task = load_task_from_config(TaskConfig(factory=f"{HERE}:make_task_with_config", max_steps=3))
    assert task.max_steps == 3


def test_factory_yaml(tmp_path):
    from vineppo.config import load_config

    path = tmp_path / "t.yaml"
    path.write_text(f"task:\n  factory: {HERE}:make_task\n  reward: {HERE}:digit_fraction\n")
    cfg = load_config(["--config", str(path)])
    task = load_task_from_config(cfg.task)
    assert task.grade("a1", task.test[0]) == 0.5


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    (f"{HERE}:missing", "has no attribute 'missing'"),
    (f"{HERE}:HERE", "is not callable"),
    (f"{HERE}:not_a_task", "lacks name"),
])
def test_bad_factories(spec, message):
    with pytest.raises(ValueError) as exc:
        load_task_from_config(TaskConfig(factory=spec))
    assert message in str(exc.value)


def test_reward_replaces_the_grader_and_may_be_fractional():
    task = load_task_from_config(qa_config(reward=f"{HERE}:digit_fraction"))
    ex = task.test[0]
    assert task.grade("ab12", ex) == 0.5 and task.grade("", ex) == 0.0
    assert task.prompt(ex) == "Q: What is 2 + 3?\nA:"    # everything else is the task's
    assert task.grader_stats().graded == 2 and task.grader_stats().graded == 0


@pytest.mark.parametrize("fn, message", [
    ("raising", "raised ZeroDivisionError: boom on example 'c0'"),
    ("returns_none", "returned NoneType None, not a number in [0, 1]"),
    ("returns_nan", "returned nan, not a number in [0, 1]"),
    ("returns_two", "returned 2.0, outside [0, 1]"),
])
def test_bad_rewards_name_the_example(fn, message):
    task = load_task_from_config(qa_config(reward=f"{HERE}:{fn}"))
    with pytest.raises(RewardError) as exc:
        task.grade("some response", task.test[0])
    assert message in str(exc.value) and f"{HERE}:{fn}" in str(exc.value)


def test_check_reward_accepts_numeric_types():
    ex = Example("e", "q", "a", "s")
    assert check_reward(True, "f", ex, "") == 1.0 and check_reward(1, "f", ex, "") == 1.0
    torch = pytest.importorskip("torch")
    assert check_reward(torch.tensor(0.25), "f", ex, "") == 0.25
    with pytest.raises(RewardError):
        check_reward("0.5", "f", ex, "")
    with pytest.raises(RewardError):
        check_reward(-math.inf, "f", ex, "")


@pytest.mark.parametrize("fn", ["hangs", "spins"])
def test_hanging_reward_is_cut(fn):
    task = with_reward(make_task(), f"{HERE}:{fn}", time_limit=0.3)
    start = time.monotonic()
    assert task.grade("x", task.test[0]) == 0.0
    assert time.monotonic() - start < 5
    stats = task.grader_stats()
    assert (stats.graded, stats.timed_out) == (1, 1)


def test_hanging_reward_is_cut_off_the_main_thread():
    task = with_reward(make_task(), f"{HERE}:hangs", time_limit=0.3)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", task.grade("x", task.test[0])))
    start = time.monotonic()
    worker.start()
    worker.join(10)
    assert out == {"r": 0.0} and time.monotonic() - start < 5 and task.grader_stats().timed_out == 1


def test_import_object_errors():
    with pytest.raises(ValueError, match="must look like"):
        import_object("a.b", "--task.reward")
