"""CUDA graphs for decode-only steps of the model runner.

A decode step of B sequences is padded up to the next captured batch size (1, 2, 4, ..., up to
``max_batch_size``) and its block table up to the next captured width (powers of two pages, so the
decode kernel's split grid, which follows the table width, stays close to the real context), and
replayed from the graph captured for that (batch size, width) on static input buffers. Padding rows write
nothing (slot -1) and attend to one token of page 0, so they cost a little compute and change no
state; their logits are dropped. Graphs capture lazily, one per bucket pair, on first use, all sharing
one memory pool (safe because replays never overlap and a replay's only live output is the shared
static logits buffer, read before the next replay).

Not captured (the runner runs them eagerly): steps with prefill tokens, steps with a tree-decode
plan (its segment layout changes from step to step), batches larger than ``max_batch_size``, and
block tables wider than ``ceil(max_model_len / page_size)`` pages.

The graphs read the weights and KV caches at the addresses they had at capture: in-place weight
updates (``update_weights`` with a state dict) keep them valid; re-pointing the runner at another
module discards them (the runner drops this object).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from vineppo.engine.attention_metadata import AttentionMetadata

# The eager forward a graph captures: (input_ids, positions, meta) -> float32 logits.
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size, plus max_batch_size itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if (1 << i) <= max_batch_size]
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def width_buckets(max_pages: int, page_size: int, min_tokens: int = 256) -> list[int]:
    """Block-table widths (pages) to capture: powers of two from one covering ``min_tokens``
    tokens, plus max_pages itself."""
    smallest = min(max_pages, max(1, -(-min_tokens // page_size)))
    widths = []
    width = 1 << (smallest - 1).bit_length()
    while width < max_pages:
        widths.append(width)
        width *= 2
    return widths + [max_pages]


def _first_at_least(buckets: list[int], n: int) -> int | None:
    return next((b for b in buckets if b >= n), None)


class DecodeCudaGraphs:
    """Captures and replays a decode-only forward, one graph per padded batch size and width.

    `forward` is the eager forward to capture (the model runner's ``forward_eager``); `device`,
    `vocab_size`, `max_model_len` and `page_size` are those of the model and KV cache it runs on.
    """

    def __init__(self, forward: Forward, *, device: torch.device, vocab_size: int, max_model_len: int,
                 page_size: int, max_batch_size: int = 256, num_warmup: int = 2, capture: bool = True):
        # capture=False runs the same static, padded batches eagerly instead of replaying graphs
        # (any device): it checks the staging and padding logic where no GPU is available.
        device = torch.device(device)
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.capture = capture
        self.forward = forward
        self.device = device
        self.buckets = batch_size_buckets(max_batch_size)
        self.max_batch_size = self.buckets[-1]
        self.max_pages_per_seq = math.ceil(max_model_len / page_size)
        self.widths = width_buckets(self.max_pages_per_seq, page_size)
        self.num_warmup = num_warmup
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_pages_per_seq, dtype=torch.int32, device=device)
        self.rows = torch.arange(n, dtype=torch.int64, device=device)
        self.logits = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}  # (batch size, width) -> graph
        self.pool = None

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (meta.is_decode_only and meta.decode_tree_plan is None
                and meta.num_decode_tokens <= self.max_batch_size
                and meta.decode_block_tables is not None
                and meta.decode_block_tables.shape[1] <= self.max_pages_per_seq)

    def _static_meta(self, size: int, width: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], num_prefill_seqs=0, num_prefill_tokens=0,
            prefill_query_start_loc=None, prefill_seq_lens=None, prefill_block_tables=None,
            decode_seq_lens=self.seq_lens[:size], decode_block_tables=self.block_tables[:size, :width],
            decode_tree_plan=None, logits_indices=self.rows[:size])

    def _reset_padding(self, start: int, end: int) -> None:
        # Padding rows: write no K/V (slot -1) and attend to one token of page 0 (always allocated).
        self.input_ids[start:end] = 0
        self.positions[start:end] = 0
        self.slot_mapping[start:end] = -1
        self.seq_lens[start:end] = 1
        self.block_tables[start:end, 0] = 0

    def _capture(self, size: int, width: int) -> None:
        meta = self._static_meta(size, width)
        self._reset_padding(0, size)
        if not self.capture:
            self.graphs[(size, width)] = None
            return
        ids, pos = self.input_ids[:size], self.positions[:size]
        # Warm up on a side stream so lazy initialisation (Triton autotuning, cuBLAS handles) is
        # not recorded into the graph.
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.num_warmup):
                self.logits[:size].copy_(self.forward(ids, pos, meta))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[:size].copy_(self.forward(ids, pos, meta))
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[(size, width)] = graph

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits [len(meta.logits_indices), vocab] of a decode-only step (see ``can_run``)."""
        batch = meta.num_decode_tokens
        width = meta.decode_block_tables.shape[1]
        key = (_first_at_least(self.buckets, batch), _first_at_least(self.widths, width))
        if key not in self.graphs:
            self._capture(*key)
        size = key[0]
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:batch].copy_(meta.decode_seq_lens, non_blocking=True)
        self.block_tables[:batch, :width].copy_(meta.decode_block_tables, non_blocking=True)
        if size > batch:
            self._reset_padding(batch, size)
        if self.capture:
            self.graphs[key].replay()
        else:
            meta_static = self._static_meta(*key)
            self.logits[:size].copy_(self.forward(self.input_ids[:size], self.positions[:size], meta_static))
        return self.logits[meta.logits_indices]
