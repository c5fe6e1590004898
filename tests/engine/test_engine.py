"""Engine end to end on tiny random-weight models (CPU, fp32) against transformers."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from vineppo.engine import (BranchRequest, Engine, EngineConfig, SamplingParams, branch_seed,
                            sample_seed)

VOCAB = 384


def tiny(kind="llama", heads=4, kv_heads=2, tied=False, seed=0):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=0,
                  eos_token_id=None, initializer_range=0.1)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        with torch.no_grad():   # make the qkv biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.1)
    return model.eval()


def hf_greedy(model, prompt, max_new, eos=None):
    # The tiny models have no EOS (min_new_tokens would mask it and change the argmax);
    # `eos` makes generate stop like the engine does.
    kw = dict(do_sample=False, max_new_tokens=max_new, pad_token_id=0)
    if eos is not None:
        kw.update(eos_token_id=eos)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), **kw)
    return out[0, len(prompt):].tolist()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama():
    return tiny("llama", 4, 2, tied=False)


@pytest.fixture(scope="module")
def engine(llama):
    return Engine(llama, config=EngineConfig(num_pages=128, page_size=8))


@pytest.mark.parametrize("kind,heads,kv,tied", [("llama", 4, 4, False), ("llama", 4, 2, True),
                                                ("qwen2", 4, 1, True), ("qwen2", 4, 2, False)])
def test_greedy_matches_transformers(kind, heads, kv, tied):
    model = tiny(kind, heads, kv, tied)
    # a small token budget forces chunked prefill and mixed prefill/decode steps
    eng = Engine(model, config=EngineConfig(num_pages=64, page_size=8, max_num_batched_tokens=24))
    prompts = prompts_of([1, 5, 17, 40, 9])
    out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for p, (c,) in zip(prompts, out):
        assert c.token_ids == hf_greedy(model, p, 12)
        assert c.finish_reason == "length" and len(c.logprobs) == 12
    assert eng.num_free_pages == 64


def test_eos_from_generation_config_stops_like_transformers(llama):
    prompts = prompts_of([6, 11, 3], seed=5)
    free_run = [hf_greedy(llama, p, 10) for p in prompts]
    eos = free_run[0][4]                       # a token greedy decoding does produce
    llama.generation_config.eos_token_id = eos
    try:
        eng = Engine(llama, config=EngineConfig(num_pages=64, page_size=8))
        out = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
        for p, (c,) in zip(prompts, out):
            ref = hf_greedy(llama, p, 10, eos=eos)
            assert c.token_ids == ref
            assert c.finish_reason == ("stop" if ref[-1] == eos else "length")
        assert out[0][0].finish_reason == "stop" and len(out[0][0].token_ids) <= 5
        # ignore_eos runs through it
        (c,), = eng.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        assert c.token_ids == free_run[0]
    finally:
        llama.generation_config.eos_token_id = None


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (7, 1.0), (0, 0.8)])
def test_logprobs_equal_processed_log_softmax(llama, engine, top_k, top_p):
    prompts = prompts_of([4, 13], seed=3)
    T = 0.7
    out = engine.generate(prompts, SamplingParams(temperature=T, top_k=top_k, top_p=top_p,
                                                  max_tokens=10, ignore_eos=True, seed=11))
    for p, (c,) in zip(prompts, out):
        ids = torch.tensor([p + c.token_ids])
        with torch.no_grad():
            logits = llama(ids).logits[0, len(p) - 1:-1].double() / T
        lp = torch.log_softmax(logits, -1)
        if top_k:
            kth = logits.topk(top_k, -1).values[:, -1:]
            kept = logits >= kth
        elif top_p < 1:
            probs, order = lp.exp().sort(-1, descending=True)
            cum = probs.cumsum(-1)
            keep_sorted = (cum - probs) < top_p      # smallest set whose mass reaches top_p
            kept = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        else:
            kept = torch.ones_like(logits, dtype=torch.bool)
        ref = lp - torch.logsumexp(lp.masked_fill(~kept, float("-inf")), -1, keepdim=True)
        tok = torch.tensor(c.token_ids)
        assert kept.gather(1, tok[:, None]).all()
        torch.testing.assert_close(torch.tensor(c.logprobs, dtype=torch.float64),
                                   ref.gather(1, tok[:, None]).squeeze(1), atol=1e-5, rtol=0)


def test_branch_equals_fresh_generation_greedy_and_sampled(llama, engine):
    prompts = prompts_of([7, 12], seed=4)
    M = 14
    gen = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=M, ignore_eos=True),
                          keep_alive=True)
    handles = [g[0].handle for g in gen]
    assert all(h is not None for h in handles)
    offsets = [0, 1, 8, 9, M]                  # page size 8: at and around page boundaries
    greedy = SamplingParams(temperature=0, max_tokens=M, ignore_eos=True)
    res = engine.branch([BranchRequest(h, offsets) for h in handles], k=2, params=greedy)
    for p, g, h in zip(prompts, gen, handles):
        resp = g[0].token_ids
        for t in offsets:
            conts = res[(h, t)]
            assert len(conts) == 2
            if t == M:
                assert all(c.token_ids == [] and c.finish_reason == "length" for c in conts)
                continue
            fresh = hf_greedy(llama, p + resp[:t], M - t)
            assert fresh == resp[t:]               # greedy: the continuation is the trajectory
            for c in conts:
                assert c.token_ids == fresh and c.handle is None

    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=M, ignore_eos=True, seed=21)
    gen_seed = 99
    gen2 = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=M, ignore_eos=True,
                                                   seed=gen_seed), keep_alive=True)
    res2 = engine.branch([BranchRequest(g[0].handle, [3, 8]) for g in gen2], k=3, params=sampled)
    for p, g in zip(prompts, gen2):
        traj_seed = sample_seed(gen_seed, 0)
        for t in (3, 8):
            fresh = engine.generate(
                [p + g[0].token_ids[:t]],
                SamplingParams(temperature=1.0, top_p=0.9, max_tokens=M - t, ignore_eos=True,
                               seed=branch_seed(21, traj_seed, t), n=3))[0]
            got = res2[(g[0].handle, t)]
            assert [c.token_ids for c in got] == [c.token_ids for c in fresh]
            for a, b in zip(got, fresh):
                torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
            assert len({tuple(c.token_ids) for c in got}) > 1
    engine.release()
    assert engine.num_free_pages == engine.num_pages


def test_page_accounting_while_branching(engine):
    prompts = prompts_of([20], seed=8)
    (g,), = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
                            keep_alive=True)
    # 20 + 15 tokens, the last sampled token has no K/V: 34 tokens -> 5 pages
    kept_table = engine._kept[g.handle].block_table
    assert len(kept_table) == 5 and engine.num_free_pages == engine.num_pages - 5
    assert all(engine.block_manager.refcounts[p] == 1 for p in kept_table)
    engine.branch([BranchRequest(g.handle, [5])], k=3, params=SamplingParams(temperature=0, max_tokens=15))
    # children are gone, the kept pages remain with their single owner
    assert engine.num_free_pages == engine.num_pages - 5
    assert all(engine.block_manager.refcounts[p] == 1 for p in kept_table)
    with pytest.raises(ValueError):
        engine.release([g.handle + 1000])
    engine.release([g.handle])
    assert engine.num_free_pages == engine.num_pages and sum(engine.block_manager.refcounts) == 0


def test_small_pool_preempts_and_matches_large_pool(llama):
    prompts = prompts_of([9, 30, 4, 17, 25, 12], seed=6)
    params = SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True, seed=5, n=2)
    big = Engine(llama, config=EngineConfig(num_pages=128, page_size=4))
    small = Engine(llama, config=EngineConfig(num_pages=14, page_size=4))
    ref = big.generate(prompts, params)
    got = small.generate(prompts, params)
    assert small.scheduler.num_preemptions > 0
    for r, g in zip(ref, got):
        assert [c.token_ids for c in r] == [c.token_ids for c in g]
        for a, b in zip(r, g):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert small.num_free_pages == 14
    with pytest.raises(ValueError, match="never fit"):
        small.generate(prompts_of([50]), SamplingParams(max_tokens=10))
    assert small.num_free_pages == 14


def test_kept_pages_evicted_under_pressure_branch_still_exact(llama):
    eng = Engine(llama, config=EngineConfig(num_pages=24, page_size=4))
    prompts = prompts_of([10, 10, 10], seed=9)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    gen = eng.generate(prompts, greedy, keep_alive=True)      # 3 x 6 pages kept
    eng.generate(prompts_of([30], seed=10), greedy)            # needs 11 pages: evicts kept ones
    assert eng.scheduler.num_evictions > 0
    res = eng.branch([BranchRequest(g[0].handle, [2, 6]) for g in gen], k=2, params=greedy)
    for p, g in zip(prompts, gen):
        for t in (2, 6):
            for c in res[(g[0].handle, t)]:
                assert c.token_ids == g[0].token_ids[t:]
    eng.release()
    assert eng.num_free_pages == 24


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tree_decode_on_and_off_agree(llama, temperature):
    prompts = prompts_of([37, 21], seed=12)
    params = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True, seed=3)
    outs, tree_steps = [], []
    for mode in ("always", "never", "auto"):
        eng = Engine(llama, config=EngineConfig(num_pages=256, page_size=4, tree_decode=mode,
                                                tree_min_queries=3, tree_min_tokens=16))
        gen = eng.generate(prompts, params, keep_alive=True)
        res = eng.branch([BranchRequest(g[0].handle, [0, 5, 9]) for g in gen], k=4, params=params)
        outs.append({key: [c.token_ids for c in v] for key, v in res.items()})
        lps = {key: [c.logprobs for c in v] for key, v in res.items()}
        if mode == "always":
            ref_lps = lps
        else:
            for key in lps:
                for a, b in zip(lps[key], ref_lps[key]):
                    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        tree_steps.append(eng.num_tree_steps)
    assert outs[0] == outs[1] == outs[2]
    # "auto" shares these prefixes (3 readers of >= 16 tokens each, above the thresholds set here)
    assert tree_steps[0] > 0 and tree_steps[1] == 0 and tree_steps[2] > 0


def test_seeds_n_and_batch_independence(engine):
    prompts = prompts_of([5, 9, 14], seed=13)
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=42, n=3)
    a = engine.generate(prompts, params)
    b = engine.generate(prompts[::-1], params)[::-1]           # another batch composition
    alone = engine.generate(prompts[1:2], params)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in a[1]]
    assert all(len(g) == 3 for g in a)
    assert len({tuple(c.token_ids) for c in a[0]}) > 1
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True, seed=43))
    assert [g[0].token_ids for g in other] != [g[0].token_ids for g in a]


def test_stop_token_ids(engine, llama):
    (p,) = prompts_of([8], seed=14)
    free = hf_greedy(llama, p, 12)
    stop = free[5]
    (c,), = engine.generate([p], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop]))
    cut = free.index(stop) + 1
    assert c.token_ids == free[:cut] and c.finish_reason == "stop"


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["<s>", "<pad>", "</s>"] + [chr(c) for c in range(33, 127)]
    pieces += [a + b for a in "abcdefgh" for b in "xyzw"] + [" the", " and", "\n"]
    pieces += [f"w{i}" for i in range(VOCAB - len(pieces))]
    vocab = {s: i for i, s in enumerate(pieces)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def test_stop_strings_and_text(llama):
    tok = char_tokenizer()
    eng = Engine(llama, tokenizer=tok, config=EngineConfig(num_pages=64, page_size=8))
    prompts = prompts_of([6, 10, 3], seed=15)
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    free = [g[0] for g in eng.generate(prompts, base)]
    for c in free:
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # a stop string that spans a token boundary: last char of token 6 + first char of token 7
    ids = free[0].token_ids
    t6, t7 = tok.decode([ids[6]]), tok.decode([ids[7]])
    stop = t6[-1] + t7[0]
    stopped = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                   stop=[stop, "\u2603"]))
    for f, (c,) in zip(free, stopped):
        full = tok.decode(f.token_ids)
        if stop not in full:
            assert c.token_ids == f.token_ids and c.finish_reason == "length"
            continue
        cut = next(j for j in range(1, 21) if stop in tok.decode(f.token_ids[:j]))
        assert c.token_ids == f.token_ids[:cut] and c.finish_reason == "stop"
        assert c.text == full[: full.index(stop) + len(stop)] and c.text.endswith(stop)
    assert stopped[0][0].finish_reason == "stop" and len(stopped[0][0].token_ids) <= 8
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(llama, config=EngineConfig(num_pages=8)).generate(prompts, SamplingParams(stop=["a"]))


def test_bad_input_raises_before_running(engine):
    ok = prompts_of([5])[0]
    greedy = SamplingParams(temperature=0, max_tokens=4)
    for bad in ([ok, []], [ok, [1, VOCAB]], [ok, [-1]], [ok, list(range(3, 259))], [ok, [1.5]]):
        with pytest.raises(ValueError):
            engine.generate(bad, greedy)
    for p in (SamplingParams(temperature=-1), SamplingParams(top_p=0), SamplingParams(max_tokens=0),
              SamplingParams(n=0), SamplingParams(top_k=-2), SamplingParams(stop_token_ids=[VOCAB])):
        with pytest.raises(ValueError):
            engine.generate([ok], p)
    assert engine.num_free_pages == engine.num_pages and not engine.scheduler.has_unfinished()
    (g,), = engine.generate([ok], greedy, keep_alive=True)
    with pytest.raises(ValueError):
        engine.branch([BranchRequest(g.handle, [0])], k=0, params=greedy)
    with pytest.raises(ValueError):
        engine.branch([BranchRequest(g.handle, [0, len(g.token_ids) + 1])], k=1, params=greedy)
    with pytest.raises(ValueError):
        engine.branch([BranchRequest(g.handle + 77, [0])], k=1, params=greedy)
    # nothing ran: the good request still works afterwards
    res = engine.branch([BranchRequest(g.handle, [1])], k=1, params=greedy)
    assert res[(g.handle, 1)][0].token_ids == g.token_ids[1:]
    engine.release()
    assert engine.num_free_pages == engine.num_pages


def test_update_weights_drops_kept_sequences(llama):
    eng = Engine(tiny("llama", 4, 2, seed=1), config=EngineConfig(num_pages=64, page_size=8))
    prompts = prompts_of([6, 9], seed=16)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (g,), _ = eng.generate(prompts, greedy, keep_alive=True)
    eng.update_weights(llama.state_dict())
    assert eng.num_free_pages == 64
    with pytest.raises(ValueError, match="unknown handle"):
        eng.branch([BranchRequest(g.handle, [0])], k=1, params=greedy)
    out = eng.generate(prompts, greedy)
    for p, (c,) in zip(prompts, out):
        assert c.token_ids == hf_greedy(llama, p, 8)
