"""Map step boundaries (character offsets in a response) to token offsets in its token ids.

The response text is always the decoding of the response's own token ids (`decode_response`);
text is never re-tokenised, because re-tokenising a sampled response can give different tokens.
"""

from __future__ import annotations

import bisect

_DECODE_KW = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
# Tokens of context decoded before each token when computing its text: enough for SentencePiece's
# leading-space rule and for the bytes of any UTF-8 character that several byte tokens spell.
_WINDOW = 6


def decode_response(tokenizer, token_ids: list[int]) -> str:
    """The response text that steps are cut from: special tokens skipped, no space clean-up."""
    return tokenizer.decode(list(token_ids), **_DECODE_KW)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first mismatch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def token_char_starts(tokenizer, token_ids: list[int], text: str | None = None) -> list[int]:
    """Character offset in `text` (default: `decode_response`) where each token's text starts.

    Incremental decoding: token i's text is decode(ids[s:i+1]) minus decode(ids[s:i]) over a
    window of earlier tokens, deferred while the decoded text ends in an incomplete UTF-8
    character (U+FFFD); a token that continues an incomplete character starts where that
    character starts. If the pieces do not reproduce `text` (a tokenizer whose decode is not
    local), it falls back to exact prefix decoding: start_i = length of the common prefix of
    decode(ids[:i]) and `text` (the fast path gives the same offsets). Offsets are non-decreasing; a token with no text (a special
    token) starts where the next text starts.
    """
    ids = list(token_ids)
    if text is None:
        text = decode_response(tokenizer, ids)
    starts: list[int] = []
    pieces: list[str] | None = []
    pos = 0
    read_offset = 0  # tokens before this one have had their text emitted
    pending = ""  # text decoded so far for tokens not yet emitted (ends in an incomplete char)
    for i in range(len(ids)):
        known = _common_prefix_len(pending, text[pos : pos + len(pending)]) if pending else 0
        starts.append(pos + known)
        prefix_offset = max(0, read_offset - _WINDOW)
        prefix_text = tokenizer.decode(ids[prefix_offset:read_offset], **_DECODE_KW)
        new_text = tokenizer.decode(ids[prefix_offset : i + 1], **_DECODE_KW)
        if new_text.endswith("\ufffd") and i + 1 < len(ids):
            # Incomplete character: the token that completes it emits the text. (A byte-fallback
            # decoder may garble the whole byte run meanwhile, so no prefix check here.)
            ok = new_text.startswith(prefix_text)
            pending = new_text[len(prefix_text):] if ok else ""
            continue
        if not new_text.startswith(prefix_text):
            pieces = None
            break
        delta = new_text[len(prefix_text):]
        pieces.append(delta)
        pos += len(delta)
        read_offset = i + 1
        pending = ""
    if pieces is not None and "".join(pieces) == text:
        return starts
    return _prefix_starts(tokenizer, ids, text)


def _prefix_starts(tokenizer, ids: list[int], text: str) -> list[int]:
    starts, best = [], 0
    for i in range(len(ids)):
        best = max(best, _common_prefix_len(tokenizer.decode(ids[:i], **_DECODE_KW), text))
        starts.append(best)
    return starts


def step_token_offsets(tokenizer, token_ids: list[int], steps: list[str]) -> list[int]:
    """Token offset where each step starts; the first is 0.

    `steps` must join to the decoded response (`decode_response(tokenizer, token_ids)`). A token
    belongs to the step in which its text starts (`token_char_starts`), so a token straddling a
    boundary (e.g. "\\n\\n" across a blank line) belongs to the earlier step; a token with no text
    (a special token) starts where the next text starts, so a trailing EOS is in the last step.
    Offsets are non-decreasing; a step that lies entirely inside one token of the previous step
    starts at the same offset as the step after it (no tokens of its own). Every token
    belongs to exactly one step: step j owns tokens [offsets[j], offsets[j+1]).
    """
    if not steps:
        raise ValueError("steps must not be empty")
    ids = list(token_ids)
    text = decode_response(tokenizer, ids)
    joined = "".join(steps)
    if joined != text:
        raise ValueError(
            "steps do not join to the decoded response "
            f"({len(joined)} vs {len(text)} chars; first difference at char "
            f"{_common_prefix_len(joined, text)}); split decode_response(tokenizer, token_ids)"
        )
    starts = token_char_starts(tokenizer, ids, text)
    offsets, c = [], 0
    for j, step in enumerate(steps):
        offsets.append(0 if j == 0 else bisect.bisect_left(starts, c))
        c += len(step)
    return offsets


def cap_offsets(offsets: list[int], max_steps: int) -> list[int]:
    """Drop duplicate offsets (steps without tokens), then keep at most `max_steps` evenly spaced
    boundaries (always offset 0), as `steps.merge_steps` does for text."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    uniq = sorted(set(offsets) | {0})
    n = len(uniq)
    if n <= max_steps:
        return uniq
    return [uniq[k * n // max_steps] for k in range(max_steps)]

