"""Step splitters: unit cases, the step cap, and properties on every GSM8K and MATH solution."""

import json
import os
import re

import pytest

from vineppo.tasks import load_task
from vineppo.tasks.steps import math_spans, merge_steps, split_math_steps, split_newline_steps

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")  # ../shared/data beside the checkout


def _rows(name, split):
    path = os.path.join(DATA, name, f"{split}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_newline_steps_merge_rules():
    r = "\n\nFirst line.\nSecond line.\n\nThird.\n#### 42"
    steps = split_newline_steps(r)
    assert steps == ["\n\nFirst line.\n", "Second line.\n\n", "Third.\n#### 42"]
    assert split_newline_steps("#### 42") == ["#### 42"]
    assert split_newline_steps("") == [""]
    assert split_newline_steps("a\n  \nb") == ["a\n", "  \nb"]
    assert split_newline_steps("a\n\n  ") == ["a\n\n  "]  # trailing blank merged backward
    assert split_newline_steps("a\nb\n") == ["a\n", "b\n"]


def test_math_steps_sentences_and_math():
    r = "We have $x = 3. 5$ here. Then $$a. B$$ is it! Next \\[y. Z\\] end? Done."
    steps = split_math_steps(r, min_step_chars=1)
    assert "".join(steps) == r
    assert steps == ["We have $x = 3. 5$ here.", " Then $$a. B$$ is it!", " Next \\[y. Z\\] end?",
                     " Done."]
    # environments and asy blocks are never split, even across newlines
    r = "So\n\\begin{align*}\na &= 1.\n\nb &= 2\n\\end{align*}\nand [asy]\ndraw(a). Label\n[/asy] ok."
    steps = split_math_steps(r, min_step_chars=1)
    assert "".join(steps) == r
    assert any("\\begin{align*}\na &= 1.\n\nb &= 2\n\\end{align*}" in s for s in steps)
    assert any("[asy]\ndraw(a). Label\n[/asy]" in s for s in steps)


def test_math_steps_escaped_dollar_and_closing_math():
    r = "It costs \\$5. Then we pay \\$3 more. Thus $x = 2.$  Finally it is done here."
    steps = split_math_steps(r, min_step_chars=1)
    assert steps == ["It costs \\$5.", " Then we pay \\$3 more.", " Thus $x = 2.$",
                     "  Finally it is done here."]


def test_math_steps_unclosed_math_protects_rest():
    r = "Intro sentence here. Then $x = 1. Y = 2. Z"
    steps = split_math_steps(r, min_step_chars=1)
    assert steps == ["Intro sentence here.", " Then $x = 1. Y = 2. Z"]


def test_math_steps_tiny_fragments_merge_forward():
    r = "Ok.\n\nSo.\nThe value of the thing is four.\nYes."
    steps = split_math_steps(r)
    assert "".join(steps) == r
    assert steps == ["Ok.\n\nSo.\nThe value of the thing is four.\n", "Yes."] or steps == [
        "Ok.\n\nSo.\nThe value of the thing is four.\nYes."
    ]
    assert all(len("".join(s.split())) >= 12 for s in steps[:-1])


def test_math_steps_long_parts_split_at_commas_and_equals():
    r = ("first we compute the value of the big sum, which gives twelve, and then we add "
         "the other part of the expression to it = forty two in total for everything here")
    assert len(r) > 100
    steps = split_math_steps(r, max_chars=100, min_part_chars=20)
    assert "".join(steps) == r and len(steps) >= 2
    assert all(len(s) >= 20 for s in steps)
    assert all(len(s) <= 100 for s in steps)
    # the only cut points are after ", " before " and" or before "="
    cuts = [len("".join(steps[:k])) for k in range(1, len(steps))]
    for c in cuts:
        assert r[c - 1] == "," or r.startswith(" and", c) or r[c:].lstrip().startswith("=")
    # a long part with no cut point outside math stays whole
    r2 = "Then $" + "+".join(["x_{%d}" % i for i in range(40)]) + "$ is the sum, clearly."
    assert split_math_steps(r2, min_step_chars=1) == [r2]


def test_merge_steps_keeps_evenly_spaced_boundaries():
    steps = [f"s{i}\n" for i in range(10)]
    merged = merge_steps(steps, 4)
    assert "".join(merged) == "".join(steps) and len(merged) == 4
    # boundaries at original steps 0, 2, 5, 7 (floor(k * 10 / 4))
    assert merged == ["s0\ns1\n", "s2\ns3\ns4\n", "s5\ns6\n", "s7\ns8\ns9\n"]
    assert merge_steps(steps, 10) == steps and merge_steps(steps, 25) == steps
    assert merge_steps(steps, 1) == ["".join(steps)]
    with pytest.raises(ValueError):
        merge_steps(steps, 0)


def test_task_split_steps_applies_the_cap():
    task = load_task("synthetic", num_train=1, num_test=1)
    r = "".join(f"{i} + 1 = {i + 1}\n" for i in range(40)) + "#### 40"
    assert len(task.split_steps(r, max_steps=0)) == 40
    steps = task.split_steps(r)
    assert len(steps) == task.max_steps == 25 and "".join(steps) == r
    assert len(task.split_steps(r, max_steps=7)) == 7


# ------------------------------------------------ properties over every dataset solution

_DOLLAR = re.compile(r"(?<!\\)\$")


def _balanced(prefix: str) -> bool:
    """Independent check that a cut after `prefix` is outside math: every delimiter pair is
    closed (counted, not parsed, so a different algorithm from the splitter's)."""
    dollars = len(_DOLLAR.findall(prefix.replace("\\\\", "")))
    return (
        dollars % 2 == 0
        and prefix.count("\\(") == prefix.count("\\)")
        and prefix.count("\\[") == prefix.count("\\]")
        and prefix.count("\\begin{") == prefix.count("\\end{")
        and prefix.count("[asy]") == prefix.count("[/asy]")
    )


def test_gsm8k_steps_on_every_solution():
    task = load_task("synthetic", num_train=1, num_test=1)  # same newline splitter as GSM8K
    from vineppo.tasks.gsm8k import clean_rationale

    n = 0
    for split in ("train", "test"):
        for row in _rows("gsm8k", split):
            for text in (row["answer"], " " + clean_rationale(row["answer"])):
                steps = split_newline_steps(text)
                assert "".join(steps) == text
                assert all(steps) and all(s.strip() for s in steps)
                assert "####" in steps[-1] and all("####" not in s for s in steps[:-1])
                # one step per non-blank line, the #### line merged into the last
                lines = [ln for ln in text.split("\n") if ln.strip()]
                assert len(steps) == len(lines) - 1
                capped = task.split_steps(text)
                assert "".join(capped) == text and len(capped) <= 25
                n += 1
    assert n == 2 * (7473 + 1319)


def test_math_steps_on_every_solution():
    n = 0
    for split in ("train", "test"):
        for row in _rows("math", split):
            text = " " + row["solution"].strip()
            steps = split_math_steps(text)
            assert "".join(steps) == text
            assert all(steps)
            spans = math_spans(text)
            cut = 0
            for s in steps[:-1]:
                cut += len(s)
                assert _balanced(text[:cut]), (row["unique_id"], text[:cut][-80:])
                assert not any(a < cut < b for a, b in spans)
            n += 1
    assert n == 12500


@pytest.mark.parametrize("text", [
    "word, " * 20000, "a. B" * 30000, "$" * 100_000, "\\begin{a}" * 20000,
    "x " * 200_000 + "\n" * 10_000, "\\[" + "x = 1. " * 10000, "[asy]" * 10000 + "[/asy]",
], ids=range(7))
def test_splitters_on_huge_adversarial_text_are_fast_and_exact(text):
    import time

    t0 = time.perf_counter()
    for split in (split_math_steps, split_newline_steps):
        steps = split(text)
        assert "".join(steps) == text and all(steps)
    assert time.perf_counter() - t0 < 3.0
