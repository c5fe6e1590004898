"""Paged forward pass for Llama-family models, reading a transformers model's weights in place.

One step runs a mixed batch: the prefill/extend tokens of some sequences followed by one decode token
per decoding sequence. Each layer writes the new tokens' K/V into its paged cache (``store_kv``), then
attends with ``paged_prefill_attention`` (prefill part) and ``paged_decode_attention`` or
``tree_decode_attention`` (decode part). Ops, their order and the RMSNorm/RoPE arithmetic follow
transformers' Llama/Qwen2/Mistral code, so logits match transformers closely (fp32 greedy decoding
agrees token for token).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vineppo.engine.attention_metadata import AttentionMetadata
from vineppo.engine.cuda_graphs import DecodeCudaGraphs
from vineppo.engine.dtypes import resolve_dtype
from vineppo.engine.rope import apply_rotary, build_rotary_embedding

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
CPU_DEFAULT_CACHE_TOKENS = 32768  # default KV capacity on CPU when num_pages is None
# Headroom left on the GPU for activations, logits and CUDA-graph pools when sizing the KV cache.
ACTIVATION_RESERVE_TOKENS = 4096
ACTIVATION_RESERVE_LOGITS_ROWS = 512
ACTIVATION_RESERVE_FIXED_BYTES = 512 * 2**20
RUNNER_KWARGS = ("num_pages", "page_size", "memory_fraction", "dtype", "device", "use_cuda_graphs",
                 "max_model_len", "cuda_graph_max_batch_size")

# CPU forwards use one QKV and one gate-up matmul per layer (FusedProjections); the outputs are the
# same bits as the separate matmuls on CPU BLAS. False restores the separate matmuls.
FUSE_PROJECTIONS_ON_CPU = True

_LINEARS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    q_w: torch.Tensor
    q_b: torch.Tensor | None
    k_w: torch.Tensor
    k_b: torch.Tensor | None
    v_w: torch.Tensor
    v_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    gate_w: torch.Tensor
    gate_b: torch.Tensor | None
    up_w: torch.Tensor
    up_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None


class FusedProjections:
    """One QKV and one gate-up weight per layer (row concatenations of the model's own tensors),
    for CPU forwards: one matmul instead of three (two), with bit-identical outputs on CPU BLAS
    (each output column is the same dot product). The concatenations are copies, so they are
    rebuilt whenever a source tensor changes: its storage (``data_ptr``) or its in-place version
    counter (bumped by optimizer steps, ``copy_`` and ``load_state_dict``). Writes through
    ``param.data`` bypass the version counter and are not seen; call ``ModelRunner.update_weights``
    or ``invalidate()`` after such writes."""

    def __init__(self):
        self._layers: list[tuple] = []
        self._keys: list[tuple] = []

    def invalidate(self) -> None:
        self._layers, self._keys = [], []

    @staticmethod
    def _key(tensors) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)

    @staticmethod
    def _cat(ws, bs):
        w = torch.cat(ws, dim=0)
        if all(b is None for b in bs):
            return w, None
        return w, torch.cat([b if b is not None else torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
                             for x, b in zip(ws, bs)])

    def get(self, layers: list[LayerWeights]) -> list[tuple]:
        if len(self._layers) != len(layers):
            self._layers = [None] * len(layers)
            self._keys = [None] * len(layers)
        for i, lw in enumerate(layers):
            src = (lw.q_w, lw.k_w, lw.v_w, lw.gate_w, lw.up_w, lw.q_b, lw.k_b, lw.v_b, lw.gate_b, lw.up_b)
            key = self._key(src)
            if self._keys[i] != key:
                qkv = self._cat([lw.q_w, lw.k_w, lw.v_w], [lw.q_b, lw.k_b, lw.v_b])
                gate_up = self._cat([lw.gate_w, lw.up_w], [lw.gate_b, lw.up_b])
                self._layers[i] = qkv + gate_up
                self._keys[i] = key
        return self._layers


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor
    named: dict[str, torch.Tensor]  # HF state-dict name -> held tensor (tied names share one tensor)
    copied: bool  # True when the tensors are copies (device/dtype conversion), not the model's own


def check_supported(model, max_model_len: int) -> None:
    """Raise ValueError unless ``model`` is a Llama-family causal LM the runner computes exactly."""
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r} (the runner implements SiLU gating)")
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    uses_window = window is not None and (name == "MistralForCausalLM" or "sliding_attention" in layer_types)
    # A window at least as long as the context never masks anything, so full attention is exact.
    if uses_window and window < max_model_len:
        raise ValueError(f"sliding-window attention is not supported: sliding_window={window} < "
                         f"max_model_len={max_model_len}; pass max_model_len <= {window}")


def collect_weights(model, device: torch.device, dtype: torch.dtype) -> ModelWeights:
    """References to ``model``'s parameters (zero-copy when already on ``device`` in ``dtype``;
    otherwise one converted copy per parameter, tied parameters converted once)."""
    converted: dict[int, torch.Tensor] = {}
    copied = False

    def take(param):
        nonlocal copied
        if param is None:
            return None
        if _is_dtensor(param):
            raise ValueError("the model's parameters are sharded DTensors (FSDP); pass a full state dict instead")
        if param.device == device and param.dtype == dtype:
            return param
        if id(param) not in converted:
            converted[id(param)] = param.detach().to(device=device, dtype=dtype, copy=True)
            copied = True
        return converted[id(param)]

    backbone = model.model
    named: dict[str, torch.Tensor] = {}
    layers = []
    for i, layer in enumerate(backbone.layers):
        prefix = f"model.layers.{i}."
        kw = {"input_norm": take(layer.input_layernorm.weight),
              "post_attention_norm": take(layer.post_attention_layernorm.weight)}
        named[prefix + "input_layernorm.weight"] = kw["input_norm"]
        named[prefix + "post_attention_layernorm.weight"] = kw["post_attention_norm"]
        for short, path in _LINEARS.items():
            linear = layer.get_submodule(path)
            kw[short + "_w"] = take(linear.weight)
            kw[short + "_b"] = take(linear.bias)
            named[prefix + path + ".weight"] = kw[short + "_w"]
            if linear.bias is not None:
                named[prefix + path + ".bias"] = kw[short + "_b"]
        layers.append(LayerWeights(**kw))
    embed = take(backbone.embed_tokens.weight)
    lm_head = take(model.lm_head.weight)
    if getattr(model.lm_head, "bias", None) is not None:
        raise ValueError("an lm_head with a bias is not supported")
    named["model.embed_tokens.weight"] = embed
    named["model.norm.weight"] = norm = take(backbone.norm.weight)
    named["lm_head.weight"] = lm_head
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head, named=named, copied=copied)


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def _available_ram_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


class ModelRunner:
    """Paged forward for LlamaForCausalLM, Qwen2ForCausalLM and MistralForCausalLM.

    Weights are read in place: the runner keeps references to the transformers model's own parameter
    tensors, so an in-place change to them (an optimizer step in the same process) is seen by the
    next forward with no copy. When ``dtype`` or ``device`` differ from the model's, each parameter is
    copied once, converted, at construction (``self.weights_copied`` is then True).

    KV cache: per layer one K and one V tensor of shape [num_pages, page_size, num_kv_heads, head_dim]
    in the model dtype, zero-initialised. With ``num_pages=None`` the pool takes
    ``memory_fraction`` of the free device memory (``torch.cuda.mem_get_info``) minus a reserve for
    activations, logits and CUDA-graph pools; on CPU it holds ``CPU_DEFAULT_CACHE_TOKENS`` tokens,
    bounded by ``memory_fraction`` of the available RAM.

    ``max_model_len`` defaults to ``config.max_position_embeddings`` and may only be lowered (which
    also lets models whose sliding window is at least that long run with full attention). Dynamic
    NTK RoPE is exact within that context (see ``vineppo.engine.rope``). Sliding windows shorter
    than the context, other activations and other architectures raise ValueError.

    On CUDA with ``use_cuda_graphs``, decode-only steps without a tree plan replay CUDA graphs
    captured per padded batch size (see ``vineppo.engine.cuda_graphs``); everything else runs eagerly.
    """

    def __init__(self, model, num_pages: int | None = None, page_size: int = 16, memory_fraction: float = 0.5,
                 dtype=None, device=None, use_cuda_graphs: bool = True, max_model_len: int | None = None,
                 cuda_graph_max_batch_size: int = 256):
        config = model.config
        limit = int(config.max_position_embeddings)
        if max_model_len is not None and not 1 <= max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}] (config.max_position_embeddings), "
                             f"got {max_model_len}")
        self.max_model_len = int(max_model_len or limit)
        check_supported(model, self.max_model_len)
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if not 0.0 < memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")

        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = resolve_dtype(dtype) or first.dtype
        self.model = model
        self.config = config
        self.num_layers = int(config.num_hidden_layers)
        self.num_heads = int(config.num_attention_heads)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
        self.vocab_size = int(config.vocab_size)
        self.hidden_size = int(config.hidden_size)
        self.rms_norm_eps = float(config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        self.rope = build_rotary_embedding(config, self.device)
        self._set_weights(collect_weights(model, self.device, self.dtype))

        self.page_size = int(page_size)
        self.num_pages = self._resolve_num_pages(num_pages, memory_fraction)
        shape = (self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

        self.use_cuda_graphs = bool(use_cuda_graphs) and self.device.type == "cuda"
        self.cuda_graph_max_batch_size = int(cuda_graph_max_batch_size)
        self._graphs = None

    # ------------------------------------------------------------------ construction helpers
    def _set_weights(self, weights: ModelWeights) -> None:
        self.weights = weights
        self.weights_copied = weights.copied
        self._fused = None

    @property
    def kv_bytes_per_page(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem

    def _resolve_num_pages(self, num_pages: int | None, memory_fraction: float) -> int:
        if num_pages is not None:
            if int(num_pages) < 1:
                raise ValueError(f"num_pages must be >= 1, got {num_pages}")
            return int(num_pages)
        per_page = self.kv_bytes_per_page
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * memory_fraction - self._activation_reserve_bytes()
            pages = int(budget // per_page)
        else:
            wanted = math.ceil(CPU_DEFAULT_CACHE_TOKENS / self.page_size)
            pages = min(wanted, int(_available_ram_bytes() * memory_fraction // per_page))
        if pages < 1:
            raise ValueError(f"not enough free memory on {self.device} for even one KV page "
                             f"({per_page} bytes); raise memory_fraction or pass num_pages")
        return pages

    def _activation_reserve_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        intermediate = int(getattr(self.config, "intermediate_size", 4 * self.hidden_size))
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        per_token = (4 * self.hidden_size + 3 * intermediate + 2 * qkv) * elem
        logits = ACTIVATION_RESERVE_LOGITS_ROWS * self.vocab_size * 4 * 3
        return ACTIVATION_RESERVE_TOKENS * per_token + logits + ACTIVATION_RESERVE_FIXED_BYTES

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw) -> "ModelRunner":
        """Load with transformers (a local directory, a hub name, or ``gguf_file=`` inside one) and wrap.

        Runner keyword arguments (``num_pages``, ``page_size``, ``dtype``, ...) go to the runner;
        everything else (``gguf_file``, ``revision``, ``trust_remote_code``, ...) to transformers.
        """
        runner_kw = {k: kw.pop(k) for k in RUNNER_KWARGS if k in kw}
        dtype = resolve_dtype(runner_kw.get("dtype"))
        model = load_causal_lm(name_or_path, dtype=dtype, device=runner_kw.get("device"), **kw)
        return cls(model, **runner_kw)

    # ------------------------------------------------------------------ weights
    def update_weights(self, weights) -> None:
        """New weights: a state dict with transformers names (copied into the held tensors, cast to
        the runner's dtype/device) or a module of the same architecture and shapes (the runner then
        reads its parameters in place, converting once if its device/dtype differ). With a state dict
        and zero-copy weights, the copy lands in the wrapped model's own parameters. The caller
        drops any cached KV (it was computed with the old weights)."""
        if isinstance(weights, torch.nn.Module):
            check_supported(weights, self.max_model_len)
            new = collect_weights(weights, self.device, self.dtype)
            if set(new.named) != set(self.weights.named):
                raise ValueError("update_weights: the module's parameters differ from the runner's: "
                                 f"{sorted(set(new.named) ^ set(self.weights.named))}")
            self._check_shapes(new.named)
            self.model = weights
            self._set_weights(new)
            self._graphs = None  # captured graphs point at the old tensors
            return
        if not isinstance(weights, dict):
            raise ValueError(f"update_weights takes a state dict or a torch.nn.Module, got {type(weights).__name__}")
        named = self.weights.named
        tied = self.weights.lm_head is self.weights.embed
        optional = {"lm_head.weight"} if tied else set()
        missing = sorted(set(named) - set(weights) - optional)
        unexpected = sorted(set(weights) - set(named))
        if missing or unexpected:
            raise ValueError(f"update_weights: missing keys {missing}, unexpected keys {unexpected}")
        sharded = sorted(n for n, t in weights.items() if _is_dtensor(t))
        if sharded:
            raise ValueError(f"update_weights needs full tensors, got sharded DTensors for {sharded[:3]}...; "
                             "gather them first (e.g. torch.distributed.checkpoint.state_dict.get_model_state_dict "
                             "with StateDictOptions(full_state_dict=True))")
        self._check_shapes(weights)
        if tied and "lm_head.weight" in weights and "model.embed_tokens.weight" in weights:
            a, b = weights["lm_head.weight"], weights["model.embed_tokens.weight"]
            if a is not b and not torch.equal(a.to(b.device), b):
                raise ValueError("lm_head.weight differs from model.embed_tokens.weight, but the model ties them")
        with torch.no_grad():
            for name, value in weights.items():
                named[name].copy_(value)

    def _check_shapes(self, tensors: dict[str, torch.Tensor]) -> None:
        held = self.weights.named
        bad = [f"{n}: expected {tuple(held[n].shape)}, got {tuple(t.shape)}"
               for n, t in tensors.items() if n in held and t.shape != held[n].shape]
        if bad:
            raise ValueError("update_weights: shape mismatch: " + "; ".join(bad))

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Run one step. input_ids, positions: int64 [T], prefill tokens first, then decode tokens.
        Returns float32 logits [len(meta.logits_indices), vocab_size]."""
        self._validate(input_ids, positions, meta)
        if self.use_cuda_graphs and meta.is_decode_only and meta.decode_tree_plan is None:
            if self._graphs is None:
                self._graphs = DecodeCudaGraphs(self.forward_eager, device=self.device, vocab_size=self.vocab_size,
                                                max_model_len=self.max_model_len, page_size=self.page_size,
                                                max_batch_size=self.cuda_graph_max_batch_size)
            if self._graphs.can_run(meta):
                return self._graphs.run(input_ids, positions, meta)
        return self.forward_eager(input_ids, positions, meta)

    __call__ = forward

    def _validate(self, input_ids, positions, meta) -> None:
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids and positions must be 1-D of one length, got "
                             f"{tuple(input_ids.shape)} and {tuple(positions.shape)}")
        t = input_ids.shape[0]
        if meta.slot_mapping.shape != (t,):
            raise ValueError(f"slot_mapping has shape {tuple(meta.slot_mapping.shape)}, expected ({t},)")
        if not 0 <= meta.num_prefill_tokens <= t:
            raise ValueError(f"num_prefill_tokens={meta.num_prefill_tokens} outside [0, {t}]")
        num_decode = t - meta.num_prefill_tokens
        if meta.num_prefill_tokens and (meta.prefill_block_tables is None or meta.prefill_seq_lens is None
                                        or meta.prefill_query_start_loc is None):
            raise ValueError("prefill tokens need prefill_query_start_loc, prefill_seq_lens and prefill_block_tables")
        if num_decode and meta.decode_tree_plan is None:
            if meta.decode_seq_lens is None or meta.decode_block_tables is None:
                raise ValueError("decode tokens need decode_seq_lens and decode_block_tables (or a decode_tree_plan)")
            if meta.decode_seq_lens.shape[0] != num_decode:
                raise ValueError(f"{num_decode} decode tokens but {meta.decode_seq_lens.shape[0]} decode_seq_lens")
        if meta.logits_indices.dim() != 1:
            raise ValueError("logits_indices must be 1-D")

    @torch.no_grad()
    def forward_eager(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        from vinekernels import store_kv

        w = self.weights
        t = input_ids.shape[0]
        eps = self.rms_norm_eps
        nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        h = F.embedding(input_ids, w.embed)
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        fused = None
        if self.device.type == "cpu" and FUSE_PROJECTIONS_ON_CPU:
            if self._fused is None:
                self._fused = FusedProjections()
            fused = self._fused.get(w.layers)
        for i, (lw, k_cache, v_cache) in enumerate(zip(w.layers, self.k_caches, self.v_caches)):
            residual = h
            x = rms_norm(h, lw.input_norm, eps)
            if fused is not None:
                qkv_w, qkv_b, gate_up_w, gate_up_b = fused[i]
                q, k, v = F.linear(x, qkv_w, qkv_b).split((nq, nkv, nkv), dim=1)
                q = q.reshape(t, self.num_heads, self.head_dim)
                k = k.reshape(t, self.num_kv_heads, self.head_dim)
                v = v.reshape(t, self.num_kv_heads, self.head_dim)
            else:
                q = F.linear(x, lw.q_w, lw.q_b).view(t, self.num_heads, self.head_dim)
                k = F.linear(x, lw.k_w, lw.k_b).view(t, self.num_kv_heads, self.head_dim)
                v = F.linear(x, lw.v_w, lw.v_b).view(t, self.num_kv_heads, self.head_dim)
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
            store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
            attn = self._attention(q, k_cache, v_cache, meta)
            h = residual + F.linear(attn.reshape(t, self.num_heads * self.head_dim), lw.o_w, lw.o_b)
            residual = h
            x = rms_norm(h, lw.post_attention_norm, eps)
            if fused is not None:
                gate, up = F.linear(x, gate_up_w, gate_up_b).chunk(2, dim=1)
                x = F.silu(gate) * up
            else:
                x = F.silu(F.linear(x, lw.gate_w, lw.gate_b)) * F.linear(x, lw.up_w, lw.up_b)
            h = residual + F.linear(x, lw.down_w, lw.down_b)
        # Only the rows that sample go through the final norm and the LM head.
        h = rms_norm(h[meta.logits_indices], w.norm, eps)
        return F.linear(h, w.lm_head).float()

    def _attention(self, q: torch.Tensor, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        from vinekernels import paged_decode_attention, paged_prefill_attention, tree_decode_attention

        n_prefill = meta.num_prefill_tokens
        prefill_out = decode_out = None
        if n_prefill:
            prefill_out = paged_prefill_attention(q[:n_prefill], k_cache, v_cache, meta.prefill_block_tables,
                                                  meta.prefill_query_start_loc, meta.prefill_seq_lens, self.scale)
        if n_prefill < q.shape[0]:
            q_decode = q[n_prefill:]
            if meta.decode_tree_plan is not None:
                decode_out = tree_decode_attention(q_decode, k_cache, v_cache, meta.decode_tree_plan, self.scale)
            else:
                decode_out = paged_decode_attention(q_decode, k_cache, v_cache, meta.decode_block_tables,
                                                    meta.decode_seq_lens, self.scale)
        if prefill_out is None:
            return decode_out
        if decode_out is None:
            return prefill_out
        return torch.cat((prefill_out, decode_out), dim=0)


_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "subfolder")


def load_causal_lm(name_or_path: str, dtype: torch.dtype | None = None, device=None, gguf_file: str | None = None,
                   **hf_kwargs):
    """A transformers causal LM from a directory, hub name, or a GGUF file inside one (dequantised).

    transformers' GGUF loading needs `accelerate`; without it the same conversion runs through
    transformers' own GGUF reader (``load_gguf_checkpoint``) into a model built from the GGUF config.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if gguf_file is not None and not is_accelerate_available():
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        from transformers.utils import cached_file

        config = AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, **hf_kwargs)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        path = cached_file(name_or_path, gguf_file, **{k: v for k, v in hf_kwargs.items() if k in _HUB_KWARGS})
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
        result = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        if set(result.missing_keys) - tied or result.unexpected_keys:
            raise ValueError(f"GGUF checkpoint does not match the model: missing {result.missing_keys}, "
                             f"unexpected {result.unexpected_keys}")
        model.tie_weights()
    else:
        kw = dict(hf_kwargs)
        if gguf_file is not None:
            kw["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto", **kw)
    if device is not None:
        model = model.to(device)
    return model.eval()
