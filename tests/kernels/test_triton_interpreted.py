"""Triton kernels against float64 references: on CPU through the Triton interpreter (fp32, fp16),
on CUDA (marked gpu) also in bf16. Fresh random shapes every run; every output and workspace is
filled with NaN before each launch so an element a kernel forgets to write fails the test."""

import random

import pytest
import torch

pytest.importorskip("triton")

import vinekernels as vk  # noqa: E402
from vinekernels._triton import launch  # noqa: E402
from kernel_cases import gather_tokens, make_problem, naive_attention, random_lens, rel_err  # noqa: E402

CPU_DTYPES = [torch.float32, torch.float16]  # bf16 tl.dot is wrong in the interpreter
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def _seed():
    return random.randrange(1 << 30)


def _case(device, dtype, seed, max_len=300, num_seqs=5):
    rng = random.Random(seed)
    page_size = rng.choice([8, 16, 32])
    head_dim = rng.choice([64, 80, 96, 128])
    num_kv_heads = rng.choice([1, 2])
    group = rng.choice([1, 3, 4, 8, 20, 72])  # 20: 64-row tiles; 72: several head blocks per KV head
    lens = random_lens(rng, num_seqs, page_size, max_len)
    prob = make_problem(seed, lens, page_size, num_kv_heads, group, head_dim, dtype)
    prob.k_cache, prob.v_cache = prob.k_cache.to(device), prob.v_cache.to(device)
    return rng, prob


def _decode(prob, q, lens, impl, extra_cols=0):
    return vk.paged_decode_attention(q, prob.k_cache, prob.v_cache, prob.block_tables(extra_cols).to(q.device),
                                     torch.tensor(lens, dtype=torch.int32, device=q.device), prob.scale, impl=impl)


def _check_decode(device, dtype):
    seed = _seed()
    rng, prob = _case(device, dtype, seed)
    lens = prob.seq_lens
    q = torch.randn(len(lens), prob.num_q_heads, prob.k_cache.shape[3]).to(device, dtype)
    out = _decode(prob, q, lens, "triton", extra_cols=rng.randint(0, 3))
    assert out.dtype == dtype and not torch.isnan(out).any(), f"seed {seed}"
    for b, n in enumerate(lens):
        k = gather_tokens(prob.k_cache.cpu(), prob.pages[b], n)
        v = gather_tokens(prob.v_cache.cpu(), prob.pages[b], n)
        expected, _ = naive_attention(q[b].cpu(), k, v, prob.scale)
        assert rel_err(out[b].cpu(), expected) < TOL[dtype], f"seed {seed} seq {b} len {n}"
    # batch invariance: each sequence alone (and with a wider block table) gives the same bits
    for b in rng.sample(range(len(lens)), 2):
        sub = make_sub_problem(prob, [b])
        alone = _decode(sub, q[b: b + 1], [lens[b]], "triton", extra_cols=rng.randint(0, 5))
        assert torch.equal(alone[0], out[b]), f"seed {seed}: sequence {b} changed with the batch"


def make_sub_problem(prob, rows):
    sub = type(prob)(prob.k_cache, prob.v_cache, [prob.pages[r] for r in rows], [prob.seq_lens[r] for r in rows],
                     prob.num_q_heads, prob.scale)
    return sub


def _check_prefill(device, dtype):
    seed = _seed()
    rng, prob = _case(device, dtype, seed, max_len=80, num_seqs=4)
    lens = prob.seq_lens
    q_lens = [rng.choice([0, 1, n, rng.randint(1, n)]) for n in lens]
    q_lens[0], q_lens[1] = lens[0], 1  # a whole-prompt prefill and a one-token extend
    loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(loc[-1]), prob.num_q_heads, prob.k_cache.shape[3]).to(device, dtype)
    out = vk.paged_prefill_attention(q, prob.k_cache, prob.v_cache, prob.block_tables().to(device), loc.to(device),
                                     torch.tensor(lens, dtype=torch.int32, device=device), prob.scale, impl="triton")
    assert not torch.isnan(out).any(), f"seed {seed}"
    for b, (n, ql) in enumerate(zip(lens, q_lens)):
        k = gather_tokens(prob.k_cache.cpu(), prob.pages[b], n)
        v = gather_tokens(prob.v_cache.cpu(), prob.pages[b], n)
        for j in range(ql):
            t, pos = int(loc[b]) + j, n - ql + j
            expected, _ = naive_attention(q[t].cpu(), k[: pos + 1], v[: pos + 1], prob.scale)
            assert rel_err(out[t].cpu(), expected) < TOL[dtype], f"seed {seed} seq {b} token {j}"


def _tree_case(device, dtype, seed):
    """Trajectories with branches: prompt and trajectory prefixes shared, suffixes private
    (some empty, some one token, some at page boundaries), plus unrelated sequences."""
    rng = random.Random(seed)
    page_size = rng.choice([8, 16])
    head_dim = rng.choice([64, 96])
    num_kv_heads, group = rng.choice([(1, 4), (2, 2), (2, 1), (1, 24)])
    gen = torch.Generator().manual_seed(seed)
    num_pages = 160
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(device, dtype)
    v_cache = torch.randn(shape, generator=gen).to(device, dtype)
    free = torch.randperm(num_pages, generator=gen).tolist()
    seg_pages, seg_lens, queries = [], [], []

    def add(n):
        seg_pages.append([free.pop() for _ in range(-(-n // page_size))])
        seg_lens.append(n)
        return len(seg_lens) - 1

    prompt = add(page_size * rng.randint(2, 5))
    for _ in range(rng.randint(1, 2)):
        prefix = add(page_size * rng.randint(0, 3) + rng.choice([0, 0, 5]))
        for _ in range(rng.randint(2, 5)):
            queries.append([prompt, prefix, add(rng.choice([0, 1, page_size, rng.randint(1, 40)]))])
    queries.append([add(rng.randint(1, 50))])
    rng.shuffle(queries)
    return k_cache, v_cache, seg_pages, seg_lens, queries, num_kv_heads * group


def _check_tree(device, dtype):
    seed = _seed()
    k_cache, v_cache, seg_pages, seg_lens, queries, num_q_heads = _tree_case(device, dtype, seed)
    page_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    q = torch.randn(len(queries), num_q_heads, head_dim).to(device, dtype)
    rng = random.Random(seed)
    plan = vk.plan_tree_decode(seg_pages, seg_lens, queries, page_size, device, min_shared_len=page_size,
                               chunk_size=rng.choice([64, 256]), shared_chunk_size=rng.choice([32, 512]))
    assert plan.num_shared_runs >= 1
    out = vk.tree_decode_attention(q, k_cache, v_cache, plan, 0.125, impl="triton")
    assert not torch.isnan(out).any(), f"seed {seed}"
    for i, segs in enumerate(queries):
        k = torch.cat([gather_tokens(k_cache.cpu(), seg_pages[s], seg_lens[s]) for s in segs])
        v = torch.cat([gather_tokens(v_cache.cpu(), seg_pages[s], seg_lens[s]) for s in segs])
        expected, _ = naive_attention(q[i].cpu(), k, v, 0.125)
        assert rel_err(out[i].cpu(), expected) < TOL[dtype], f"seed {seed} query {i}"
    # the same query planned on its own (nothing shared: one private run) agrees
    alone = vk.plan_tree_decode(seg_pages, seg_lens, [queries[0]], page_size, device, min_shared_len=page_size)
    single = vk.tree_decode_attention(q[:1], k_cache, v_cache, alone, 0.125, impl="triton")
    assert rel_err(single[0].cpu(), out[0].cpu()) < TOL[dtype]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_decode_interpreted(dtype):
    for _ in range(3):
        _check_decode("cpu", dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_prefill_interpreted(dtype):
    for _ in range(2):
        _check_prefill("cpu", dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_tree_interpreted(dtype):
    for _ in range(3):
        _check_tree("cpu", dtype)


def test_tree_without_sharing_is_bitwise_plain_decode():
    """Private runs go through the decode kernel's own code path: identical bits."""
    seed = _seed()
    _, prob = _case("cpu", torch.float16, seed, max_len=300, num_seqs=4)
    q = torch.randn(len(prob.seq_lens), prob.num_q_heads, prob.k_cache.shape[3]).half()
    plan = vk.plan_tree_decode(prob.pages, prob.seq_lens, [[i] for i in range(len(prob.pages))],
                               prob.k_cache.shape[1], "cpu")
    tree = vk.tree_decode_attention(q, prob.k_cache, prob.v_cache, plan, prob.scale, impl="triton")
    plain = _decode(prob, q, prob.seq_lens, "triton")
    assert torch.equal(tree, plain), f"seed {seed}"


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_tree_equals_paged_decode_interpreted(dtype):
    """K branches over a page-aligned shared prefix: tree decode == plain paged decode."""
    seed = _seed()
    rng = random.Random(seed)
    page_size, prefix_pages = 8, rng.randint(8, 12)
    k_branches = rng.randint(2, 5)
    suffix_lens = [rng.choice([0, 1, page_size, rng.randint(1, 30)]) for _ in range(k_branches)]
    gen = torch.Generator().manual_seed(seed)
    num_pages = prefix_pages + 4 * k_branches
    k_cache = torch.randn(num_pages, page_size, 2, 64, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, page_size, 2, 64, generator=gen).to(dtype)
    prefix = list(range(prefix_pages))
    suffixes = [list(range(prefix_pages + 4 * i, prefix_pages + 4 * i + 4)) for i in range(k_branches)]
    lens = [prefix_pages * page_size + n for n in suffix_lens]
    tables = torch.tensor([prefix + s for s in suffixes], dtype=torch.int32)
    q = torch.randn(k_branches, 8, 64, generator=gen).to(dtype)
    plan = vk.plan_tree_decode([prefix] + suffixes, [prefix_pages * page_size] + suffix_lens,
                               [[0, 1 + i] for i in range(k_branches)], page_size, "cpu")
    assert plan.num_shared_runs == 1 and plan.kv_tokens_read == prefix_pages * page_size + sum(suffix_lens)
    tree = vk.tree_decode_attention(q, k_cache, v_cache, plan, 0.125, impl="triton")
    plain = vk.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32), 0.125,
                                      impl="triton")
    assert rel_err(tree, plain) < TOL[dtype], f"seed {seed}"


def test_merge_lse_interpreted():
    gen = torch.Generator().manual_seed(_seed())
    counts = [3, 0, 1, 5]
    indptr = torch.tensor([0] + counts).cumsum(0).to(torch.int32)
    n = int(indptr[-1])
    part = torch.randn(n, 5, 80, generator=gen)
    lse = torch.randn(n, 5, generator=gen) * 3
    lse[0, 1] = float("-inf")  # an empty partial inside a non-empty set
    out, out_lse = vk.merge_lse(part, lse, indptr, out_dtype=torch.float16, impl="triton")
    ref, ref_lse = vk.merge_lse(part.double(), lse.double(), indptr)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < 2e-3
    assert torch.all(out[1] == 0) and torch.all(torch.isneginf(out_lse[1]))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(out_lse[finite].double(), ref_lse[finite], atol=1e-5)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_store_kv_and_copy_pages_interpreted(dtype):
    gen = torch.Generator().manual_seed(_seed())
    caches = [torch.randn(7, 8, 2, 64, generator=gen).to(dtype) for _ in range(4)]
    expected = [c.clone() for c in caches]
    # k is a strided view (as when split out of a fused qkv projection)
    kv = torch.randn(6, 2, 2, 64, generator=gen).to(dtype)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.tensor([3, -1, 8, 55, 17, 0], dtype=torch.int64)
    vk.store_kv(k, v, caches[0], caches[1], slots, impl="triton")
    vk.store_kv(k, v, expected[0], expected[1], slots, impl="torch")
    src, dst = torch.tensor([1, 6, 2]), torch.tensor([4, 0, 5])
    vk.copy_pages(caches[:2], caches[2:], src, dst, impl="triton")
    vk.copy_pages(expected[:2], expected[2:], src, dst, impl="torch")
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


# ---- GPU (compiled kernels; bf16 too) ----

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("check", [_check_decode, _check_prefill, _check_tree], ids=["decode", "prefill", "tree"])
def test_kernels_gpu(check, dtype):
    for _ in range(3):
        check("cuda", dtype)


@pytest.mark.gpu
def test_decode_batch_invariance_large_batch_gpu():
    seed = _seed()
    rng, prob = _case("cuda", torch.bfloat16, seed, max_len=3000, num_seqs=64)
    q = torch.randn(64, prob.num_q_heads, prob.k_cache.shape[3], device="cuda", dtype=torch.bfloat16)
    out = _decode(prob, q, prob.seq_lens, "triton")
    for b in rng.sample(range(64), 8):
        alone = _decode(make_sub_problem(prob, [b]), q[b: b + 1], [prob.seq_lens[b]], "triton")
        assert torch.equal(alone[0], out[b])
