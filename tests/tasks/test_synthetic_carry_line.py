"""The carry-line synthetic variant: generator, validation split, grader and step splitter."""

import re

import pytest

from vineppo.tasks import TaskConfig, load_task, load_task_from_config
from vineppo.tasks.synthetic import SyntheticConfig, carry_line_text, generate_all_splits, generate_splits

_OP = re.compile(r"^(-?\d+) ([-+]) (\d+) = (-?\d+)$")
_CARRY = re.compile(r"^c (\d+) ([-+]) (\d+) = (\d+)$")
CFG = dict(num_steps=8, min_steps=4, max_operand=9, max_value=30, carry_slip=0.5, carry_line=0.5,
           num_train=3000, num_test=200)


def _walk(ex):
    """Replays a solution against its question: (carry steps, lined, slipped among the unlined)."""
    start, *rest = ex.question.split(" ")
    ops = list(zip(rest[::2], rest[1::2]))
    lines = ex.solution.split("\n")
    assert lines[-1].startswith("#### ")
    value, i, carries, lined, slipped, unlined = int(start), 0, 0, 0, 0, 0
    for op, x in ops:
        exact = value + int(x) if op == "+" else value - int(x)
        carry = min(value, exact) >= 0 and exact // 10 != value // 10
        carries += carry
        has_line = lines[i].startswith("c ")
        if has_line:
            assert carry, f"carry line before a step without a carry: {ex.solution!r}"
            assert lines[i] == carry_line_text(value, op, int(x))
            u, o, b, c = _CARRY.match(lines[i]).groups()
            assert int(c) == (int(u) + int(b) if o == "+" else int(u) - int(b))
            assert int(c) % 10 == exact % 10       # the units column gives the units digit
            lined += 1
            i += 1
        a, o, b, c = _OP.match(lines[i]).groups()
        assert (int(a), o, b) == (value, op, x)     # the teacher goes on from its own value
        written = int(c)
        if has_line or not carry:
            assert written == exact
        else:
            unlined += 1
            assert written in (exact, value // 10 * 10 + exact % 10)
            slipped += written != exact
        value = written
        i += 1
    assert lines[i:] == [f"#### {value}"]
    assert ex.meta["demonstration_correct"] == (str(value) == ex.answer)
    assert ex.meta["carry_lines"] == lined
    return carries, lined, slipped, unlined, len(ops)


def test_carry_line_demonstrations_mix_two_habits_with_their_slip_rates():
    train, test = generate_splits(SyntheticConfig(**CFG), seed=4)
    totals = [0, 0, 0, 0]
    lengths = set()
    for ex in train:
        c, lined, slipped, unlined, n = _walk(ex)
        for j, v in enumerate((c, lined, slipped, unlined)):
            totals[j] += v
        lengths.add(n)
    carries, lined, slipped, unlined = totals
    assert lengths == set(range(4, 9))
    assert 0.45 < lined / carries < 0.55            # carry_line
    assert 0.45 < slipped / unlined < 0.55          # carry_slip, only where no carry line
    wrong = sum(not e.meta["demonstration_correct"] for e in train)
    assert 0.3 < wrong / len(train) < 0.8           # one slip anywhere in the chain sinks it
    # test solutions are exact, with a carry line at every carry step
    for ex in test:
        c, lined, slipped, unlined, _ = _walk(ex)
        assert lined == c == ex.meta["carry_steps"] and slipped == unlined == 0
        assert ex.meta["demonstration_correct"]


def test_a_mid_chain_slip_is_the_only_error_of_a_wrong_demonstration():
    train, _ = generate_splits(SyntheticConfig(**CFG), seed=4)
    wrong = [e for e in train if not e.meta["demonstration_correct"]]
    mid = 0
    for ex in wrong:
        lines = [l for l in ex.solution.split("\n")[:-1] if not l.startswith("c ")]
        bad = []
        for k, line in enumerate(lines):
            a, op, b, c = _OP.match(line).groups()
            if int(c) != (int(a) + int(b) if op == "+" else int(a) - int(b)):
                bad.append(k)
        assert bad                                  # a wrong answer comes from a wrong step
        mid += 0 < bad[0] < len(lines) - 1
    assert mid > 0.5 * len(wrong)


def test_validation_split_is_disjoint_and_test_split_unchanged():
    cfg = SyntheticConfig(**CFG)
    train, val, test = generate_all_splits(cfg, seed=1)
    tq, vq, trq = ({e.question for e in s} for s in (test, val, train))
    assert len(vq) == len(val) == len(test) == len(tq) == 200
    assert not (tq & vq) and not (trq & (tq | vq))
    assert all(e.id.startswith("synthetic/val/") for e in val)
    # eval_split="val" scores the validation split; the test split stays as it was
    assert [e.question for e in generate_splits(SyntheticConfig(**CFG, eval_split="val"), 1)[1]] == \
        [e.question for e in val]
    assert [e.question for e in generate_splits(cfg, 1)[1]] == [e.question for e in test]
    # the test problems do not depend on the teacher's habits or the train size
    other = SyntheticConfig(**{**CFG, "carry_line": 0.0, "carry_slip": 0.0, "num_train": 10})
    assert [e.question for e in generate_all_splits(other, 1)[2]] == [e.question for e in test]
    with pytest.raises(ValueError, match="eval_split"):
        SyntheticConfig(eval_split="train")
    with pytest.raises(ValueError, match="carry_line"):
        SyntheticConfig(carry_line=2.0)


def test_task_config_passes_the_new_knobs():
    task = load_task_from_config(TaskConfig(num_steps=6, min_steps=4, carry_line=0.5, carry_slip=0.5,
                                            num_train=50, num_test=20, eval_split="val"))
    assert task.config.carry_line == 0.5 and all(e.id.startswith("synthetic/val/") for e in task.test)
    with pytest.raises(ValueError):
        TaskConfig(eval_split="dev")


def test_grader_and_steps_on_carry_line_responses():
    task = load_task("synthetic", **{**CFG, "num_train": 20, "num_test": 20})
    ex = next(e for e in task.test if e.meta["carry_lines"] > 0)
    response = task.sft_target(ex)                  # what the policy writes: " " + solution
    assert task.grade(response, ex) == 1.0
    steps = task.split_steps(response, 0)
    assert "".join(steps) == response
    # one step per line; the carry line is its own step, so the choice to write it sits at a
    # step boundary; the answer line joins the last operation
    assert len(steps) == len(ex.solution.split("\n")) - 1
    assert any(s.lstrip().startswith("c ") for s in steps) and steps[-1].rstrip().split("\n")[-1].startswith("####")
    # a forgotten carry anywhere changes the final answer: graded 0
    lines = ex.solution.split("\n")
    k = next(i for i, l in enumerate(lines) if l.startswith("c "))
    a, op, b, c = _OP.match(lines[k + 1]).groups()
    slipped = int(a) // 10 * 10 + int(c) % 10
    assert task.grade("\n".join(lines[:k] + [f"{a} {op} {b} = {slipped}", "#### 99"]), ex) == 0.0
    assert task.grade(ex.solution.replace("#### ", "#### 1"), ex) == 0.0
    assert task.final_answer(ex.solution) == ex.answer


def test_response_habits_reads_each_step():
    from vineppo.tasks.synthetic import response_habits

    q = "17 + 5 - 6 + 9"
    good = "c 7 + 5 = 12\n17 + 5 = 22\n22 - 6 = 16\nc 6 + 9 = 15\n16 + 9 = 25\n#### 25"
    h = response_habits(q, " " + good)
    assert (h["carry_steps"], h["lined"], h["slip_unlined"], h["other_errors"], h["format_error"]) == (3, 2, 0, 0, False)
    slip = "c 7 + 5 = 12\n17 + 5 = 22\n22 - 6 = 16\n16 + 9 = 15\n#### 15"
    h = response_habits(q, slip)
    assert (h["carry_steps"], h["lined"], h["slip_unlined"], h["slip_lined"]) == (3, 1, 1, 0)
    h = response_habits(q, "17 + 5 = 23\n23 - 6 = 17\n17 + 9 = 26\n#### 26")
    assert h["other_errors"] == 1 and h["slip_unlined"] == 0
    assert response_habits(q, "17 + 5 = 22\n#### 22")["format_error"]
    assert response_habits("3 + 4", "c 3 + 4 = 7\n3 + 4 = 7\n#### 7")["needless_lines"] == 1
