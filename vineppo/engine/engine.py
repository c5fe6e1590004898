"""The rollout engine: generate, keep sequences alive, branch from any token offset, release.

Seeds. A request with `SamplingParams.seed = s` samples its i-th sequence from
`sample_seed(s, i)`; a continuation j of kept sequence h at offset t samples from
`sample_seed(branch_seed(params.seed, seed of h, t), j)`, counting its token offsets from the
continuation start. So `branch([BranchRequest(h, [t])], k, params)` returns exactly what
`generate([prompt + response[:t]], SamplingParams(seed=branch_seed(...), n=k, max_tokens=
params.max_tokens - t, ...))` returns. With `seed=None` a random request seed is drawn.

Forking. To sample the first token after a kept prefix of L = prompt_len + t tokens the engine
needs the logits at position L - 1. It forks the kept pages at L - 1 tokens (full pages shared,
the partial tail page copied) and feeds token L - 1 as a one-token extend over them: exact, one
token of compute per continuation, and the kept sequence's own last token never needs K/V.
The same mechanism gives the n samples of one prompt a single prefill.

Kept sequences. `generate(..., keep_alive=True)` returns completions with a `handle`; their
pages stay resident for `branch` until `release`. Under page pressure the scheduler may evict a
kept sequence's pages (least recently used first); a later branch from it then re-prefills its
prefix once and forks the siblings from that, so results never change. `update_weights`
releases every kept sequence: their KV belongs to the old weights, and their handles become
invalid.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from vinekernels import copy_pages, grow_tree_plan, plan_tree_decode, tree_plan_tails
from vineppo.engine.block_manager import BlockManager
from vineppo.engine.dtypes import resolve_dtype
from vineppo.engine.sampling import StopChecker, sample
from vineppo.engine.scheduler import ScheduledBatch, Scheduler
from vineppo.engine.sequence import (BranchRequest, Completion, SamplingParams, Sequence,
                                     branch_seed, sample_seed)
from vineppo.engine.tree_plan import build_tree_segments
from vineppo.settings import check_settings, setting


@dataclass
class EngineConfig:
    """The engine's settings; the `engine` section of the CLI (``--engine.page_size`` ...). The
    dtype and device of the KV cache and compute are arguments of `Engine` itself."""

    page_size: int = setting(16, "tokens per KV page", check=">= 1")
    num_pages: int = setting(0, "KV pages per engine (0 = from memory_fraction)", check=">= 0")
    memory_fraction: float = setting(0.5, "fraction of free device memory for the KV cache", check="(0, 1]")
    max_num_seqs: int = setting(256, "max sequences per engine step", check=">= 1")
    max_num_batched_tokens: int = setting(2048, "max tokens per engine step (chunked prefill)", check=">= 1")
    tree_decode: str = setting("auto", "prefix-shared decode: auto | always | never",
                               choices=("auto", "always", "never"))
    use_cuda_graphs: bool = setting(True, "capture decode steps in CUDA graphs (GPU)")
    max_model_len: int | None = setting(None, "context length (none = the model's max_position_embeddings)",
                                        check=">= 1")
    eos_token_id: list[int] | None = setting(None, "end-of-sequence token ids (none = the generation config's, "
                                             "the model config's, or the tokenizer's)", check=">= 0")
    # "auto" shares a full-page prefix run in decode only when at least `tree_min_queries`
    # queries read it and it is at least `tree_min_tokens` tokens long; everything else of a query
    # is read like plain paged decode. None = the device default (CPU_TREE_THRESHOLDS or
    # GPU_TREE_THRESHOLDS below). "always" shares every full page read by >= 2 queries.
    tree_min_queries: int | None = setting(None, "tree_decode=auto: fewest queries that share a prefix run "
                                           "(none = the device default)", check=">= 1")
    tree_min_tokens: int | None = setting(None, "tree_decode=auto: fewest tokens of a shared prefix run "
                                          "(none = the device default)", check=">= 0")

    def validate(self) -> None:
        check_settings(self)


# Default (tree_min_queries, tree_min_tokens) of tree_decode="auto".
# GPU: the prefix-shared kernel pays from one 64-token KV tile read by a handful of queries.
GPU_TREE_THRESHOLDS = (4, 64)
# CPU (torch reference, vinekernels.reference.tree_decode_ref): a shared run adds a few tensor
# ops per layer (its share of a batched group, and the merge) and saves gathering its pages once
# per query, so any full page read by two or more queries qualifies. Measured with
# bench/branching.py (tiny model, 1 thread): with 128-token prompts tree decode is 1.2-1.4x
# faster than plain paged decode; with the 32-token CPU default, where every shared run is a
# single page, the two are within noise. Planning is nearly free: consecutive decode steps reuse
# and grow the previous step's plan (see Engine._tree_plan).
CPU_TREE_THRESHOLDS = (2, 16)


class Engine:
    """The rollout engine over `model` (a transformers causal LM, or a name or path to load).

    `dtype` (a torch.dtype or a name, None = the model's) and `device` (None = the model's) are
    those of the KV cache and the forward; the weights are converted once when they differ."""

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, *, dtype=None, device=None):
        from vineppo.engine.model_runner import ModelRunner

        self.config = config = config or EngineConfig()
        config.validate()
        dtype = resolve_dtype(dtype)
        if isinstance(model, str):
            model, tokenizer = _load(model, tokenizer, dtype, device)
        self.model = model
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, num_pages=config.num_pages or None, page_size=config.page_size,
                                  memory_fraction=config.memory_fraction, dtype=dtype,
                                  device=device, use_cuda_graphs=config.use_cuda_graphs)
        self.page_size = self.runner.page_size
        self.max_model_len = self.runner.max_model_len
        if config.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, config.max_model_len)
        self.eos_token_ids = _eos_token_ids(model, tokenizer, config.eos_token_id)
        self.block_manager = BlockManager(self.runner.num_pages, self.page_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens)
        self.stopper = StopChecker(tokenizer)
        self._kept: dict[int, Sequence] = {}
        self._next_handle = 0
        self._rng = random.Random()
        self.num_steps = 0
        self.num_tree_steps = 0       # decode steps that used the prefix-shared kernel
        self.device = self.runner.k_caches[0].device
        self._tree_enabled = config.tree_decode in ("always", "auto")
        defaults = GPU_TREE_THRESHOLDS if self.device.type == "cuda" else CPU_TREE_THRESHOLDS
        self._tree_thresholds = (2, 1) if config.tree_decode == "always" else (
            config.tree_min_queries if config.tree_min_queries is not None else defaults[0],
            config.tree_min_tokens if config.tree_min_tokens is not None else defaults[1])
        self._last_plan: _StepPlan | None = None

    # ------------------------------------------------------------------ public API
    @property
    def num_free_pages(self) -> int:
        return self.block_manager.num_free_pages

    @property
    def num_pages(self) -> int:
        return self.block_manager.num_pages

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 keep_alive: bool = False, progress: bool = False) -> list[list[Completion]]:
        """`params.n` completions per prompt, in order. Everything is validated before anything
        runs: a bad prompt or parameter raises ValueError and leaves the engine untouched."""
        if not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts must be a list of token id lists")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            self._check_params(p)
            self._check_prompt(prompt, i)
            self._check_fits(len(prompt) + min(p.max_tokens, self.max_model_len - len(prompt)) - 1,
                             f"prompt {i}")
        groups: list[list[Sequence]] = []
        for prompt, p in zip(prompts, params):
            request_seed = p.seed if p.seed is not None else self._random_seed()
            groups.append(self._new_group(list(prompt), p, request_seed, keep_alive, parent=None))
        self._run([s for g in groups for s in g], progress, "generate")
        return [[self._completion(s) for s in g] for g in groups]

    def branch(self, requests: list[BranchRequest], k: int, params: SamplingParams,
               progress: bool = False) -> dict[tuple[int, int], list[Completion]]:
        """k continuations from each (handle, offset); offset = response tokens kept. A
        continuation generates at most `params.max_tokens - offset` tokens (`params.n` is unused:
        `k` sets the count). Validated before anything runs."""
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        self._check_params(params)
        work: list[tuple[Sequence, int]] = []
        seen: set[tuple[int, int]] = set()
        for req in requests:
            parent = self._kept.get(req.handle)
            if parent is None:
                raise ValueError(f"unknown handle {req.handle!r} (released, or dropped by update_weights)")
            for t in req.offsets:
                if not isinstance(t, int) or not 0 <= t <= parent.num_output:
                    raise ValueError(f"offset {t!r} of handle {req.handle} is outside "
                                     f"[0, {parent.num_output}] (its response length)")
                if (req.handle, t) in seen:
                    continue
                seen.add((req.handle, t))
                budget = min(params.max_tokens - t, self.max_model_len - parent.prompt_len - t)
                self._check_fits(parent.prompt_len + t + budget - 1, f"handle {req.handle} offset {t}")
                work.append((parent, t))
        results: dict[tuple[int, int], list[Completion]] = {}
        groups = []
        for parent, t in work:
            handle = parent.handle
            budget = min(params.max_tokens - t, self.max_model_len - parent.prompt_len - t)
            if budget <= 0:
                results[(handle, t)] = [Completion([], [], "length", "" if self.tokenizer else None)
                                        for _ in range(k)]
                continue
            base = params.seed if params.seed is not None else self._random_seed()
            p = _replace(params, n=k, max_tokens=budget)
            prefix = parent.token_ids[: parent.prompt_len + t]
            seqs = self._new_group(prefix, p, branch_seed(base, parent.seed, t), False, parent)
            groups.append(((handle, t), seqs))
        self._run([s for _, g in groups for s in g], progress, "branch")
        for key, seqs in groups:
            results[key] = [self._completion(s) for s in seqs]
        return results

    def release(self, handles: list[int] | None = None) -> None:
        """Free the pages of kept sequences (all of them when `handles` is None)."""
        if handles is None:
            handles = list(self._kept)
        unknown = [h for h in handles if h not in self._kept]
        if unknown:
            raise ValueError(f"unknown handles {unknown[:8]}")
        for h in handles:
            self.scheduler.drop(self._kept.pop(h))

    def update_weights(self, weights) -> None:
        """Load new weights (state dict or module) and release every kept sequence."""
        self.runner.update_weights(weights)
        self.release()

    # ------------------------------------------------------------------ requests
    def _new_group(self, prompt, params, request_seed, keep, parent) -> list[Sequence]:
        """`params.n` sequences of one prompt; all but the first fork the first's prefill."""
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        max_new = min(params.max_tokens, self.max_model_len - len(prompt))
        # The group's sequences are queued next to each other, so they are admitted together
        # and their shared pages stay hot.
        seqs = []
        for i in range(params.n):
            seq = Sequence(prompt, params, sample_seed(request_seed, i), max_new,
                           frozenset(stop_ids), keep=keep, owner=parent)
            source = parent if parent is not None else (seqs[0] if seqs else None)
            if source is not None and len(prompt) > 1:
                seq.fork_source, seq.fork_len = source, len(prompt) - 1
            seqs.append(seq)
        return seqs

    def _completion(self, seq: Sequence) -> Completion:
        if seq.keep:
            seq.handle = self._next_handle
            self._next_handle += 1
            self._kept[seq.handle] = seq
        return Completion(seq.output_ids, list(seq.logprobs), seq.finish_reason,
                          self.stopper.text(seq), seq.handle)

    def _random_seed(self) -> int:
        return self._rng.getrandbits(63)

    # ------------------------------------------------------------------ validation
    def _check_params(self, p: SamplingParams) -> None:
        if not isinstance(p, SamplingParams):
            raise ValueError(f"expected SamplingParams, got {type(p).__name__}")
        p.validate()
        if p.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine created with a tokenizer")
        vocab = self.runner.vocab_size
        if any(not 0 <= t < vocab for t in p.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")

    def _check_prompt(self, prompt, i: int) -> None:
        if not isinstance(prompt, (list, tuple)) or len(prompt) == 0:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
        if any(not isinstance(t, int) or isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompt {i} must contain only int token ids")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.runner.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {self.runner.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens; the context holds "
                             f"{self.max_model_len} (prompt + at least one new token)")

    def _check_fits(self, max_kv_tokens: int, what: str) -> None:
        need = self.block_manager.pages_for(max_kv_tokens)
        if need > self.block_manager.num_pages:
            raise ValueError(f"{what} needs up to {need} KV pages but the pool has "
                             f"{self.block_manager.num_pages}: it can never fit")

    # ------------------------------------------------------------------ the loop
    def _run(self, seqs: list[Sequence], progress: bool, desc: str) -> None:
        if not seqs:
            return
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc=desc, unit="seq")
        self.scheduler.add(seqs)
        try:
            while self.scheduler.has_unfinished():
                finished = self._step(self.scheduler.schedule())
                if bar is not None and finished:
                    bar.update(finished)
        except BaseException:
            self.scheduler.abort(seqs)  # free every page of the interrupted run: the engine stays usable
            raise
        finally:
            if bar is not None:
                bar.close()

    def _step(self, batch: ScheduledBatch) -> int:
        if batch.copy_src:
            dev = self.device
            copy_pages(self.runner.k_caches, self.runner.v_caches,
                       torch.tensor(batch.copy_src, dtype=torch.int64, device=dev),
                       torch.tensor(batch.copy_dst, dtype=torch.int64, device=dev))
        input_ids, positions, meta, sampled = self._prepare(batch)
        self.num_steps += 1
        self.num_tree_steps += meta.decode_tree_plan is not None
        logits = self.runner.forward(input_ids, positions, meta)
        tokens, logprobs = sample(logits, sampled)

        self.scheduler.postprocess(batch)
        finished = 0
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            seq.token_ids.append(token)
            seq.logprobs.append(logprob)
            reason = self.stopper.check(seq)
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.finish(seq)
                finished += 1
        return finished

    def _prepare(self, batch: ScheduledBatch):
        """Flatten a scheduled batch into the runner's inputs and attention metadata."""
        from vineppo.engine.attention_metadata import AttentionMetadata

        ps = self.page_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Sequence] = []
        q_start = [0]
        prefill_lens = []
        for seq, n in zip(batch.prefill_seqs, batch.prefill_lens):
            start, end = seq.num_computed, seq.num_computed + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            table = seq.block_table
            for page_idx in range(start // ps, (end - 1) // ps + 1):
                base = table[page_idx] * ps - page_idx * ps
                slots += range(base + max(start, page_idx * ps), base + min(end, (page_idx + 1) * ps))
            q_start.append(q_start[-1] + n)
            prefill_lens.append(end)
            if end == len(seq):
                logits_rows.append(len(ids) - 1)
                sampled.append(seq)
        num_prefill_tokens = len(ids)
        decode_lens = []
        for seq in batch.decode_seqs:
            p = len(seq) - 1
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // ps] * ps + p % ps)
            decode_lens.append(p + 1)
            logits_rows.append(len(ids) - 1)
            sampled.append(seq)

        dev = self.device

        def i32(x):
            return torch.tensor(x, dtype=torch.int32).to(dev, non_blocking=True)

        def tables(seqs):
            width = max(len(s.block_table) for s in seqs)
            return i32([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])

        plan = None
        if batch.decode_seqs and self._tree_enabled:
            plan = self._tree_plan(batch.decode_seqs, decode_lens)
        else:
            self._last_plan = None  # only consecutive decode steps may reuse a plan
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev, non_blocking=True),
            num_prefill_seqs=len(batch.prefill_seqs),
            num_prefill_tokens=num_prefill_tokens,
            prefill_query_start_loc=i32(q_start) if batch.prefill_seqs else None,
            prefill_seq_lens=i32(prefill_lens) if batch.prefill_seqs else None,
            prefill_block_tables=tables(batch.prefill_seqs) if batch.prefill_seqs else None,
            decode_seq_lens=i32(decode_lens) if batch.decode_seqs else None,
            decode_block_tables=tables(batch.decode_seqs) if batch.decode_seqs else None,
            decode_tree_plan=plan,
            logits_indices=torch.tensor(logits_rows, dtype=torch.int64).to(dev, non_blocking=True),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        positions = torch.tensor(pos, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, positions, meta, sampled

    def _tree_plan(self, seqs: list[Sequence], seq_lens: list[int]):
        """The prefix-sharing plan of a decode step, or None for plain paged decode.

        Consecutive decode steps of the same sequences usually differ only by one token in each
        sequence's own last page; the previous step's plan is then grown instead of re-planned
        (sharing, which depends only on full pages, cannot have changed)."""
        key = tuple((s.seq_id, len(s.block_table), s.block_table[-1]) for s in seqs)
        last = self._last_plan
        if last is not None and last.key == key and all(n == m + 1 for n, m in zip(seq_lens, last.seq_lens)):
            plan = None if last.plan is None else grow_tree_plan(last.plan, last.tails)
            if plan is not None or last.plan is None:
                self._last_plan = _StepPlan(key, seq_lens, plan, last.tails)
                return plan
        plan = self._new_tree_plan(seqs, seq_lens)
        self._last_plan = _StepPlan(key, seq_lens, plan, tree_plan_tails(plan) if plan is not None else [])
        return plan

    def _new_tree_plan(self, seqs: list[Sequence], seq_lens: list[int]):
        always = self.config.tree_decode == "always"
        min_queries, min_tokens = self._tree_thresholds
        segs = build_tree_segments([s.block_table for s in seqs], seq_lens, self.page_size,
                                   min_queries=min_queries, min_tokens=min_tokens)
        if segs.num_shared == 0 and not always:
            return None
        return plan_tree_decode(segs.segment_pages, segs.segment_lens, segs.query_segments,
                                self.page_size, self.device, min_shared_len=min_tokens)


@dataclass
class _StepPlan:
    """The tree plan of the last decode step and what identifies its structure."""

    key: tuple            # (seq id, number of pages, last page) of each decoding sequence
    seq_lens: list[int]
    plan: object          # TreePlan, or None when the step used plain paged decode
    tails: list[int]      # run holding each query's newest token (see vinekernels.tree_plan_tails)


def _replace(params: SamplingParams, **changes) -> SamplingParams:
    from dataclasses import replace

    return replace(params, **changes)


def _eos_token_ids(model, tokenizer, override) -> frozenset[int]:
    """EOS ids: the override, else the generation config's, the model config's, the tokenizer's."""
    candidates = [override,
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(getattr(model, "config", None), "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)]
    for eos in candidates:
        if eos is not None:
            return frozenset([eos] if isinstance(eos, int) else eos)
    return frozenset()


def _load(name_or_path: str, tokenizer, dtype: torch.dtype | None, device):
    """Load a causal LM (and its tokenizer when none is given) with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
    if device is not None:
        model = model.to(device)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError):
            tokenizer = None
    return model, tokenizer
