"""From logits to next tokens, and when a sequence stops.

Sampling itself is `vinekernels.sample_tokens`: per-row temperature / top-k / top-p with a
random draw that is a pure function of (sequence seed, number of tokens it has sampled), so a
sequence's tokens do not depend on its batch, on preemption or on forking.
"""
from __future__ import annotations

import torch

from vineppo.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[float]]:
    """Next token and its processed logprob for each of `seqs` (one logits row each)."""
    from vinekernels.sampling import sample_tokens

    device = logits.device
    params = [s.params for s in seqs]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int32)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    seeds = torch.tensor([s.seed for s in seqs], dtype=torch.int64)
    offsets = torch.tensor([s.num_output for s in seqs], dtype=torch.int64)
    if device.type != "cpu":
        temperature, top_k, top_p, seeds, offsets = (
            t.to(device, non_blocking=True) for t in (temperature, top_k, top_p, seeds, offsets))
    tokens, logprobs = sample_tokens(logits, temperature, top_k, top_p, seeds, offsets)
    return tokens.tolist(), logprobs.tolist()


class StopChecker:
    """Decides after each sampled token whether a sequence is done, and why."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def check(self, seq: Sequence) -> str | None:
        """"stop" (stop id or stop string), "length", or None to go on. Call after appending."""
        token = seq.token_ids[-1]
        if token in seq.stop_ids:
            return "stop"
        if seq.params.stop and self._hits_stop_string(seq):
            return "stop"
        if seq.num_output >= seq.max_new:
            return "length"
        return None

    def _hits_stop_string(self, seq: Sequence) -> bool:
        # The newest token can only complete a stop string that ends inside it, so decoding a
        # window of recent tokens a little longer than the longest stop string is enough.
        longest = max(len(s) for s in seq.params.stop)
        window = seq.token_ids[max(seq.prompt_len, len(seq) - longest - 4):]
        tail = self.tokenizer.decode(window, skip_special_tokens=True)
        if not any(s in tail for s in seq.params.stop):
            return False
        text = self.decode(seq.output_ids)
        ends = [text.find(s) + len(s) for s in seq.params.stop if s in text]
        seq.stop_text_len = min(ends) if ends else None
        return True

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def text(self, seq: Sequence) -> str | None:
        if self.tokenizer is None:
            return None
        text = self.decode(seq.output_ids)
        if seq.stop_text_len is not None:
            text = text[: seq.stop_text_len]
        return text
