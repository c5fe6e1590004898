"""Numeric answer extraction and comparison for GSM8K and the synthetic task.

Graders never raise on model output and never evaluate it: numbers are read with regular
expressions and compared as exact fractions.
"""

from __future__ import annotations

import re
from fractions import Fraction

# Only the end of a response can hold its final answer; capping the text searched bounds the time.
MAX_SEARCH_CHARS = 20_000
MAX_NUMBER_CHARS = 40  # longer digit strings are not answers (and int() refuses > 4300 digits)

_MINUS = "\u2212\u2013"  # unicode minus and en dash, written by some models for negatives
_NUMBER = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-" + _MINUS + r"])?\s?\$?\s?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?"
)


def parse_number(text: str) -> Fraction | None:
    """The first number in `text` as an exact fraction, or None.

    Accepts thousands separators ("1,000"), currency ("$5", "-$5"), decimals ("5.0", ".5"),
    simple fractions ("3/4"), and ignores what follows the number (units, "%", a full stop):
    "$1,000.00 dollars" -> 1000, "-3." -> -3, "50%" -> 50.
    """
    if not isinstance(text, str):
        return None
    m = _NUMBER.search(text[:MAX_SEARCH_CHARS])
    return _to_fraction(m) if m else None


def _to_fraction(m: re.Match) -> Fraction | None:
    num = m.group("num").replace(",", "")
    den = m.group("den")
    if len(num) > MAX_NUMBER_CHARS or (den and len(den) > MAX_NUMBER_CHARS):
        return None
    try:
        value = Fraction(num)
        if den is not None:
            d = Fraction(den)
            if d == 0:
                return None
            value /= d
    except (ValueError, ZeroDivisionError):
        return None
    return -value if m.group("sign") else value


def gold_number(text: str) -> Fraction | None:
    """The number a gold answer is: `parse_number` of a text that starts with that number
    ("72", "-3", "$1,000", "5 apples"), else None ("abc", "about 5")."""
    if not isinstance(text, str):
        return None
    m = _NUMBER.match(text.strip())
    return _to_fraction(m) if m else None


def last_number(text: str) -> Fraction | None:
    """The last number in `text` (searched in its last MAX_SEARCH_CHARS characters), or None."""
    if not isinstance(text, str):
        return None
    last = None
    for last in _NUMBER.finditer(text[-MAX_SEARCH_CHARS:]):
        pass
    return _to_fraction(last) if last else None


def extract_gsm8k_answer(response: str, fallback_last_number: bool = False) -> Fraction | None:
    """The number after the last `####` (on the same line), or, when there is no `####` and
    `fallback_last_number` is set, the last number of the response."""
    if not isinstance(response, str):
        return None
    tail = response[-MAX_SEARCH_CHARS:]
    k = tail.rfind("####")
    if k == -1:
        return last_number(tail) if fallback_last_number else None
    line = tail[k + 4 :].lstrip(" \t").split("\n", 1)[0]
    return parse_number(line)


def grade_gsm8k(response: str, gold: str, fallback_last_number: bool = False) -> float:
    """1.0 when the response's final number equals the gold answer's, else 0.0."""
    try:
        pred = extract_gsm8k_answer(response, fallback_last_number)
        target = parse_number(gold)
        return float(pred is not None and target is not None and pred == target)
    except Exception:  # a grader never raises on model output
        return 0.0


_INTEGER = re.compile(r"-?\d{1,18}")


def extract_final_integer(response: str) -> int | None:
    """The integer after the last `####`, which must be the whole rest of that line."""
    if not isinstance(response, str):
        return None
    tail = response[-MAX_SEARCH_CHARS:]
    k = tail.rfind("####")
    if k == -1:
        return None
    line = tail[k + 4 :].split("\n", 1)[0].strip()
    return int(line) if _INTEGER.fullmatch(line) else None


def grade_integer(response: str, gold: str) -> float:
    """Exact integer comparison of the answer after `####` (the synthetic task)."""
    try:
        pred = extract_final_integer(response)
        return float(pred is not None and pred == int(str(gold).strip()))
    except Exception:
        return 0.0
