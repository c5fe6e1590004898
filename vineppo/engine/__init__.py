"""In-process rollout engine: paged KV cache with forkable pages, continuous batching, branching."""
from vineppo.engine.engine import Engine, EngineConfig
from vineppo.engine.sequence import (BranchRequest, Completion, SamplingParams, branch_seed,
                                     derive_seed, sample_seed)

__all__ = ["Engine", "EngineConfig", "SamplingParams", "Completion", "BranchRequest",
           "branch_seed", "derive_seed", "sample_seed"]
