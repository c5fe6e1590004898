"""MATH grading: final-answer extraction and equivalence through math-verify, under a budget.

math-verify parses LaTeX with its own grammar (latex2sympy) and compares the resulting SymPy
objects; it never executes text. Only its LaTeX extraction is used (its plain-expression
extraction goes through SymPy's `parse_expr`, which evaluates Python). Symbolic simplification
can run for minutes on adversarial input (e.g. towers of powers), so every comparison has a
budget, counted in CPU seconds of the thread that compares (the work done, which other
processes on the machine do not change), with a wall-clock backstop ten times as long (at
least 30 s). In the main thread a 20 ms SIGALRM tick checks both (the previous handler and
timer are restored afterwards); in any other thread, where signals cannot be used, the
comparison runs in a spawned worker process, under the same budget there, and the worker is
killed when the backstop passes. A comparison that runs out of budget is tried once more
before it scores 0, and the `Grade` that `judge_math` returns says when either happened, so that
a task can count it.

math-verify is imported when a MATH answer is first compared, outside the budget; without it
grading stops with an ImportError that says how to install it.
"""

from __future__ import annotations

import atexit
import functools
import logging
import re
import signal
import threading
import time
from contextlib import contextmanager

from vineppo.tasks.base import Grade

logger = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 20_000  # only the tail of a longer response is searched for its answer
MAX_ANSWER_CHARS = 400  # longer extracted answers score 0 unless they match the gold exactly
DEFAULT_TIME_LIMIT = 2.0  # CPU seconds per comparison try (parsing both sides and verifying)
_TICK_S = 0.02  # how often the main-thread budget is checked
_MATH_VERIFY_MISSING = ("grading MATH answers needs the math-verify package: "
                        "pip install 'math-verify[antlr4_13_2]'")

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_ANSWER_IS = re.compile(r"(?i)(?:final answer|answer) is:?\s*")


class GradingTimeout(BaseException):
    """Raised by the deadline timer. A BaseException so library code catching Exception lets
    it through."""


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (brace-matched), or of `\\boxed x`;
    None when absent or unbalanced."""
    if not isinstance(text, str):
        return None
    text = text[-MAX_RESPONSE_CHARS:]
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    closing = _matching_braces(text, matches[0].end())
    for m in reversed(matches):
        i = m.end()
        if i < len(text) and text[i] == "{":
            if i in closing:
                return text[i + 1 : closing[i]]
            continue  # unbalanced: try an earlier box
        if i < len(text) and text[i] == " ":
            rest = re.match(r" +([^\s$]+)", text[i:])
            if rest:
                return rest.group(1)
    return None


def _matching_braces(text: str, start: int) -> dict[int, int]:
    """Position of each unescaped "{" at or after `start` -> its matching "}" (one pass)."""
    stack, pairs = [], {}
    for j in range(start, len(text)):
        c = text[j]
        if c == "{" and not _escaped(text, j):
            stack.append(j)
        elif c == "}" and stack and not _escaped(text, j):
            pairs[stack.pop()] = j
    return pairs


def _escaped(text: str, i: int) -> bool:
    n = 0
    while i - 1 - n >= 0 and text[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


def extract_math_answer(response: str) -> str | None:
    """The final answer: the last `\\boxed{}`, else the text after the last "The answer is"
    (to the end of its line, without surrounding `$` and a final full stop)."""
    if not isinstance(response, str):
        return None
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    tail = response[-MAX_RESPONSE_CHARS:]
    found = None
    for found in _ANSWER_IS.finditer(tail):
        pass
    if found is None:
        return None
    ans = tail[found.end() :].split("\n", 1)[0].strip()
    ans = ans.rstrip(".").strip()
    if len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$":
        ans = ans.strip("$").strip()
    elif ans.startswith("\\(") and ans.endswith("\\)"):
        ans = ans[2:-2].strip()
    return ans or None


_STRIP = [
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
    ("\\ ", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""),
    ("\\%", ""), ("%", ""), ("$", ""), ("\\displaystyle", ""),
]


def normalize_answer(ans: str) -> str:
    """Light string normalisation for the exact-match fast path (spacing, \\left/\\right,
    \\dfrac, degrees, percent, dollar signs, a trailing full stop)."""
    s = ans
    for a, b in _STRIP:
        s = s.replace(a, b)
    s = "".join(s.split())
    return s.rstrip(".")


def wall_backstop(time_limit: float) -> float:
    """Wall-clock seconds after which a comparison with CPU budget `time_limit` is stopped."""
    return max(30.0, 10.0 * time_limit)


@contextmanager
def _budget(cpu_seconds: float, wall_seconds: float):
    """Raise GradingTimeout in the main thread once it has used `cpu_seconds` of CPU time, or
    `wall_seconds` have passed, checked every _TICK_S; the previous SIGALRM handler is
    restored and a previous interval timer re-armed with its remaining time."""
    cpu0, wall0 = time.thread_time(), time.monotonic()
    fired = False

    def on_tick(signum, frame):
        nonlocal fired
        if fired:
            return
        if time.thread_time() - cpu0 > cpu_seconds or time.monotonic() - wall0 > wall_seconds:
            fired = True
            signal.setitimer(signal.ITIMER_REAL, 0)  # once: nothing may raise after this
            raise GradingTimeout()

    old_handler = signal.signal(signal.SIGALRM, on_tick)
    prev_delay, _ = signal.setitimer(signal.ITIMER_REAL, _TICK_S, _TICK_S)
    try:
        yield
    finally:
        fired = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if prev_delay > 0:
            signal.setitimer(
                signal.ITIMER_REAL, max(prev_delay - (time.monotonic() - wall0), 1e-3)
            )


@functools.lru_cache(maxsize=1)
def _math_verify():
    """The math_verify module (imported once, outside any budget)."""
    try:
        import math_verify
    except ImportError:
        raise ImportError(_MATH_VERIFY_MISSING) from None
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _parse(gold)


def _parse(latex: str):
    mv = _math_verify()
    # parsing_timeout=None: the caller's budget bounds the time (math-verify's own timer uses
    # whole-second SIGALRM and fails outside the main thread).
    return mv.parse(
        "\\boxed{" + latex + "}",
        extraction_config=[mv.LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=None,
    )


def _verify(gold: str, pred: str) -> bool:
    gold_parsed = _parse_gold(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(_math_verify().verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _try_here(gold: str, pred: str, time_limit: float) -> bool | None:
    """One comparison in this (main) thread: True / False, or None when it ran out of budget."""
    _math_verify()
    try:
        with _budget(time_limit, wall_backstop(time_limit)):
            return _verify(gold, pred)
    except GradingTimeout:
        logger.debug("math grading ran out of its %.2f CPU-second budget", time_limit)
        return None
    except Exception:
        logger.debug("math grading failed", exc_info=True)
        return False


_pool = None
_pool_lock = threading.Lock()
_WORKER_STARTUP_S = 60.0  # spawning a worker imports sympy and math-verify once


def _close_pool() -> None:
    """Stop the worker before interpreter shutdown tears down what Pool.__del__ needs."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.terminate()
            _pool.join()
            _pool = None


def _warm_worker() -> None:
    _math_verify()


def _try_in_worker(gold: str, pred: str, time_limit: float) -> bool | None:
    """Off the main thread: one comparison in a persistent spawned process (started and warmed
    up outside the budget); None when it ran out of budget there, or when the backstop passed
    here, and then the process is killed (and respawned on the next call)."""
    import multiprocessing

    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = multiprocessing.get_context("spawn").Pool(1)
            atexit.register(_close_pool)
            try:
                _pool.apply_async(_warm_worker).get(timeout=_WORKER_STARTUP_S)
            except Exception:
                logger.debug("math grading worker failed to start", exc_info=True)
        pool = _pool
        try:
            res = pool.apply_async(_try_here, (gold, pred, time_limit))
            return res.get(timeout=wall_backstop(time_limit) + 1.0)
        except multiprocessing.TimeoutError:
            pool.terminate()
            pool.join()
            _pool = None
            return None
        except Exception:
            logger.debug("math grading worker failed", exc_info=True)
            return False


def compare_answers(gold: str, pred: str, time_limit: float = DEFAULT_TIME_LIMIT) -> Grade:
    """Reward 1.0 when the predicted answer is mathematically equivalent to the gold answer:
    fast string match first, then math-verify under a budget of `time_limit` CPU seconds, tried
    once more when it runs out (`retried`); out of budget twice scores 0 (`timed_out`). Never
    raises on model output; ImportError when math-verify is missing."""
    _math_verify()  # a missing package is no model output: say so every time
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return Grade(0.0)
        if normalize_answer(pred) == normalize_answer(gold):
            return Grade(1.0)
        if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return Grade(0.0)
        here = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        attempt = _try_here if here else _try_in_worker
        result = attempt(gold, pred, time_limit)
        if result is not None:
            return Grade(float(result))
        result = attempt(gold, pred, time_limit)
        return Grade(float(bool(result)), timed_out=result is None, retried=True)
    except BaseException as e:  # noqa: BLE001 - a grader never raises on model output
        if isinstance(e, KeyboardInterrupt):
            raise
        return Grade(0.0)


def answers_equivalent(gold: str, pred: str, time_limit: float = DEFAULT_TIME_LIMIT) -> bool:
    """True when the predicted answer is equivalent to the gold answer (`compare_answers`)."""
    return compare_answers(gold, pred, time_limit).reward == 1.0


def judge_math(response: str, gold: str, time_limit: float = DEFAULT_TIME_LIMIT) -> Grade:
    """Reward 1.0 when the response's final answer (last `\\boxed{}` or "The answer is ...") is
    equivalent to `gold` (`compare_answers`, with the budget's outcome)."""
    pred = extract_math_answer(response)
    if pred is None:
        _math_verify()
        return Grade(0.0)
    return compare_answers(gold, pred, time_limit)


def grade_math(response: str, gold: str, time_limit: float = DEFAULT_TIME_LIMIT) -> float:
    """1.0 when the response's final answer is equivalent to `gold` (`judge_math`), else 0.0."""
    return judge_math(response, gold, time_limit).reward


def readable_gold(gold) -> str | None:
    """Why a gold answer cannot be graded, or None when it can: it must be a non-empty string
    with balanced braces, so that it parses once boxed. (Parsing every gold with math-verify
    at load time would take about 30 s for MATH's 12.5k; grading parses each when first used.)"""
    if not isinstance(gold, str) or not gold.strip():
        return "the gold answer is empty"
    depth = 0
    for i, c in enumerate(gold):
        if c in "{}" and not _escaped(gold, i):
            depth += 1 if c == "{" else -1
            if depth < 0:
                break
    if depth:
        return f"the gold answer {gold[:60]!r} has unbalanced braces"
    return None
