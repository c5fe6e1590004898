"""The paper's MATH step splitter: the step boundaries of the official VinePPO code's in-place
splitter, rule for rule, as exact substrings of the response.

The rules, in the order they apply (character counts are of the response text unless noted):

1. Math is masked. `[asy]..[/asy]`, `$\\begin{tabular}..\\end{tabular}$`,
   `\\begin{tabular}..\\end{tabular}`, `\\(..\\)`, `\\[..\\]`, `$$..$$`, `$..$` and
   `\\begin{env}..\\end{env}` are found in that order (shortest match), each search skipping
   what an earlier one found. Wherever a rule below counts "masked" characters, a math span
   counts as 60.
2. Sentences and lines, outside math: a cut after a full stop followed by whitespace and a
   capital letter (not after a one-letter word such as "A." or the "g." of "e.g.", nor after a
   two-letter word such as "Mr."), and a cut before every newline. A part shorter than 20 masked characters that does not end with a
   full stop joins the next part.
3. Sentence ends in math: a cut after every math span that ends with a full stop (`.$`, `.$$`,
   `.\\)`, `.\\]`). A part shorter than 20 characters that does not end with one of those joins
   the next part (the last part joins the one before).
4. Lines in math: a cut before every newline inside a math span, so each line of an `align` or
   a `\\[..\\]` block starts a step (a span whose text repeats an earlier span of the same part
   is not cut: the official code recovers repeated spans at once). A part that is only an
   opening delimiter (`$`, `$$`, `\\(`, `\\[`, `\\begin{..}`, `[asy]`) or shorter than 3
   characters joins the next part (the last part joins the one before).
5. Long parts: a part over `MAX_PART_LENGTH` characters is cut in two as evenly as possible at
   the first kind of point that leaves both halves long enough. In the text (math masked again
   within the part, evenness in masked characters): after a comma, " and", a colon or " to",
   both halves at least 40 characters. Else anywhere after ",$", ",\\)", ",\\]", "=",
   "\\equiv", "+" or "\\cancelto", both halves at least 20 characters. The first half is cut
   again, then the second, while they are long. Once a piece has been cut in math, the text
   rule is skipped for a later piece whose start (counted from the start of the part) lies
   between the smallest math cut and the largest length of a piece cut in math, both counted
   from the start of the piece that was cut: the official code compares offsets of different
   origins, and the same is done here so that the boundaries stay the official ones.

Where the official code fails, this one does not: a response that is one part under 20
characters is one step (the official splitter drops its first boundary and stops), an empty
response is one empty step, and a `####` line is plain text (two of them are no error).
"""

from __future__ import annotations

import bisect
import re

MAX_PART_LENGTH = 100
_SPAN_WIDTH = 60  # masked length of a math span (the official placeholders' length)
# What a masked span looks like to the text rules: no whitespace, full stop, comma, colon,
# capital or math delimiter, and "<", ">" at its edges as the official placeholders have.
_TOKEN = "<|" + "_" * (_SPAN_WIDTH - 4) + "|>"

_INF = float("inf")


def _pairs(opener: str, closer: str):
    """The shortest matches of opener...closer, left to right (what a lazy regex finds). If
    an opener has no closer after it, no later one has: the search ends there, in linear time."""

    def find(s: str) -> list[tuple[int, int]]:
        out, pos = [], 0
        while (p := s.find(opener, pos)) != -1:
            q = s.find(closer, p + len(opener))
            if q == -1:
                break
            pos = q + len(closer)
            out.append((p, pos))
        return out

    return find


_DOLLAR_CLOSER = re.compile(r"(?<=[^\\])\$(?!\$)")


def _dollars(s: str) -> list[tuple[int, int]]:
    """`$..$`: an unescaped `$`, at least one character, then a `$` that is neither escaped
    nor followed by another `$` (the first such one)."""
    closers = [m.start() for m in _DOLLAR_CLOSER.finditer(s)]
    out, pos = [], 0
    while (p := s.find("$", pos)) != -1:
        if p > 0 and s[p - 1] == "\\":
            pos = p + 1
            continue
        k = bisect.bisect_left(closers, p + 2)
        if k == len(closers):
            break
        pos = closers[k] + 1
        out.append((p, pos))
    return out


def _environments(s: str) -> list[tuple[int, int]]:
    """`\\begin{env}..\\end{env}` (the first `\\end` of the same name; not nested)."""
    out, pos, no_end_after = [], 0, {}
    while (p := s.find("\\begin{", pos)) != -1:
        close = s.find("}", p + 7)
        if close == -1:
            break
        name, start = s[p + 7:close], close + 1
        q = -1 if no_end_after.get(name, _INF) <= start else s.find("\\end{" + name + "}", start)
        if q == -1:
            no_end_after[name] = min(no_end_after.get(name, _INF), start)
            pos = p + 1
            continue
        pos = q + len(name) + 6
        out.append((p, pos))
    return out


# Rule 1's searches, in order.
_MATH = (
    _pairs("[asy]", "[/asy]"),
    _pairs("$\\begin{tabular}", "\\end{tabular}$"),
    _pairs("\\begin{tabular}", "\\end{tabular}"),
    _pairs("\\(", "\\)"),
    _pairs("\\[", "\\]"),
    _pairs("$$", "$$"),
    _dollars,
    _environments,
)
_SENTENCE = re.compile(
    r"(?<!\b[A-Za-z]\.)(?<!\s[A-Za-z]\.)(?<!\s[A-Za-z][A-Za-z]\.)(?<=\.)(?=\s+[A-Z])"
)
_NEWLINE = re.compile("\n")
_MATH_SENTENCE_ENDS = (".$", ".$$", ".\\)", ".\\]")
_OPENING = re.compile(r"\$|\$\$|\\\(|\\\[|\\begin\{[^}]*\}|\[asy\]")
# (pattern, characters of a match before the cut)
_TEXT_POINTS = ((re.compile(","), 1), (re.compile(r"\sand\s"), 4), (re.compile(":"), 1),
                (re.compile(r"\sto\s"), 3))
_MATH_POINTS = ((re.compile(r",\$"), 2), (re.compile(r",\\\)"), 3), (re.compile(r",\\\]"), 3),
                (re.compile("="), 1), (re.compile(r"\\equiv"), 6), (re.compile(r"\+"), 1),
                (re.compile(r"\\cancelto"), 9))
_MIN_TEXT_HALF = 40
_MIN_MATH_HALF = 20


class _Masked:
    """`text` with its math spans (rule 1) replaced by fixed-width tokens, and the offset map."""

    def __init__(self, text: str):
        self.text = text
        self.spans: list[tuple[int, int]] = []
        for search in _MATH:
            self._build()
            found = [(self.orig(a), self.orig(b)) for a, b in search(self.masked)]
            if found:  # a new span may enclose earlier ones; only the outermost is kept
                starts = [a for a, _ in found]
                kept = [(a, b) for a, b in self.spans
                        if (k := bisect.bisect_right(starts, a) - 1) < 0 or found[k][1] < b]
                self.spans = sorted(kept + found)
        self._build()

    def _build(self) -> None:
        out, pos, self.starts, self.shift = [], 0, [], [0]
        for a, b in self.spans:
            self.starts.append(a - self.shift[-1])
            self.shift.append(self.shift[-1] + (b - a) - _SPAN_WIDTH)
            out += [self.text[pos:a], _TOKEN]
            pos = b
        out.append(self.text[pos:])
        self.masked = "".join(out)

    def orig(self, m: int) -> int:
        """The original offset of masked offset `m` (at a span's edge or outside spans)."""
        k = bisect.bisect_right(self.starts, m - _SPAN_WIDTH)  # spans ending at or before m
        return m + self.shift[k]

    def spans_in(self, a: int, b: int) -> list[tuple[int, int]]:
        """The spans inside original offsets [a, b)."""
        i = bisect.bisect_left(self.spans, (a, -1))
        out = []
        while i < len(self.spans) and self.spans[i][1] <= b:
            out.append(self.spans[i])
            i += 1
        return out


def _join_short(bounds: list[int], short) -> list[int]:
    """Rules 3 and 4's merge: a part for which `short(a, b)` holds joins the next part, the last
    part the one before (a single part stays)."""
    i = 0
    while i < len(bounds) - 1:
        if short(bounds[i], bounds[i + 1]) and len(bounds) > 2:
            bounds.pop(i if i == len(bounds) - 2 else i + 1)
        else:
            i += 1
    return bounds


def _sentences_and_lines(mt: _Masked) -> list[int]:
    """Rule 2, in masked offsets."""
    m = mt.masked
    cuts = sorted([x.start() for x in _SENTENCE.finditer(m)]
                  + [x.start() for x in _NEWLINE.finditer(m)])
    bounds = [0] + cuts + [len(m)]
    i = 0
    while i < len(bounds) - 2:
        a, b = bounds[i], bounds[i + 1]
        if b - a < 20 and not m.endswith(".", a, b):
            bounds.pop(i + 1)
        else:
            i += 1
    return bounds


def _math_sentence_ends(mt: _Masked, masked_bounds: list[int]) -> list[int]:
    """Rule 3, masked offsets in, original offsets out."""
    text = mt.text
    bounds = [0]
    for a, b in zip(masked_bounds, masked_bounds[1:]):
        oa, ob = mt.orig(a), mt.orig(b)
        for s, e in mt.spans_in(oa, ob):
            if text.endswith(_MATH_SENTENCE_ENDS, s, e):
                bounds.append(e)
        bounds.append(ob)

    def short(a, b):
        return b - a < 20 and not text.endswith(_MATH_SENTENCE_ENDS, a, b)

    return _join_short(bounds, short)


def _lines_in_math(mt: _Masked, bounds: list[int]) -> list[int]:
    """Rule 4."""
    text = mt.text
    out = [0]
    for a, b in zip(bounds, bounds[1:]):
        seen = set()
        for s, e in mt.spans_in(a, b):
            if text[s:e] in seen:
                continue
            seen.add(text[s:e])
            out += [m.start() for m in _NEWLINE.finditer(text, s, e)]
        out.append(b)

    def short(a, b):
        return b - a < 3 or _OPENING.fullmatch(text[a:b].strip()) is not None

    return _join_short(out, short)


def _halve(n: int, positions) -> int | None:
    """The position nearest the middle of n (the first of equals)."""
    best = None
    for p in positions:
        if best is None or abs(2 * p - n) < abs(2 * best - n):
            best = p
    return best


def _text_cut(part: str) -> int | None:
    """Rule 5 in the text: a cut offset in `part`, or None."""
    mt = _Masked(part)
    for pattern, keep in _TEXT_POINTS:
        p = _halve(len(mt.masked), (x.start() + keep for x in pattern.finditer(mt.masked)))
        if p is None:
            continue
        cut = mt.orig(p)
        if min(cut, len(part) - cut) >= _MIN_TEXT_HALF:
            return cut
    return None


def _math_cut(part: str) -> int | None:
    """Rule 5 in math: a cut offset in `part`, or None."""
    for pattern, keep in _MATH_POINTS:
        p = _halve(len(part), (x.start() + keep for x in pattern.finditer(part)))
        if p is not None and min(p, len(part) - p) >= _MIN_MATH_HALF:
            return p
    return None


def _break_long(part: str) -> list[int]:
    """Rule 5 for one part: its boundaries, from 0 to len(part)."""
    bounds = [0, len(part)]
    lo, hi = None, 0  # where the text rule is skipped (see the module docstring)
    i = 0
    while i < len(bounds) - 1:
        a, b = bounds[i], bounds[i + 1]
        if b - a > MAX_PART_LENGTH:
            piece = part[a:b]
            if lo is None or not lo <= a < hi:
                cut = _text_cut(piece)
                if cut is not None:
                    bounds.insert(i + 1, a + cut)
                    continue
            cut = _math_cut(piece)
            if cut is not None:
                lo, hi = (cut if lo is None else min(lo, cut)), max(hi, len(piece))
                bounds.insert(i + 1, a + cut)
                continue
        i += 1
    return bounds


def paper_math_boundaries(response: str) -> list[int]:
    """Start offsets of the steps and the end, [0, ..., len(response)] (the official splitter's
    return value); [0, 0] for an empty response."""
    mt = _Masked(response)
    bounds = _math_sentence_ends(mt, _sentences_and_lines(mt))
    bounds = _lines_in_math(mt, bounds)
    out = [0]
    for a, b in zip(bounds, bounds[1:]):
        if b - a > MAX_PART_LENGTH:
            out += [a + c for c in _break_long(response[a:b])[1:]]
        else:
            out.append(b)
    return out


def split_paper_math_steps(response: str) -> list[str]:
    """MATH steps as the paper's official in-place splitter cuts them (see the module
    docstring); "".join(steps) == response, no empty step (an empty response is one)."""
    if not response:
        return [response]
    bounds = sorted(set(paper_math_boundaries(response)))
    return [response[a:b] for a, b in zip(bounds, bounds[1:])]
