"""CPU forwards fuse the q/k/v and gate/up matmuls (model_runner.FusedProjections): the same
tokens and logprobs, bit for bit, as the separate matmuls, and never stale weights."""

import pytest
import torch

import vineppo.engine.model_runner as mr
from vineppo.engine import Engine, EngineConfig, SamplingParams


def _run(model, fuse, monkeypatch, tree="auto"):
    monkeypatch.setattr(mr, "FUSE_PROJECTIONS_ON_CPU", fuse)
    eng = Engine(model, config=EngineConfig(page_size=4, tree_decode=tree, max_num_seqs=64), device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 29)]
    out = eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=5, n=3))
    return eng, [(c.token_ids, c.logprobs) for group in out for c in group]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # qwen2: q/k/v biases
def test_fused_projections_are_bit_identical(arch, tiny_lm, monkeypatch):
    model = tiny_lm(arch)
    _, plain = _run(model, False, monkeypatch)
    eng, fused = _run(model, True, monkeypatch)
    assert plain == fused
    assert eng.runner._fused is not None and len(eng.runner._fused._layers) == model.config.num_hidden_layers


def test_fused_projections_follow_in_place_weight_changes(tiny_lm, monkeypatch):
    model = tiny_lm("llama")
    eng, before = _run(model, True, monkeypatch)
    with torch.no_grad():                       # an optimizer step in the same process
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(-3.0)
            layer.mlp.up_proj.weight.add_(0.5)
    _, plain = _run(model, False, monkeypatch)
    monkeypatch.setattr(mr, "FUSE_PROJECTIONS_ON_CPU", True)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (3, 11, 29)]
    again = eng.generate(prompts, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=5, n=3))
    again = [(c.token_ids, c.logprobs) for group in again for c in group]
    assert again == plain and again != before
