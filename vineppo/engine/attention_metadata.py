"""Per-step attention metadata: where new K/V go and which cached pages each query reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vinekernels import TreePlan


@dataclass
class AttentionMetadata:
    """Everything attention needs for one forward step of a mixed prefill/decode batch.

    The batch holds ``T`` new tokens: first the prefill (or extend) tokens of ``num_prefill_seqs``
    sequences, concatenated, then one decode token per decoding sequence.
    """

    slot_mapping: torch.Tensor  # int64 [T]: page * page_size + offset of each new token's K/V; -1 = skip
    # prefill/extend part (may be empty): the first `num_prefill_tokens` tokens of the batch
    num_prefill_seqs: int
    num_prefill_tokens: int
    prefill_query_start_loc: torch.Tensor | None  # int32 [Bp+1]
    prefill_seq_lens: torch.Tensor | None  # int32 [Bp]: cached context + new tokens
    prefill_block_tables: torch.Tensor | None  # int32 [Bp, max_pages]
    # decode part: the remaining tokens, one per sequence
    decode_seq_lens: torch.Tensor | None  # int32 [Bd]: including the token being decoded
    decode_block_tables: torch.Tensor | None  # int32 [Bd, max_pages]
    decode_tree_plan: TreePlan | None  # when set, decode uses tree_decode_attention
    logits_indices: torch.Tensor  # int64 [num_seqs_sampled]: batch rows whose logits are wanted

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def num_decode_tokens(self) -> int:
        return self.num_tokens - self.num_prefill_tokens

    @property
    def is_decode_only(self) -> bool:
        return self.num_prefill_tokens == 0 and self.num_decode_tokens > 0
