"""MATH grading: final-answer extraction and equivalence through math-verify, time-bounded.

math-verify parses LaTeX with its own grammar (latex2sympy) and compares the resulting SymPy
objects; it never executes text. Only its LaTeX extraction is used (its plain-expression
extraction goes through SymPy's `parse_expr`, which evaluates Python). Symbolic simplification
can run for minutes on adversarial input (e.g. towers of powers), so every comparison has a
deadline: in the main thread a SIGALRM interval timer (sub-second, restored afterwards); in any
other thread, where signals cannot be used, a spawned worker process that is killed on timeout.
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

logger = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 20_000  # only the tail of a longer response is searched for its answer
MAX_ANSWER_CHARS = 400  # longer extracted answers score 0 unless they match the gold exactly
DEFAULT_TIME_LIMIT = 2.0  # seconds per comparison (parsing both sides and verifying)

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


@contextmanager
def _deadline(seconds: float):
    """Raise GradingTimeout in the main thread after `seconds`, restoring any previous SIGALRM
    handler and re-arming a previous interval timer with its remaining time."""

    def on_alarm(signum, frame):
        raise GradingTimeout()

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    prev_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if prev_delay > 0:
            signal.setitimer(
                signal.ITIMER_REAL, max(prev_delay - (time.monotonic() - start), 1e-3)
            )


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _parse(gold)


def _parse(latex: str):
    from math_verify import LatexExtractionConfig, parse

    # parsing_timeout=None: the caller's deadline bounds the time (math-verify's own timer uses
    # whole-second SIGALRM and fails outside the main thread).
    return parse(
        "\\boxed{" + latex + "}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
        parsing_timeout=None,
    )


def _verify(gold: str, pred: str) -> bool:
    from math_verify import verify

    gold_parsed = _parse_gold(gold)
    pred_parsed = _parse(pred)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _verify_with_deadline(gold: str, pred: str, time_limit: float) -> bool:
    try:
        with _deadline(time_limit):
            return _verify(gold, pred)
    except GradingTimeout:
        logger.debug("math grading timed out after %.2fs", time_limit)
        return False
    except Exception:
        logger.debug("math grading failed", exc_info=True)
        return False


def _worker_verify(gold: str, pred: str, time_limit: float) -> bool:
    return _verify_with_deadline(gold, pred, time_limit)


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


def _verify_in_worker(gold: str, pred: str, time_limit: float) -> bool:
    """Off the main thread: run the comparison in a persistent spawned process; on timeout
    the process is killed (and respawned on the next call)."""
    import multiprocessing

    global _pool
    with _pool_lock:
        fresh = _pool is None
        if fresh:
            _pool = multiprocessing.get_context("spawn").Pool(1)
            atexit.register(_close_pool)
        pool = _pool
        try:
            res = pool.apply_async(_worker_verify, (gold, pred, time_limit))
            return bool(res.get(timeout=time_limit + 1.0 + (_WORKER_STARTUP_S if fresh else 0)))
        except multiprocessing.TimeoutError:
            pool.terminate()
            pool.join()
            _pool = None
            return False
        except Exception:
            logger.debug("math grading worker failed", exc_info=True)
            return False


def answers_equivalent(gold: str, pred: str, time_limit: float = DEFAULT_TIME_LIMIT) -> bool:
    """True when the predicted answer is mathematically equivalent to the gold answer (fast
    string match first, then math-verify under a deadline). Never raises."""
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        if normalize_answer(pred) == normalize_answer(gold):
            return True
        if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            return _verify_with_deadline(gold, pred, time_limit)
        return _verify_in_worker(gold, pred, time_limit)
    except BaseException as e:  # noqa: BLE001 - a grader never raises on model output
        if isinstance(e, KeyboardInterrupt):
            raise
        return False


def grade_math(response: str, gold: str, time_limit: float = DEFAULT_TIME_LIMIT) -> float:
    """1.0 when the response's final answer (last `\\boxed{}` or "The answer is ...") is
    equivalent to `gold`, else 0.0."""
    pred = extract_math_answer(response)
    if pred is None:
        return 0.0
    return float(answers_equivalent(gold, pred, time_limit))
