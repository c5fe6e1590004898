"""Requests and their state: sampling parameters, sequences, completions and seed derivation."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to sample one request. temperature 0 = greedy; top_k 0 and top_p 1.0 = no filtering.

    `seed` makes the request reproducible: sample i of the request draws from
    `derive_seed(seed, i)` and its t-th token's random number is a pure function of that seed and t,
    so the tokens do not depend on the batch, on preemption or on forking.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    n: int = 1

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop must be a list of non-empty strings")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


@dataclass
class Completion:
    """One generated sequence. For a branch, `token_ids` holds only the continuation.

    `text` is the decoded `token_ids` (special tokens skipped); when a stop string ends the
    sequence, the tokens end with the token that completes the stop string and the text is cut
    right after the stop string.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    handle: int | None = None


@dataclass
class BranchRequest:
    """Continue kept sequence `handle` from each of `offsets` (number of response tokens kept)."""

    handle: int
    offsets: list[int]


def derive_seed(*values: int) -> int:
    """63-bit seed derived from integers (the kernels' splitmix-based derivation)."""
    from vinekernels.sampling import derive_seed as _derive

    return int(_derive(*(int(v) for v in values)))


def sample_seed(request_seed: int, index: int) -> int:
    """Seed of sample `index` of a request whose `SamplingParams.seed` is `request_seed`."""
    return derive_seed(request_seed, index)


def branch_seed(params_seed: int, trajectory_seed: int, offset: int) -> int:
    """Request seed of the continuations of a kept sequence at `offset`.

    `trajectory_seed` is the kept sequence's own sample seed. Continuation j draws from
    `sample_seed(branch_seed(...), j)`, which is exactly what sample j of a fresh request with
    `SamplingParams(seed=branch_seed(...), n=k)` draws from: a branch equals a fresh generation
    from the re-prefilled prefix with that seed, and different states get independent streams.
    """
    return derive_seed(params_seed, trajectory_seed, offset)


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


_seq_ids = itertools.count()


class Sequence:
    """One stream of tokens being generated: its tokens, its pages and its progress.

    `token_ids` = prompt + generated tokens. `num_computed` tokens have their K/V in the cache; the
    next forward feeds tokens `[num_computed, len(token_ids))` (or a chunk of them). The last
    sampled token is never in the cache until it is fed, so a decode step feeds exactly one token.
    """

    __slots__ = (
        "seq_id", "token_ids", "prompt_len", "num_computed", "block_table", "params", "seed",
        "max_new", "stop_ids", "logprobs", "status", "finish_reason", "fork_source", "fork_len",
        "keep", "handle", "stop_text_len", "num_pending_children", "owner",
    )

    def __init__(self, prompt: list[int], params: SamplingParams, seed: int, max_new: int,
                 stop_ids: frozenset[int], keep: bool = False, owner: Sequence | None = None):
        self.seq_id = next(_seq_ids)
        self.token_ids = list(prompt)
        self.prompt_len = len(prompt)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.params = params
        self.seed = seed
        self.max_new = max_new
        self.stop_ids = stop_ids
        self.logprobs: list[float] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        # The sequence whose pages hold this one's first `fork_len` tokens, when forking pays.
        self.fork_source: Sequence | None = None
        self.fork_len = 0
        self.keep = keep
        self.handle: int | None = None
        self.stop_text_len: int | None = None
        # Queued continuations that want to fork this (kept) sequence's pages.
        self.num_pending_children = 0
        # The kept sequence a continuation was branched from.
        self.owner = owner

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self)}, computed={self.num_computed}, "
                f"pages={len(self.block_table)}, {self.status.name})")
