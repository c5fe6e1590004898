"""Scoring sampled responses with a model: padded batches, token logprobs and critic values.

One layout everywhere: prompts left-padded to P tokens and responses right-padded, so response
token j of every row sits at column P + j and its logit at column P + j - 1. Positions skip the
left padding (`position_ids_from_mask`), so a row sees the positions the engine used.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from vinekernels.sampling import kept_log_mass


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row sees the positions the engine used."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class Packed:
    """Prompt + response token ids of some episodes in the layout above (response j at column
    ``response_start + j``)."""

    input_ids: torch.Tensor       # [B, P + L]
    attention_mask: torch.Tensor  # [B, P + L]
    response_start: int           # P

    @property
    def response_mask(self) -> torch.Tensor:
        """[B, L] float: 1 on response tokens."""
        return self.attention_mask[:, self.response_start:].to(torch.float32)

    def to(self, device) -> "Packed":
        return Packed(self.input_ids.to(device), self.attention_mask.to(device), self.response_start)

    def rows(self, s: slice) -> "Packed":
        return Packed(self.input_ids[s], self.attention_mask[s], self.response_start)


def pack(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int,
         extra_columns: int = 0) -> Packed:
    """Prompts left-padded to P tokens and responses right-padded to the longest (at least one
    column), plus `extra_columns` padding columns at the end."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"pack needs one response per prompt, got {len(prompts)} and {len(responses)}")
    P = max(len(p) for p in prompts)
    L = max(max(len(r) for r in responses), 1) + extra_columns
    input_ids = torch.full((len(prompts), P + L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), P + L), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p):P + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[i, P - len(p):P + len(r)] = 1
    return Packed(input_ids, attention_mask, P)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Mixed precision in `dtype` on `device`; plain float32 for None or float32."""
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def response_logits(model: nn.Module, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """Logits [B, L, V] predicting response tokens 0..L-1 (columns response_start ..) of each row."""
    L = input_ids.shape[1] - response_start
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                use_cache=False, logits_to_keep=L + 1)
    return out.logits[:, :-1]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target], in float32."""
    logits = logits.float() / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sampler_log_mass(logits: torch.Tensor, temperature: float, top_p: float, rows: int = 256) -> torch.Tensor:
    """[B, L]: log of the softmax(logits / temperature) mass the engine's top-p filter keeps at each
    position, in chunks of `rows` positions (the filter ranks a vocabulary-wide row per position)."""
    if top_p >= 1:
        return torch.zeros(logits.shape[:-1], dtype=torch.float32, device=logits.device)
    flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    temp = torch.full((n,), float(temperature), device=flat.device)
    p = torch.full((n,), float(top_p), device=flat.device)
    k = torch.zeros(n, dtype=torch.int32, device=flat.device)
    parts = [kept_log_mass(flat[i:i + rows], temp[i:i + rows], k[i:i + rows], p[i:i + rows])
             for i in range(0, n, rows)]
    return torch.cat(parts).reshape(logits.shape[:-1])


def response_values(value_model: nn.Module, input_ids, attention_mask, response_start: int) -> torch.Tensor:
    """V(s_t) [B, L]: the critic's output at the last token of prompt + response[:t]."""
    values = value_model(input_ids, attention_mask, position_ids_from_mask(attention_mask))
    return values[:, response_start - 1:-1].float()


@torch.no_grad()
def batched_forward(fn, n: int, micro_batch_size: int) -> torch.Tensor:
    """torch.cat of fn(slice) over micro-batches of [0, n), right-padding the last dim with 0."""
    parts = [fn(slice(i, min(n, i + micro_batch_size))) for i in range(0, n, micro_batch_size)]
    width = max(p.shape[-1] for p in parts)
    return torch.cat([nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts])


def sampled_logprobs(model: nn.Module, packed: Packed, temperature: float, top_p: float, micro_batch_size: int,
                     autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] logprobs of the response tokens at `temperature`, [B, L] log of the mass the
    engine's top-p filter keeps at each position), 0 on padding; no gradient."""
    def fn(s):
        rows = packed.rows(s)
        with autocast(rows.input_ids.device, autocast_dtype):
            logits = response_logits(model, rows.input_ids, rows.attention_mask, rows.response_start)
        lp = token_logprobs(logits, rows.input_ids[:, rows.response_start:], temperature)
        return torch.stack([lp, sampler_log_mass(logits, temperature, top_p)], 1)
    out = batched_forward(fn, packed.input_ids.shape[0], micro_batch_size) * packed.response_mask[:, None]
    return out[:, 0], out[:, 1]


def logprobs(model: nn.Module, packed: Packed, temperature: float, micro_batch_size: int,
             autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, L] logprobs of the response tokens at `temperature`, 0 on padding; no gradient."""
    return sampled_logprobs(model, packed, temperature, 1.0, micro_batch_size, autocast_dtype)[0]


def values(value_model: nn.Module, packed: Packed, micro_batch_size: int,
           autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, L]: the critic's V(s_t) before every response token t (`response_values`); columns past
    a row's response are not masked (a state after the last token reads column len(response));
    no gradient."""
    def fn(s):
        rows = packed.rows(s)
        with autocast(rows.input_ids.device, autocast_dtype):
            return response_values(value_model, rows.input_ids, rows.attention_mask, rows.response_start)
    return batched_forward(fn, packed.input_ids.shape[0], micro_batch_size)

