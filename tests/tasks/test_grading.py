"""Graders: GSM8K numeric, synthetic integer, MATH through math-verify; adversarial inputs."""

import threading
import time

import pytest

from vineppo.tasks.grading import extract_gsm8k_answer, grade_gsm8k, grade_integer, parse_number
from vineppo.tasks.math_grader import (
    answers_equivalent,
    extract_math_answer,
    grade_math,
    last_boxed,
)

GSM8K_CASES = [
    # (response, gold, expected)
    ("So she has 18 left.\n#### 18", "18", 1.0),
    ("#### 1,080", "1080", 1.0),
    ("#### 1080", "1,080", 1.0),
    ("#### $1,000.00", "1000", 1.0),
    ("#### 5.0", "5", 1.0),
    ("#### 5.", "5", 1.0),
    ("#### 50%", "50", 1.0),
    ("#### 12 dollars", "12", 1.0),
    ("#### -3", "-3", 1.0),
    ("#### \u22123", "-3", 1.0),
    ("#### -$3", "-3", 1.0),
    ("#### .5", "0.5", 1.0),
    ("#### 3/4", "0.75", 1.0),
    ("#### 18\nsome trailing text 19", "18", 1.0),
    ("#### 17\n#### 18", "18", 1.0),  # the last #### counts
    ("#### 18\n#### 17", "18", 0.0),
    ("#### 3", "-3", 0.0),
    ("#### 5.01", "5", 0.0),
    ("#### 10000", "1000", 0.0),
    ("The answer is 18.", "18", 0.0),  # no #### and no fallback
    ("####", "18", 0.0),
    ("#### eighteen", "18", 0.0),
    ("#### 1" + "0" * 5000, "1", 0.0),  # huge number: no parse, no error
    ("", "18", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", GSM8K_CASES)
def test_gsm8k_grading_table(response, gold, expected):
    assert grade_gsm8k(response, gold) == expected


def test_gsm8k_last_number_fallback():
    assert grade_gsm8k("So the total is 18 apples.", "18", fallback_last_number=True) == 1.0
    assert grade_gsm8k("It is 18, not 17.", "18", fallback_last_number=True) == 0.0
    # with a #### line the fallback is not used
    assert grade_gsm8k("18 apples\n#### 17", "18", fallback_last_number=True) == 0.0
    assert extract_gsm8k_answer("nothing here", fallback_last_number=True) is None


def test_parse_number_values():
    from fractions import Fraction

    assert parse_number("$2,345.50 total") == Fraction(4691, 2)
    assert parse_number("abc") is None
    assert parse_number("x3") is None  # a digit glued to a word is not a number
    assert parse_number("1/0") is None


SYNTHETIC_CASES = [
    (" 37 + 48 = 85\n85 * 3 = 255\n#### 255", "255", 1.0),
    ("#### 255\n", "255", 1.0),
    ("#### 255 ", "255", 1.0),
    ("#### 254", "255", 0.0),
    ("#### 255.0", "255", 0.0),  # exact integer format
    ("#### 255 apples", "255", 0.0),
    ("#### 2550", "255", 0.0),
    ("255", "255", 0.0),
    ("#### -7", "-7", 1.0),
    ("#### " + "9" * 100, "9", 0.0),
]


@pytest.mark.parametrize("response,gold,expected", SYNTHETIC_CASES)
def test_synthetic_grading_table(response, gold, expected):
    assert grade_integer(response, gold) == expected


# (gold answer, model answer, equivalent?)
MATH_CASES = [
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\frac{1}{2}", "\\frac{2}{4}", True),
    ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("0.25", "\\frac14", True),
    ("3", "3.0", True),
    ("3", "3.01", False),
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("50\\%", "40\\%", False),
    ("30^\\circ", "30", True),
    ("30^\\circ", "30^{\\circ}", True),
    ("30^\\circ", "60^\\circ", False),
    ("5\\text{ cm}", "5", True),
    ("12\\text{ inches}", "13\\text{ inches}", False),
    ("\\text{(C)}", "C", True),
    ("\\text{(C)}", "\\text{(D)}", False),
    ("\\text{Monday}", "\\text{Monday}", True),
    ("[1,2)", "[1, 2)", True),
    ("[1,2)", "[1,2]", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3]", "(-\\infty,3)", False),
    ("(1,2)", "(1, 2)", True),
    ("(1,2)", "(2,1)", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}", False),
    ("1.5\\times10^{3}", "1500", True),
    ("2 \\times 10^{-3}", "0.002", True),
    ("2 \\times 10^{-3}", "0.02", False),
    ("-5", "-5", True),
    ("-5", "5", False),
    ("-\\frac{3}{4}", "-0.75", True),
    ("1, 2", "2, 1", True),  # multiple answers in any order
    ("1, 2", "1, 3", False),
    ("\\sqrt{2}", "2^{1/2}", True),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("x^2+2x+1", "(x+1)^2", True),
    ("x^2+2x+1", "(x-1)^2", False),
    ("\\pi", "\\pi", True),
    ("\\$18.90", "18.90", True),
]


@pytest.mark.parametrize("gold,pred,expected", MATH_CASES)
def test_math_equivalence_table(gold, pred, expected):
    assert answers_equivalent(gold, pred) is expected
    # the same through the full grader with the answer boxed in a solution
    response = f"Some work here. So the answer is $\\boxed{{{pred}}}$."
    assert grade_math(response, gold) == float(expected)


def test_math_answer_extraction():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{a{b}c} then \\boxed{x") == "a{b}c"  # unbalanced last box skipped
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert extract_math_answer("Thus, the answer is $\\frac{3}{4}$.") == "\\frac{3}{4}"
    assert extract_math_answer("The final answer is 12.\nDone") == "12"
    assert extract_math_answer("The answer is 3 but \\boxed{4}") == "4"
    assert extract_math_answer("nothing") is None
    assert grade_math("The answer is 12.", "12") == 1.0
    assert grade_math("I think it is 12.", "12") == 0.0  # no box and no "answer is"


def _bounded(fn, limit_s):
    """fn() within `limit_s` CPU seconds of this process: the grader's budget is CPU time, so the
    bound holds on a loaded machine too."""
    t0 = time.process_time()
    out = fn()
    elapsed = time.process_time() - t0
    assert elapsed < limit_s, f"took {elapsed:.2f} CPU s"
    return out


ADVERSARIAL = [
    "\\boxed{2^{2^{2^{2^{2^{10}}}}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{9^{9^{9}}}",
    "\\boxed{" + "{" * 5000 + "}" * 5000 + "}",
    "\\boxed{" + "\\frac{" * 300 + "1}{2}" * 300 + "}",
    "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
    "\\boxed{" + "1+" * 150 + "1}",
    "\\boxed{" + "x" * 200_000 + "}",
    "\\boxed{" * 20_000,
    "}" * 10_000 + "\\boxed{5",
    "The answer is " + "$" * 10_000,
    "\x00\x01\ufffd\U0001F600 \\boxed{\u00bd}",
    "\\boxed{\\frac{1}{0}}",
    "\\boxed{\\begin{pmatrix}" + "1&" * 2000 + "1\\end{pmatrix}}",
    "\\boxed{__import__('os').system('echo pwned')}",
    "\\boxed{" + "a" * 50_000_00 + "}",
]


@pytest.mark.parametrize("response", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_math_grader_adversarial_is_bounded(response):
    # 1 CPU second per comparison, one retry
    out = _bounded(lambda: grade_math(response, "5", time_limit=1.0), 6.0)
    assert out == 0.0


def test_gsm8k_grader_adversarial_is_bounded():
    for response in ["#### " + "9" * 1_000_000, "1," * 500_000, "#" * 1_000_000, "\ufffd" * 10**6]:
        assert _bounded(lambda: grade_gsm8k(response, "5", fallback_last_number=True), 2.0) == 0.0
        assert _bounded(lambda: grade_integer(response, "5"), 2.0) == 0.0


def test_grader_restores_previous_alarm_handler():
    import signal

    marker = []
    old = signal.signal(signal.SIGALRM, lambda *a: marker.append(1))
    try:
        assert grade_math("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
        assert signal.getsignal(signal.SIGALRM) is not None
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(0.05)
        assert marker == [1]  # our handler is back in place
    finally:
        signal.signal(signal.SIGALRM, old)


def test_math_grader_off_main_thread_uses_bounded_worker():
    results = {}

    def work():
        results["eq"] = grade_math("\\boxed{0.5}", "\\frac{1}{2}", time_limit=2.0)
        results["ne"] = grade_math("\\boxed{0.6}", "\\frac{1}{2}", time_limit=2.0)
        t0 = time.perf_counter()
        results["hard"] = grade_math("\\boxed{9^{9^{9}}}", "5", time_limit=1.0)
        results["hard_s"] = time.perf_counter() - t0

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)
    assert not t.is_alive()
    assert results["eq"] == 1.0 and results["ne"] == 0.0 and results["hard"] == 0.0
    assert results["hard_s"] < 10.0


# ------------------------------------------------ grading does not depend on machine load

_CPU_BUDGET = 0.4  # CPU seconds per try: ~3x the slowest case below on a quiet machine


def _grade_cases():
    from vineppo.tasks import math_grader

    math_grader._parse_gold.cache_clear()  # each pass parses every gold afresh
    return [answers_equivalent(g, p, time_limit=_CPU_BUDGET) for g, p, _ in MATH_CASES]


def test_math_grading_gives_the_same_results_under_cpu_load():
    import os
    import subprocess
    import sys

    quiet = _grade_cases()
    assert quiet == [e for _, _, e in MATH_CASES]
    # three busy processes per core: a wall-clock limit of the same size would expire here
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(3 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.2)
        loaded = _grade_cases()
    finally:
        for b in burners:
            b.kill()
        for b in burners:
            b.wait()
    assert loaded == quiet


def test_math_task_counts_timeouts_and_retries():
    from vineppo.tasks import GraderStats
    from vineppo.tasks.base import Example
    from vineppo.tasks.math_task import MathTask

    ex = Example(id="e", question="q", answer="5", solution="so \\boxed{5}")
    task = MathTask(name="math", train=[], test=[ex], time_limit=0.15)
    assert task.grade("so \\boxed{5}", ex) == 1.0
    assert task.grade("so \\boxed{6}", ex) == 0.0
    assert task.grader_stats() == GraderStats(graded=2, timed_out=0, retried=0)
    t0 = time.perf_counter()
    assert task.grade("\\boxed{9^{9^{9}}}", ex) == 0.0  # runs out of budget twice
    assert time.perf_counter() - t0 < 10.0
    assert task.grader_stats() == GraderStats(graded=1, timed_out=1, retried=1)
    assert task.grader_stats() == GraderStats()  # counted afresh after each call


def test_budget_is_cpu_time_not_wall_time():
    from vineppo.tasks.math_grader import GradingTimeout, _budget

    with _budget(0.1, 30.0):
        time.sleep(0.3)  # waiting uses no CPU: no timeout
    t0 = time.perf_counter()
    with pytest.raises(GradingTimeout):
        with _budget(0.1, 30.0):
            while True:
                pass
    assert 0.08 < time.perf_counter() - t0 < 5.0
    t0 = time.perf_counter()
    with pytest.raises(GradingTimeout):
        with _budget(10.0, 0.2):  # the wall-clock backstop
            time.sleep(2.0)
    assert time.perf_counter() - t0 < 1.0
