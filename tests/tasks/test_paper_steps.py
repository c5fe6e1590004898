"""The paper's MATH step splitter: a table of solutions with the official splitter's boundaries,
the difference from whole-math, and properties on every MATH solution."""

import json
import os
import random
import time

import pytest

from vineppo.tasks import load_task
from vineppo.tasks.paper_steps import MAX_PART_LENGTH, paper_math_boundaries, split_paper_math_steps
from vineppo.tasks.steps import split_math_steps

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")

# (what the case exercises, the steps the official in-place splitter gives); the response is
# "".join(steps). The two short responses are the ones the official code fails on.
PAPER_CASES = [
    ('plain sentences', [
        'We have $x + y = 10$ and $x - y = 2$.',
        ' Adding the equations gives $2x = 12$.',
        ' So $x = \\boxed{6}$.',
    ]),
    ('a sentence starting after a one-letter word is not cut', [
        'The point is labeled A. Then we draw the line through it and call its length $d$ here.',
    ]),
    ('Mr. is not a sentence end; Mrs. is', [
        'Mr. Smith has 5 apples in his basket today.',
        ' Mrs. Jones has 3 apples in her basket now.',
        ' Together they have $\\boxed{8}$.',
    ]),
    ('newline steps, a short line joins the next', [
        'First we compute the sum of the digits.',
        '\nSo\nthe sum is $1+2+3 = 6$, which is even.',
        '\nThus the answer is $\\boxed{6}$.',
    ]),
    ('display math \\[..\\] with lines', [
        'We expand the product:',
        '\n\\[\n(x+1)(x+2) = x^2 + 3x + 2.',
        '\n\\]',
        '\nSo the constant term is $\\boxed{2}$.',
    ]),
    ('align environment, every line a step', [
        'Then\n\\begin{align*}',
        '\na &= 2b + 3 \\\\',
        '\nb &= 4 \\\\',
        '\na &= 11.',
        '\n\\end{align*}',
        '\nSo $a = \\boxed{11}$.',
    ]),
    ('sentence end inside inline math followed by text', [
        'The sum of the roots is $-b/a = 5.$',
        ' The product of the roots is $c/a = 6.$',
        ' Hence they are $2$ and $3$.',
    ]),
    ('sentence end inside display math on one line', [
        'The area is\\[A = \\pi r^2 = 49\\pi.\\]',
        ' Therefore the answer is $\\boxed{49\\pi}$.',
    ]),
    ('$$ block ending with a full stop, then a capital', [
        'We find that $$x = \\frac{-b \\pm \\sqrt{b^2 - 4ac}}{2a}.$$',
        ' Plugging in the values gives $x = \\boxed{3}$.',
    ]),
    ('asy figure, cut at its lines', [
        'Draw the triangle.\n[asy]',
        '\ndraw((0,0)--(1,0)--(0,1)--cycle);',
        '\nlabel("$A$", (0,0), SW);',
        '\n[/asy]',
        '\nIts area is $\\boxed{\\frac12}$.',
    ]),
    ('short response, one step', [
        '$\\boxed{5}$',
    ]),
    ('short response without math', [
        'The answer is 5',
    ]),
    ('two #### lines: plain text, the short last line joins the one before', [
        'First we add the numbers together to get 12.',
        '\n#### 12\nThen we check it again carefully.\n#### 12',
    ]),
    ('long text part cut at a comma', [
        'Since the function is increasing on the whole interval and the endpoints are given,',
        ' the minimum is at the left endpoint and equals $f(0) = 1$.',
    ]),
    ('long text part cut after " and" (no comma)', [
        'We need to count the number of ways to choose the committee members from the club and',
        ' then divide by the number of orderings of them.',
    ]),
    ('long formula cut at =', [
        '$$\\frac{1}{2} + \\frac{1}{3} + \\frac{1}{6} + \\frac{1}{4} + \\frac{1}{12} =',
        ' \\frac{6}{12} + \\frac{4}{12} + \\frac{2}{12} + \\frac{3}{12} + \\frac{1}{12} = \\frac{16}{12}$$',
    ]),
    ('long formula cut at + (no =)', [
        '$1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 + 13 +',
        ' 14 + 15 + 16 + 17 + 18 + 19 + 20 + 21 + 22 + 23 + 24$',
    ]),
    ('no cut after e.g. (a one-letter word before the full stop)', [
        'Choose a small prime, e.g. The prime two works since it divides every even number here.',
    ]),
    ('tabular, cut at its lines', [
        'The table is \\begin{tabular}{cc}',
        '\n1 & 2 \\\\',
        '\n3 & 4',
        '\n\\end{tabular} and its sum is $10$.',
    ]),
    ('a single opening line joins the next', [
        'Now we compute the determinant of the matrix below.',
        '\n$$\n\\det A = 5',
        '\n$$\nSo it is invertible.',
    ]),
    ('question mark is no sentence end', [
        'Is the number prime? We check the divisors up to its square root and find none of them.',
    ]),
    ('escaped dollars', [
        'The shirt costs \\$15 and the hat costs \\$5 more than that.',
        ' Together they cost \\$35 in total.',
    ]),
    ('a repeated identical block in the same part is not cut again', [
        '\\[\na',
        '\n\\] \\[\na\n\\] are the same block written twice on one line.',
    ]),
    ('leading space (SFT target form)', [
        ' We simplify the fraction first.',
        ' Then we multiply it by three to get $\\boxed{9}$.',
    ]),
    ('paragraph break', [
        'The first step is to factor the polynomial.',
        '\n\nThe second step is to find its roots.',
    ]),
    ('long math cut after \\equiv (no = or +)', [
        '$3^{100} \\pmod{7} \\text{ is computed by noting that } 3^6 \\equiv',
        ' 1 \\pmod 7 \\text{ so that } 3^{100} \\equiv 3^4 \\equiv 4$',
    ]),
    ('long text part cut at a comma nearest the middle', [
        'There are three cases to consider in this problem,',
        ' each with its own count: the first case, the second case and the third case.',
    ]),
    ('unclosed $ is text; a short last sentence joins the one before', [
        'So the value is $x = 3 and we are done with the computation here. The End.',
    ]),
    ('align lines, the text after it stays with the last', [
        '\\begin{align*}\nx &= 1\\\\',
        '\ny &= 2',
        '\n\\end{align*} These values satisfy both equations.',
    ]),
    ('\\( \\) inline sentence end', [
        'The slope is \\(m = 2.\\)',
        ' The intercept is \\(b = -1.\\)',
        ' So the line is \\(y = 2x - 1\\).',
    ]),
    ('empty', [
        '',
    ]),
    ('short response ending with a full stop in math', [
        'So $x=1.$',
    ]),
    ('environments inside display math: one span, cut at =', [
        'Hence\n\\[\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix} + \\begin{pmatrix} 3 \\\\ 4 \\end{pmatrix} =',
        ' \\begin{pmatrix} 4 \\\\ 6 \\end{pmatrix}.\\]\nDone.',
    ]),
    ('long text part cut after " to"', [
        'We want the distance from the point at the origin of the plane to',
        ' the line through the two points in the plane.',
    ]),
]
OFFICIAL_FAILS = {"short response, one step", "short response without math", "empty"}


def _bounds(steps):
    out = [0]
    for s in steps:
        out.append(out[-1] + len(s))
    return out


@pytest.mark.parametrize("why,steps", PAPER_CASES, ids=[c[0] for c in PAPER_CASES])
def test_paper_splitter_table(why, steps):
    text = "".join(steps)
    got = split_paper_math_steps(text)
    assert got == steps
    assert "".join(got) == text and (all(got) or text == "")
    assert paper_math_boundaries(text) == _bounds(steps)


def test_table_covers_what_it_must():
    assert len(PAPER_CASES) >= 30
    texts = ["".join(s) for _, s in PAPER_CASES]
    for needle in ("\\begin{align*}", "\\[", "[asy]", "$$", "\\begin{tabular}", "e.g.", "Mr.",
                   "\\equiv", "\\(", "\\$"):
        assert any(needle in t for t in texts), needle
    assert sum(t.count("####") >= 2 for t in texts) >= 1
    assert sum(0 < len(t) < 20 for t in texts) >= 3
    assert sum(len(t) > MAX_PART_LENGTH for t in texts) >= 6


def _case(why):
    return next(s for w, s in PAPER_CASES if w == why)


@pytest.mark.parametrize("why,block", [
    ("display math \\[..\\] with lines", ("\\[", "\\]")),
    ("align environment, every line a step", ("\\begin{align*}", "\\end{align*}")),
    ("asy figure, cut at its lines", ("[asy]", "[/asy]")),
    ("tabular, cut at its lines", ("\\begin{tabular}", "\\end{tabular}")),
    ("long formula cut at =", ("$$", "$$")),
    ("long formula cut at + (no =)", ("$", "$")),
])
def test_paper_cuts_inside_math_where_whole_math_keeps_it_whole(why, block):
    steps = _case(why)
    text = "".join(steps)
    a = text.index(block[0])
    b = text.index(block[1], a + len(block[0])) + len(block[1])
    inside = lambda bounds: [c for c in bounds if a < c < b]  # noqa: E731
    assert inside(_bounds(steps))  # the paper's steps cut the block
    assert not inside(_bounds(split_math_steps(text)))  # whole-math keeps it in one step


@pytest.mark.parametrize("why", ["plain sentences", "Mr. is not a sentence end; Mrs. is",
                                 "sentence end inside inline math followed by text",
                                 "escaped dollars", "leading space (SFT target form)",
                                 "\\( \\) inline sentence end"])
def test_paper_and_whole_math_agree_on_plain_sentences(why):
    steps = _case(why)
    assert split_math_steps("".join(steps)) == steps


def test_official_failures_are_one_step_here():
    for why in OFFICIAL_FAILS:
        steps = _case(why)
        assert len(steps) == 1


def test_display_math_sentence_end_starts_a_step_in_both_splitters():
    for text, head in [
        ("The area is\\[A = \\pi r^2 = 49\\pi.\\] Therefore the answer is $49\\pi$ here.",
         "The area is\\[A = \\pi r^2 = 49\\pi.\\]"),
        ("We find that $$x = \\frac{-b}{2a} + 17.$$ Plugging in the values gives $x = 3$.",
         "We find that $$x = \\frac{-b}{2a} + 17.$$"),
    ]:
        for split in (split_math_steps, split_paper_math_steps):
            steps = split(text)
            assert steps[0] == head, split.__name__
            assert "".join(steps) == text
    # whole-math: not before a lower-case word, nor inside the math, nor without a full stop
    for text in ("The area is \\[A = 49\\pi.\\] which is the answer to the whole question here.",
                 "The area is \\[A = 49\\pi\\] Therefore the answer is the whole question here.",
                 "We get $$x. Y = 2$$ and so the answer follows from the whole question."):
        assert split_math_steps(text) == [text]


def test_math_task_uses_the_chosen_splitter():
    text = "".join(_case("align environment, every line a step"))
    path = os.path.join(DATA, "math", "test.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    paper = load_task("math", path, splitter="paper", num_test=1)
    whole = load_task("math", path, num_test=1)
    assert paper.split_steps(text, max_steps=0) == split_paper_math_steps(text)
    assert whole.split_steps(text, max_steps=0) == split_math_steps(text)
    with pytest.raises(ValueError, match="splitter must be one of whole-math, paper"):
        load_task("math", path, splitter="sentences", num_test=1)


def _solutions():
    out = []
    for split in ("train", "test"):
        path = os.path.join(DATA, "math", f"{split}.jsonl")
        if not os.path.exists(path):
            pytest.skip(f"{path} not present")
        with open(path, encoding="utf-8") as f:
            out += [json.loads(line)["solution"] for line in f if line.strip()]
    return out


def test_paper_steps_on_solutions_and_cut_off_responses():
    rng = random.Random(0)
    sols = _solutions()
    assert len(sols) == 12500
    # SFT targets (every MATH-500 one, every fourth of train), and solutions cut off at a random
    # character (a response stopped by the token budget)
    texts = [" " + s.strip() for s in sols[-500:] + sols[:-500:4]]
    texts += [s[: rng.randrange(1, len(s) + 1)] for s in sols[::8]]
    for text in texts:
        steps = split_paper_math_steps(text)
        assert "".join(steps) == text and all(steps)


@pytest.mark.parametrize("text", [
    "word, " * 20000, "a. B" * 30000, "$" * 100_000, "\\begin{a}" * 20000,
    "x " * 200_000 + "\n" * 10_000, "\\[" + "x = 1. " * 10000, "[asy]" * 10000 + "[/asy]",
    "\\(" * 50_000, "$a$ " * 20_000, "x=1+" * 20_000, "\\[x\\\\\n" * 10_000,
], ids=range(11))
def test_paper_splitter_on_huge_adversarial_text_is_fast_and_exact(text):
    t0 = time.perf_counter()
    steps = split_paper_math_steps(text)
    assert "".join(steps) == text and all(steps)
    assert time.perf_counter() - t0 < 3.0
