"""Step splitters: cut a response into reasoning steps that are exact substrings of it.

Every splitter returns a list whose concatenation is the input, with no empty step (an empty
response gives one empty step). Step boundaries are character offsets; `tokens.step_token_offsets`
maps them to token offsets.
"""

from __future__ import annotations

import bisect
import re

_NEWLINE_RUN = re.compile(r"\n+")
_ANSWER_LINE = re.compile(r"\s*####")


def _cut(text: str, cuts: list[int]) -> list[str]:
    bounds = [0] + sorted(c for c in set(cuts) if 0 < c < len(text)) + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def _merge_forward(pieces: list[str], is_small) -> list[str]:
    """Merge every piece for which `is_small(piece)` into the next one (the last into the previous)."""
    out: list[str] = []
    carry = ""
    for p in pieces:
        carry += p
        if not is_small(carry):
            out.append(carry)
            carry = ""
    if carry:
        if out:
            out[-1] += carry
        else:
            out.append(carry)
    return out


def split_newline_steps(response: str) -> list[str]:
    """GSM8K-style steps: one per line. A step ends after its run of newlines; blank (whitespace
    only) lines are merged into the following step, so leading blank lines join the first step;
    a line starting with `####` (the final answer) is merged into the step before it."""
    if not response:
        return [response]
    pieces = _cut(response, [m.end() for m in _NEWLINE_RUN.finditer(response)])
    pieces = _merge_forward(pieces, lambda p: not p.strip())
    out: list[str] = []
    for p in pieces:
        if out and _ANSWER_LINE.match(p):
            out[-1] += p
        else:
            out.append(p)
    return out


# ---------------------------------------------------------------- math-aware splitting

_OPENER = re.compile(r"\$\$|\$|\\\(|\\\[|\\begin\{([^{}\n]{1,40})\}|\[asy\]")


def _escaped(text: str, i: int) -> bool:
    """True when text[i] is preceded by an odd number of backslashes (e.g. `\\$` is a literal $)."""
    n = 0
    while i - 1 - n >= 0 and text[i - 1 - n] == "\\":
        n += 1
    return n % 2 == 1


def _find_unescaped(text: str, needle: str, start: int) -> int:
    i = text.find(needle, start)
    while i != -1 and _escaped(text, i):
        i = text.find(needle, i + 1)
    return i


def math_spans(text: str) -> list[tuple[int, int]]:
    """Half-open character spans of math and figures: `$...$`, `$$...$$`, `\\(...\\)`,
    `\\[...\\]`, `\\begin{env}...\\end{env}` (nesting of the same env counted) and
    `[asy]...[/asy]`. An unclosed opener protects everything up to the end of the text."""
    spans: list[tuple[int, int]] = []
    pos = 0
    n = len(text)
    while pos < n:
        m = _OPENER.search(text, pos)
        if m is None:
            break
        start, tok = m.start(), m.group(0)
        if tok.startswith("$") and _escaped(text, start):
            pos = start + 1
            continue
        if tok == "$$":
            close = _find_unescaped(text, "$$", m.end())
            end = n if close == -1 else close + 2
        elif tok == "$":
            close = _find_unescaped(text, "$", m.end())
            end = n if close == -1 else close + 1
        elif tok == "\\(":
            close = text.find("\\)", m.end())
            end = n if close == -1 else close + 2
        elif tok == "\\[":
            close = text.find("\\]", m.end())
            end = n if close == -1 else close + 2
        elif tok == "[asy]":
            close = text.find("[/asy]", m.end())
            end = n if close == -1 else close + len("[/asy]")
        else:
            end = _match_env(text, m.group(1), m.end())
        spans.append((start, end))
        pos = max(end, start + 1)
    return spans


def _match_env(text: str, env: str, pos: int) -> int:
    begin, finish = "\\begin{" + env + "}", "\\end{" + env + "}"
    depth = 1
    while depth:
        b = text.find(begin, pos)
        e = text.find(finish, pos)
        if e == -1:
            return len(text)
        if b != -1 and b < e:
            depth += 1
            pos = b + len(begin)
        else:
            depth -= 1
            pos = e + len(finish)
    return pos


def _inside(spans: list[tuple[int, int]], i: int) -> bool:
    """True when a cut at offset i would fall strictly inside a span."""
    k = bisect.bisect_right(spans, (i, float("inf"))) - 1
    return k >= 0 and spans[k][0] < i < spans[k][1]


# A sentence end may close inline math ("... = 3.$  Next"); the cut goes after the delimiter.
_SENTENCE_END = re.compile(r"[.!?](?:\$|\\\))?(?=[ \t]+[^\s])")
# A sentence may also end inside display math ("... = 3.\\]  Next"): cut after the closing
# delimiter when a capital letter starts the next sentence on the same line.
_DISPLAY_SENTENCE_END = (".\\]", ".$$")
_NEXT_SENTENCE = re.compile(r"[ \t]+[A-Z]")
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "etc.", "Dr.", "Mr.", "Mrs.", "Ms.", "cf.")
# Secondary cut points for long parts: after a comma, before " and", before " =" / "=".
_SECONDARY = re.compile(r",(?=\s)|(?= and\b)|(?<![<>!=\s])(?=\s?=(?!=))")


def _long_part_cuts(text: str, a: int, b: int, spans, max_chars: int, min_chars: int) -> list[int]:
    """Cuts inside text[a:b] (which is over max_chars long) so that parts are at most max_chars
    where cut points allow it and never shorter than min_chars."""
    cands = sorted(
        {m.start() if m.group(0) == "" else m.end() for m in _SECONDARY.finditer(text, a, b)}
    )
    cands = [c for c in cands if a + min_chars <= c <= b - min_chars and not _inside(spans, c)]
    cuts: list[int] = []
    start = a
    while b - start > max_chars:
        lo = bisect.bisect_left(cands, start + min_chars)
        hi = bisect.bisect_right(cands, start + max_chars)
        if hi > lo:
            c = cands[hi - 1]  # the longest part that fits
        elif hi < len(cands):
            c = cands[hi]  # no cut fits: the shortest part over max_chars
        else:
            break
        cuts.append(c)
        start = c
    return cuts


def split_math_steps(
    response: str, max_chars: int = 100, min_part_chars: int = 20, min_step_chars: int = 12
) -> list[str]:
    """MATH-style steps ("whole-math"). Cuts after newline runs and at sentence ends (after `.`,
    `!` or `?` followed by a space, before the space; after display math ending with a full
    stop, `.\\]` or `.$$`, when a capital follows on the same line), never inside math
    (`math_spans`), so math blocks stay whole. Parts longer than `max_chars` are cut further
    after commas, before " and" and before "=" (outside math), into parts of at least
    `min_part_chars`. Steps with fewer than `min_step_chars` non-blank
    characters are merged into the next step (the last into the one before)."""
    if not response:
        return [response]
    spans = math_spans(response)
    cuts = [m.end() for m in _NEWLINE_RUN.finditer(response)]
    for m in _SENTENCE_END.finditer(response):
        i = m.end()
        if any(response.endswith(a, 0, m.start() + 1) for a in _ABBREVIATIONS):
            continue
        cuts.append(i)
    for _, end in spans:
        if response.endswith(_DISPLAY_SENTENCE_END, 0, end) and _NEXT_SENTENCE.match(response, end):
            cuts.append(end)
    cuts = sorted(c for c in set(cuts) if 0 < c < len(response) and not _inside(spans, c))
    bounds = [0] + cuts + [len(response)]
    extra: list[int] = []
    for a, b in zip(bounds, bounds[1:]):
        if b - a > max_chars:
            extra += _long_part_cuts(response, a, b, spans, max_chars, min_part_chars)
    pieces = _cut(response, cuts + extra)
    return _merge_forward(pieces, lambda p: len("".join(p.split())) < min_step_chars)


# ---------------------------------------------------------------- cap on the number of steps

def merge_steps(steps: list[str], max_steps: int) -> list[str]:
    """Merge steps down to at most `max_steps` by keeping evenly spaced boundaries: with n > m
    steps, step k of the result starts at original step floor(k * n / m), so the first boundary
    (offset 0) is always kept and the merged steps differ in size by at most one original step."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    n = len(steps)
    if n <= max_steps:
        return list(steps)
    starts = [k * n // max_steps for k in range(max_steps)] + [n]
    return ["".join(steps[a:b]) for a, b in zip(starts, starts[1:])]
