"""The torch references (the CPU path of every vinekernels op) against naive float64 attention,
the tree planner, and input validation. Triton kernels are tested in test_triton_interpreted.py."""

import random

import pytest
import torch

import vinekernels as vk
from kernel_cases import gather_tokens, make_problem, naive_attention, random_lens, rel_err


def _seed():
    return random.randrange(1 << 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_reference_matches_naive(dtype):
    seed = _seed()
    rng = random.Random(seed)
    page_size = rng.choice([4, 8, 16])
    group = rng.choice([1, 2, 3, 8])
    lens = random_lens(rng, 7, page_size, 70)
    prob = make_problem(seed, lens, page_size, 2, group, 16, dtype)
    q = torch.randn(len(lens), prob.num_q_heads, 16).to(dtype)
    out = vk.paged_decode_attention(q, prob.k_cache, prob.v_cache, prob.block_tables(2),
                                    torch.tensor(lens, dtype=torch.int32), prob.scale)
    for b, n in enumerate(lens):
        k = gather_tokens(prob.k_cache, prob.pages[b], n)
        v = gather_tokens(prob.v_cache, prob.pages[b], n)
        expected, _ = naive_attention(q[b], k, v, prob.scale)
        assert rel_err(out[b], expected) < (1e-12 if dtype == torch.float64 else 1e-5), f"seed {seed} seq {b}"


def test_prefill_reference_matches_naive():
    seed = _seed()
    rng = random.Random(seed)
    page_size = rng.choice([4, 8])
    lens = random_lens(rng, 5, page_size, 40)
    q_lens = [rng.randint(0, n) for n in lens]
    q_lens[0] = lens[0]  # a plain prefill with no cached context
    prob = make_problem(seed, lens, page_size, 2, 2, 8, torch.float64)
    loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(loc[-1]), prob.num_q_heads, 8, dtype=torch.float64)
    out = vk.paged_prefill_attention(q, prob.k_cache, prob.v_cache, prob.block_tables(),
                                     loc, torch.tensor(lens, dtype=torch.int32), prob.scale)
    for b, (n, ql) in enumerate(zip(lens, q_lens)):
        k = gather_tokens(prob.k_cache, prob.pages[b], n)
        v = gather_tokens(prob.v_cache, prob.pages[b], n)
        for j in range(ql):
            pos = n - ql + j
            expected, _ = naive_attention(q[int(loc[b]) + j], k[: pos + 1], v[: pos + 1], prob.scale)
            assert rel_err(out[int(loc[b]) + j], expected) < 1e-12, f"seed {seed} seq {b} token {j}"


def test_prefill_reference_one_token_per_sequence():
    """One-token extends (forked continuations) take the decode path: same as the naive oracle."""
    seed = _seed()
    rng = random.Random(seed)
    lens = random_lens(rng, 6, 8, 45)
    prob = make_problem(seed, lens, 8, 2, 3, 16, torch.float32)
    q = torch.randn(len(lens), prob.num_q_heads, 16)
    loc = torch.arange(len(lens) + 1, dtype=torch.int32)
    out = vk.paged_prefill_attention(q, prob.k_cache, prob.v_cache, prob.block_tables(1), loc,
                                     torch.tensor(lens, dtype=torch.int32), prob.scale)
    for b, n in enumerate(lens):
        expected, _ = naive_attention(q[b], gather_tokens(prob.k_cache, prob.pages[b], n),
                                      gather_tokens(prob.v_cache, prob.pages[b], n), prob.scale)
        assert rel_err(out[b], expected) < 1e-5, f"seed {seed} seq {b}"


def test_prefill_reference_chunks_large_batches(monkeypatch):
    """Chunking of the padded score tensor changes nothing."""
    import vinekernels.reference as ref

    seed = _seed()
    rng = random.Random(seed)
    lens = random_lens(rng, 6, 8, 50)
    q_lens = [rng.randint(1, n) for n in lens]
    prob = make_problem(seed, lens, 8, 2, 2, 8, torch.float64)
    loc = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    q = torch.randn(int(loc[-1]), prob.num_q_heads, 8, dtype=torch.float64)
    args = (q, prob.k_cache, prob.v_cache, prob.block_tables(), loc, torch.tensor(lens, dtype=torch.int32), prob.scale)
    full = vk.paged_prefill_attention(*args)
    monkeypatch.setattr(ref, "_SCORE_BUDGET", 64)
    chunked = vk.paged_prefill_attention(*args)
    assert torch.allclose(full, chunked, rtol=0, atol=1e-12)


def _tree_problem(seed, dtype, page_size=8, group=2, head_dim=16):
    """Several trajectories, each with branches; segments: prompt, per-trajectory prefix, suffix."""
    rng = random.Random(seed)
    num_pages = 200
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_pages, page_size, 2, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages, page_size, 2, head_dim, generator=gen).to(dtype)
    free = torch.randperm(num_pages, generator=gen).tolist()

    def pages_for(n):
        return [free.pop() for _ in range(-(-n // page_size))]

    segment_pages, segment_lens, query_segments = [], [], []

    def add(n):
        segment_pages.append(pages_for(n))
        segment_lens.append(n)
        return len(segment_lens) - 1

    prompt = add(rng.choice([page_size, 3 * page_size, 2 * page_size]))  # page-aligned shared prompt
    for _ in range(rng.randint(1, 3)):
        prefix = add(page_size * rng.randint(1, 3))
        for _ in range(rng.randint(1, 4)):
            n = rng.choice([0, 1, page_size - 1, page_size, rng.randint(1, 3 * page_size)])
            query_segments.append([prompt, prefix, add(n)])
    query_segments.append([add(rng.randint(1, 20))])  # an unrelated sequence
    return k_cache, v_cache, segment_pages, segment_lens, query_segments


@pytest.mark.parametrize("min_shared_len", [0, 64])
def test_tree_reference_matches_naive(min_shared_len):
    seed = _seed()
    k_cache, v_cache, seg_pages, seg_lens, query_segs = _tree_problem(seed, torch.float64)
    plan = vk.plan_tree_decode(seg_pages, seg_lens, query_segs, 8, "cpu", min_shared_len=min_shared_len)
    q = torch.randn(len(query_segs), 4, 16, dtype=torch.float64)
    out = vk.tree_decode_attention(q, k_cache, v_cache, plan, 0.25)
    for i, segs in enumerate(query_segs):
        k = torch.cat([gather_tokens(k_cache, seg_pages[s], seg_lens[s]) for s in segs])
        v = torch.cat([gather_tokens(v_cache, seg_pages[s], seg_lens[s]) for s in segs])
        expected, _ = naive_attention(q[i], k, v, 0.25)
        assert rel_err(out[i], expected) < 1e-12, f"seed {seed} query {i}"


def test_plan_shares_long_segments_and_inlines_short_ones():
    ps = 8
    # segment 0: 16-token prompt shared by 3 queries; segment 1: 4-token shared tail (too short);
    # segments 2-4: private suffixes (one empty).
    seg_pages = [[0, 1], [2], [3], [4], [5, 6]]
    seg_lens = [16, 4, 5, 0, 9]
    queries = [[0, 1, 2], [0, 1, 3], [0, 4]]
    plan = vk.plan_tree_decode(seg_pages, seg_lens, queries, ps, "cpu", min_shared_len=16)
    host = plan.host
    assert plan.num_shared_runs == 1 and host.run_lens[0] == 16 and host.run_shared[0]
    # query 0: shared run + private run of segment 1 (4 tokens, not page-aligned) then segment 2
    assert plan.num_runs == 1 + 2 + 1 + 1
    assert plan.kv_tokens_read == 16 + 4 + 5 + 4 + 9
    assert plan.query_lens == [25, 20, 25]
    assert plan.num_partials == 2 + 2 + 1 + 2
    assert plan.partial_indptr.tolist() == [0, 3, 5, 7]
    # a page-aligned private segment is concatenated with the following one
    plan2 = vk.plan_tree_decode([[0, 1], [2, 3]], [16, 10], [[0, 1]], ps, "cpu")
    assert plan2.num_runs == 1 and plan2.host.run_pages == [[0, 1, 2, 3]] and plan2.host.run_lens == [26]
    # with the default threshold nothing this short is shared
    plan3 = vk.plan_tree_decode(seg_pages, seg_lens, queries, ps, "cpu")
    assert plan3.num_shared_runs == 0
    assert plan3.kv_tokens_read == sum(plan3.query_lens)


def test_merge_lse_reference_matches_joint_softmax():
    gen = torch.Generator().manual_seed(_seed())
    # split one softmax over 30 scores into ragged parts and merge them back
    counts = [3, 1, 0, 4]
    s = torch.randn(8, 2, 30, generator=gen, dtype=torch.float64)
    vals = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    outs, lses = [], []
    for b in range(8):
        n = counts[b % 4]
        if n == 0:
            continue
        edges = [0] + sorted(random.sample(range(1, 30), n - 1)) + [30] if n > 1 else [0, 30]
        for a, c in zip(edges[:-1], edges[1:]):
            part = s[b, :, a:c]
            lses.append(torch.logsumexp(part, -1))
            outs.append(torch.softmax(part, -1) @ vals[a:c])
    indptr = torch.tensor([0] + [counts[b % 4] for b in range(8)]).cumsum(0).to(torch.int32)
    out, lse = vk.merge_lse(torch.stack(outs), torch.stack(lses), indptr)
    for b in range(8):
        if counts[b % 4] == 0:
            assert torch.all(out[b] == 0) and torch.all(torch.isneginf(lse[b]))
        else:
            assert torch.allclose(out[b], torch.softmax(s[b], -1) @ vals, atol=1e-12)
            assert torch.allclose(lse[b], torch.logsumexp(s[b], -1), atol=1e-12)


def test_store_kv_and_copy_pages_reference():
    gen = torch.Generator().manual_seed(_seed())
    k_cache = torch.zeros(6, 4, 2, 8)
    v_cache = torch.zeros(6, 4, 2, 8)
    k = torch.randn(5, 2, 8, generator=gen)
    v = torch.randn(5, 2, 8, generator=gen)
    slots = torch.tensor([0, 7, -1, 13, 23], dtype=torch.int64)
    vk.store_kv(k, v, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(k_cache[s // 4, s % 4], k[t]) and torch.equal(v_cache[s // 4, s % 4], v[t])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 4
    k2, v2 = k_cache.clone(), v_cache.clone()
    vk.copy_pages([k_cache, k2], [v_cache, v2], torch.tensor([1, 3]), torch.tensor([4, 0]))
    for cache in (k_cache, k2, v_cache, v2):
        assert torch.equal(cache[4], cache[1]) and torch.equal(cache[0], cache[3])


def _decode_args():
    k_cache = torch.zeros(4, 8, 2, 16)
    return dict(q=torch.zeros(2, 4, 16), k_cache=k_cache, v_cache=torch.zeros_like(k_cache),
                block_tables=torch.zeros(2, 2, dtype=torch.int32), seq_lens=torch.tensor([3, 9], dtype=torch.int32),
                scale=0.25)


@pytest.mark.parametrize("change, message", [
    (dict(q=torch.zeros(2, 3, 16)), "multiple of the number of KV heads"),
    (dict(q=torch.zeros(2, 4, 8)), "head_dim"),
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.float16)), "dtype"),
    (dict(v_cache=torch.zeros(4, 8, 2, 8)), "same shape"),
    (dict(block_tables=torch.zeros(2, 2, dtype=torch.int64)), "block_tables must have dtype"),
    (dict(seq_lens=torch.tensor([3, 17], dtype=torch.int32)), "exceeds"),
    (dict(seq_lens=torch.tensor([0, 1], dtype=torch.int32)), ">= 1"),
    (dict(seq_lens=torch.tensor([3], dtype=torch.int32)), "one per sequence"),
    (dict(block_tables=torch.tensor([[0, 0], [1, 4]], dtype=torch.int32)), "outside"),
    (dict(scale=-1.0), "scale"),
])
def test_decode_validation(change, message):
    args = {**_decode_args(), **change}
    with pytest.raises(ValueError, match=message):
        vk.paged_decode_attention(**args)


def test_triton_only_limits_are_checked():
    args = _decode_args()  # head_dim 16 is fine for the reference, not for the kernels
    vk.paged_decode_attention(**args)
    with pytest.raises(ValueError, match="head_dim must be one of"):
        vk.paged_decode_attention(**args, impl="triton")
    k_cache = torch.zeros(4, 4, 2, 64)
    with pytest.raises(ValueError, match="page_size must be in"):
        vk.paged_decode_attention(torch.zeros(2, 4, 64), k_cache, k_cache, args["block_tables"],
                                  torch.tensor([3, 4], dtype=torch.int32), 0.1, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        vk.paged_decode_attention(**args, impl="cuda")


def test_other_validation():
    k_cache = torch.zeros(4, 8, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping values"):
        vk.store_kv(torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), k_cache, k_cache.clone(),
                    torch.tensor([32], dtype=torch.int64))
    with pytest.raises(ValueError, match="same slot twice"):
        vk.store_kv(torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), k_cache, k_cache.clone(),
                    torch.tensor([3, 3], dtype=torch.int64))
    with pytest.raises(ValueError, match="must be \\[T, 2, 16\\]"):
        vk.store_kv(torch.zeros(1, 1, 16), torch.zeros(1, 1, 16), k_cache, k_cache.clone(),
                    torch.tensor([0], dtype=torch.int64))
    with pytest.raises(ValueError, match="race"):
        vk.copy_pages([k_cache], [k_cache.clone()], torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dst pages"):
        vk.copy_pages([k_cache], [k_cache.clone()], torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(ValueError, match="more new tokens"):
        vk.paged_prefill_attention(torch.zeros(5, 4, 16), k_cache, k_cache.clone(), torch.zeros(1, 2, dtype=torch.int32),
                                   torch.tensor([0, 5], dtype=torch.int32), torch.tensor([4], dtype=torch.int32), 0.2)
    with pytest.raises(ValueError, match="end at T"):
        vk.paged_prefill_attention(torch.zeros(5, 4, 16), k_cache, k_cache.clone(), torch.zeros(1, 2, dtype=torch.int32),
                                   torch.tensor([0, 4], dtype=torch.int32), torch.tensor([9], dtype=torch.int32), 0.2)
    with pytest.raises(ValueError, match="indptr must start at 0"):
        vk.merge_lse(torch.zeros(3, 2, 4), torch.zeros(3, 2), torch.tensor([0, 2, 1], dtype=torch.int32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(segment_pages=[[0]], segment_lens=[9]), "needs 2 pages"),
    (dict(query_segments=[[0, 0]]), "more than once"),
    (dict(query_segments=[[2]]), "references segment"),
    (dict(segment_lens=[0]), "no KV tokens"),
    (dict(query_segments=[]), "at least one query"),
    (dict(segment_pages=[[-1]]), "invalid page"),
])
def test_plan_validation(kwargs, message):
    args = dict(segment_pages=[[0]], segment_lens=[5], query_segments=[[0]], page_size=8, device="cpu")
    with pytest.raises(ValueError, match=message):
        vk.plan_tree_decode(**{**args, **kwargs})


def test_tree_attention_validation():
    k_cache = torch.zeros(4, 8, 2, 16)
    plan = vk.plan_tree_decode([[3]], [5], [[0]], 8, "cpu")
    with pytest.raises(ValueError, match="plan has 1"):
        vk.tree_decode_attention(torch.zeros(2, 2, 16), k_cache, k_cache, plan, 0.1)
    with pytest.raises(ValueError, match="page size"):
        vk.tree_decode_attention(torch.zeros(1, 2, 16), torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16), plan, 0.1)
    with pytest.raises(ValueError, match="references page 3"):
        vk.tree_decode_attention(torch.zeros(1, 2, 16), torch.zeros(2, 8, 2, 16), torch.zeros(2, 8, 2, 16), plan, 0.1)


def _forest_problem(rng: random.Random, gen: torch.Generator, page_size: int, aligned: bool):
    """A random prefix forest: prompts shared by trajectories, trajectory prefixes shared by their
    branches (several levels, different lengths and query counts), private suffixes, and an
    unrelated sequence. With `aligned`, every segment but a query's last is whole pages, so each
    query's pages also form a plain block table."""
    num_pages = 600
    free = torch.randperm(num_pages, generator=gen).tolist()
    seg_pages, seg_lens, queries = [], [], []

    def add(n):
        if aligned and n % page_size:
            n = max(page_size, n - n % page_size)
        seg_pages.append([free.pop() for _ in range(-(-n // page_size))])
        seg_lens.append(n)
        return len(seg_lens) - 1

    def suffix():
        n = rng.choice([1, page_size - 1, page_size, page_size + 1, rng.randint(1, 4 * page_size)])
        seg_pages.append([free.pop() for _ in range(-(-n // page_size))])
        seg_lens.append(n)
        return len(seg_lens) - 1

    for _ in range(rng.randint(1, 3)):                      # prompts
        prompt = add(rng.randint(1, 4) * page_size + rng.choice([0, 3]))
        for _ in range(rng.randint(1, 3)):                  # trajectories
            traj = add(rng.randint(1, 3) * page_size + rng.choice([0, 5]))
            for _ in range(rng.randint(1, 3)):              # boundaries inside the trajectory
                step = add(rng.randint(1, 2) * page_size)
                for _ in range(rng.randint(1, 6)):          # branches
                    queries.append([prompt, traj, step, suffix()])
            queries.append([prompt, traj, suffix()])         # the trajectory itself
    queries.append([suffix()])                               # an unrelated sequence
    rng.shuffle(queries)
    return seg_pages, seg_lens, queries


@pytest.mark.parametrize("group", [1, 3])
def test_tree_reference_equals_paged_decode_on_random_forests(group):
    """The vectorised tree reference (all shared runs gathered once, one masked attention per
    group of runs, padded merge) equals plain paged decode and the float64 oracle."""
    seed = _seed()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    page_size, num_kv_heads, head_dim = rng.choice([4, 8, 16]), 2, 16
    seg_pages, seg_lens, queries = _forest_problem(rng, gen, page_size, aligned=True)
    k_cache = torch.randn(600, page_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(600, page_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(len(queries), num_kv_heads * group, head_dim, generator=gen)
    tables = [[p for s in segs for p in seg_pages[s]] for segs in queries]
    lens = [sum(seg_lens[s] for s in segs) for segs in queries]
    width = max(map(len, tables))
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    plain = vk.paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lens, dtype=torch.int32), 0.3)
    for min_shared_len in (0, page_size, 64):
        plan = vk.plan_tree_decode(seg_pages, seg_lens, queries, page_size, "cpu", min_shared_len=min_shared_len)
        out = vk.tree_decode_attention(q, k_cache, v_cache, plan, 0.3)
        if min_shared_len == 0:  # prompts, trajectories and steps shared: 3 or 4 partials per branch
            layout = next(v for k, v in plan.reference_cache.items() if k[0] == "layout")
            assert plan.num_shared_runs >= 3 and layout.max_partials >= 3
        assert rel_err(out, plain) < 1e-5, f"seed {seed} min_shared_len {min_shared_len}"
    for i in rng.sample(range(len(queries)), min(6, len(queries))):
        expected, _ = naive_attention(q[i], gather_tokens(k_cache, tables[i], lens[i]),
                                      gather_tokens(v_cache, tables[i], lens[i]), 0.3)
        assert rel_err(out[i], expected) < 1e-5, f"seed {seed} query {i}"


@pytest.mark.parametrize("chunk_elems", [None, 1 << 9])
def test_tree_reference_matches_float64_oracle_with_lse(monkeypatch, chunk_elems):
    """Unaligned shared segments, float64: output and log-sum-exp equal the naive oracle; tiny
    chunks (many chunks per group) change nothing."""
    import vinekernels.reference as ref

    if chunk_elems is not None:
        monkeypatch.setattr(ref, "_CHUNK_ELEMS", chunk_elems)
    seed = _seed()
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    page_size = rng.choice([4, 8])
    seg_pages, seg_lens, queries = _forest_problem(rng, gen, page_size, aligned=False)
    k_cache = torch.randn(600, page_size, 2, 8, generator=gen, dtype=torch.float64)
    v_cache = torch.randn(600, page_size, 2, 8, generator=gen, dtype=torch.float64)
    q = torch.randn(len(queries), 4, 8, generator=gen, dtype=torch.float64)
    plan = vk.plan_tree_decode(seg_pages, seg_lens, queries, page_size, "cpu", min_shared_len=0)
    out, lse = ref.tree_decode_ref(q, k_cache, v_cache, plan, 0.4, return_lse=True)
    for i, segs in enumerate(queries):
        k = torch.cat([gather_tokens(k_cache, seg_pages[s], seg_lens[s]) for s in segs])
        v = torch.cat([gather_tokens(v_cache, seg_pages[s], seg_lens[s]) for s in segs])
        expected, expected_lse = naive_attention(q[i], k, v, 0.4)
        assert rel_err(out[i], expected) < 1e-12, f"seed {seed} query {i}"
        assert torch.allclose(lse[i], expected_lse, atol=1e-12, rtol=0), f"seed {seed} query {i}"


def test_grown_tree_plan_equals_fresh_plan():
    """A decode step that stays within its pages reuses the previous plan (grown by one token per
    query) and its reference layout; the result is bitwise that of planning afresh."""
    from vineppo.engine.tree_plan import build_tree_segments

    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    page_size = 8
    prefix = [10, 11, 12]                              # 24 shared tokens
    tables = [prefix + [20 + i, 40 + i] for i in range(5)] + [[60, 61]]
    lens = [24 + 9, 24 + 9, 24 + 10, 24 + 12, 24 + 9, 13]
    k_cache = torch.randn(80, page_size, 2, 16, generator=gen)
    v_cache = torch.randn(80, page_size, 2, 16, generator=gen)
    q = torch.randn(len(tables), 4, 16, generator=gen)

    def fresh(seq_lens):
        segs = build_tree_segments(tables, seq_lens, page_size, min_queries=2, min_tokens=8)
        return vk.plan_tree_decode(segs.segment_pages, segs.segment_lens, segs.query_segments, page_size,
                                   "cpu", min_shared_len=8)

    plan = fresh(lens)
    assert plan.num_shared_runs == 1
    vk.tree_decode_attention(q, k_cache, v_cache, plan, 0.25)      # builds the reference layout
    grown = vk.grow_tree_plan(plan, vk.tree_plan_tails(plan))
    lens1 = [n + 1 for n in lens]
    assert grown.host.run_lens == fresh(lens1).host.run_lens and grown.query_lens == lens1
    assert torch.equal(vk.tree_decode_attention(q, k_cache, v_cache, grown, 0.25),
                       vk.tree_decode_attention(q, k_cache, v_cache, fresh(lens1), 0.25))
    block_tables = torch.tensor([t + [0] * (5 - len(t)) for t in tables], dtype=torch.int32)
    plain = vk.paged_decode_attention(q, k_cache, v_cache, block_tables, torch.tensor(lens1, dtype=torch.int32), 0.25)
    assert rel_err(vk.tree_decode_attention(q, k_cache, v_cache, grown, 0.25), plain) < 1e-5
    # query 3 fills its last page (24 + 16 tokens): one more token needs a new page, so no growing
    full = fresh([24 + 16 if i == 3 else n for i, n in enumerate(lens1)])
    assert vk.grow_tree_plan(full, vk.tree_plan_tails(full)) is None
