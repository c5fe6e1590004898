"""Rotary position embeddings computed exactly as transformers computes them for Llama-family models.

The inverse frequencies and the attention factor come from transformers' own ``ROPE_INIT_FUNCTIONS``
(or the default formula of ``LlamaRotaryEmbedding``), and cos/sin are formed with the same op order
(float32 angles, ``cat(freqs, freqs)``, ``cos() * attention_scaling``, cast to the model dtype), so the
rotated q/k match transformers bit for bit on the same device.

Supported ``rope_type``s: ``default``, ``linear``, ``llama3``, ``yarn`` and ``dynamic``. Dynamic NTK
scaling in transformers only changes the frequencies once a sequence grows past
``max_position_embeddings``; the runner never runs past that length (``max_model_len`` is capped by
it), so inside the context dynamic NTK is the unscaled frequencies, exactly as transformers uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass
class RotaryEmbedding:
    inv_freq: torch.Tensor  # float32 [head_dim // 2]
    attention_scaling: float

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim] in ``dtype`` for int64 ``positions`` [T]."""
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rope_parameters(config) -> dict:
    """The config's RoPE parameters as one flat dict (transformers >= 5 keeps them in
    ``config.rope_parameters``; older configs carry ``rope_scaling`` plus ``rope_theta``)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type RoPE parameters are not supported: {params}")
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def build_rotary_embedding(config, device: torch.device | str | None = None) -> RotaryEmbedding:
    """inv_freq and attention factor for ``config`` (computed on CPU like transformers, then moved)."""
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported by the Llama-family runner")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if rope_type == "default":
        # Same expression as LlamaRotaryEmbedding.compute_default_rope_parameters.
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        attention_scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        # `dynamic` with seq_len=None gives the frequencies transformers uses up to max_position_embeddings.
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    return RotaryEmbedding(inv_freq=inv_freq.float().to(device), attention_scaling=float(attention_scaling))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by cos/sin [T, D] (the op order of transformers' apply_rotary_pos_emb)."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
