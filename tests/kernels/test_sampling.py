"""Fused sampling (vinekernels.sampling): the torch reference against a plain float64
implementation, the counter-based hash, determinism, edge cases, and the CUDA kernel on GPU."""

import math
import random

import pytest
import torch

from vinekernels.sampling import (derive_seed, kept_log_mass, processed_logprobs, sample_tokens,
                                  uniform_from_seed, uniform_from_seed_python)
from vinekernels._ext import load_extension


def _params(b, temperature=1.0, top_k=0, top_p=1.0, seed=0, offset=0, device="cpu"):
    def full(v, dtype):
        return v.to(device) if torch.is_tensor(v) else torch.full((b,), v, dtype=dtype, device=device)
    return dict(temperature=full(temperature, torch.float32), top_k=full(top_k, torch.int32),
                top_p=full(top_p, torch.float32), seeds=full(seed, torch.int64),
                offsets=full(offset, torch.int64))


def _probs64(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Straightforward float64 processed distribution of one row: sort, cut, renormalise.

    The scaled logits are the float32 values the sampler compares (logits.float() / T)."""
    t = 1.0 if temperature == 0 else temperature
    x32 = row.float() / torch.tensor(t, dtype=torch.float32)
    x = x32.double()
    p = torch.softmax(x, 0)
    if temperature == 0:
        return p
    vals, order = torch.sort(x, descending=True, stable=True)
    keep = torch.ones_like(x, dtype=torch.bool)
    if 0 < top_k < len(x):
        keep &= x >= vals[top_k - 1]
    if top_p < 1.0:
        q = torch.where(keep, p, 0.0)
        q = q / q.sum()
        cum = torch.cumsum(q[order], 0)
        m = int((cum < float(torch.tensor(top_p, dtype=torch.float32))).sum())  # first cum >= p
        keep &= x >= vals[min(m, len(x) - 1)]
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


def _random_case(b, v, gen, dtype=torch.float32):
    logits = (torch.randn(b, v, generator=gen) * random.uniform(0.5, 4.0)).to(dtype)
    temperature = torch.tensor([random.choice([0.0, 0.3, 0.7, 1.0, 1.5]) for _ in range(b)])
    top_k = torch.tensor([random.choice([0, 0, 1, 2, 5, v // 3, v, v + 7]) for _ in range(b)],
                         dtype=torch.int32)
    top_p = torch.tensor([random.choice([1.0, 1.0, 0.9, 0.5, 0.95, 1e-6]) for _ in range(b)])
    seeds = torch.randint(-2**62, 2**62, (b,), generator=gen)
    offsets = torch.randint(0, 10_000, (b,), generator=gen)
    return logits, dict(temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds,
                        offsets=offsets)


# ---------------------------------------------------------------- hash and seeds
def test_uniform_hash_torch_matches_python():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    seeds = torch.cat([torch.randint(-2**63, 2**63 - 1, (500,), generator=gen),
                       torch.tensor([0, 1, -1, 2**63 - 1, -2**63])])
    offsets = torch.cat([torch.randint(0, 2**40, (500,), generator=gen),
                         torch.tensor([0, 2**63 - 1, 5, 0, 1])])
    u = uniform_from_seed(seeds, offsets)
    assert u.dtype == torch.float32
    expected = [uniform_from_seed_python(s, o) for s, o in zip(seeds.tolist(), offsets.tolist())]
    assert u.tolist() == expected
    assert bool((u >= 0).all()) and bool((u < 1).all())


def test_uniform_hash_is_uniform_over_offsets():
    u = uniform_from_seed(torch.full((20000,), 1234), torch.arange(20000)).double()
    assert abs(u.mean().item() - 0.5) < 0.01
    hist = torch.histc(u, bins=10, min=0, max=1) / len(u)
    assert float((hist - 0.1).abs().max()) < 0.01
    # neighbouring seeds give unrelated streams
    v = uniform_from_seed(torch.full((20000,), 1235), torch.arange(20000)).double()
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.03


def test_derive_seed():
    a = derive_seed(7, 3, 0)
    assert a == derive_seed(7, 3, 0)
    assert 0 <= a < 2**63
    others = {derive_seed(7, 3, j) for j in range(1000)} | {derive_seed(3, 7, 0), derive_seed(7, 3)}
    assert len(others) == 1002
    assert derive_seed(-1) != derive_seed(1)
    with pytest.raises(ValueError):
        derive_seed(1.5)


# ---------------------------------------------------------------- reference vs float64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_float64(dtype):
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    for _ in range(3):
        b, v = random.randint(1, 24), random.randint(2, 300)
        logits, p = _random_case(b, v, gen, dtype)
        tokens, logprobs = sample_tokens(logits, impl="torch", **p)
        lp = processed_logprobs(logits, p["temperature"], p["top_k"], p["top_p"])
        assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
        for i in range(b):
            q = _probs64(logits[i], p["temperature"][i].item(), p["top_k"][i].item(),
                         p["top_p"][i].item())
            kept = q > 0
            assert torch.equal(torch.isfinite(lp[i]), kept), f"row {i}: kept set differs"
            torch.testing.assert_close(lp[i][kept].double(), q[kept].log(), atol=1e-5, rtol=0)
            tok = tokens[i].item()
            assert kept[tok], f"row {i}: sampled token {tok} is outside the kept set"
            assert abs(logprobs[i].item() - math.log(q[tok].item())) < 1e-5
            if p["temperature"][i] == 0:
                x = logits[i].float()
                assert tok == int(torch.nonzero(x == x.max())[0])


@pytest.mark.parametrize("candidates", [1, 4, 64])
def test_kept_log_mass_links_sampled_and_unfiltered_logprobs(candidates):
    """log_softmax(x / T)[token] - kept_log_mass is the logprob the sampler returns, whether the
    top-p threshold is found among the candidates or by the full sort."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    b, v = 64, random.randint(2, 300)
    logits, p = _random_case(b, v, gen)
    tokens, logprobs = sample_tokens(logits, impl="torch", **p)
    mass = kept_log_mass(logits, p["temperature"], p["top_k"], p["top_p"], candidates=candidates)
    assert mass.shape == (b,) and mass.dtype == torch.float32
    for i in range(b):
        t = p["temperature"][i].item()
        full = torch.softmax(logits[i].float().double() / (1.0 if t == 0 else t), 0)
        kept = _probs64(logits[i], t, p["top_k"][i].item(), p["top_p"][i].item()) > 0
        expected = 0.0 if t == 0 else math.log(full[kept].sum().item())
        assert abs(mass[i].item() - expected) < 1e-5
        tok = tokens[i].item()
        assert abs(math.log(full[tok].item()) - mass[i].item() - logprobs[i].item()) < 1e-5


def test_empirical_distribution_matches_processed_probs():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    v, n = 12, 30000
    for temperature, top_k, top_p in [(0.8, 8, 0.9), (1.0, 0, 1.0), (1.3, 0, 0.7)]:
        row = torch.randn(v, generator=gen) * 1.5
        q = _probs64(row, temperature, top_k, top_p)
        seed = random.randrange(2**62)
        params = _params(n, temperature, top_k, top_p, seed=seed, offset=torch.arange(n))
        tokens, logprobs = sample_tokens(row.expand(n, v), impl="torch", **params)
        freq = torch.bincount(tokens, minlength=v).double() / n
        assert float(freq[q == 0].sum()) == 0.0
        tv = 0.5 * float((freq - q).abs().sum())
        assert tv < 0.02, f"total variation {tv:.4f} for T={temperature}, k={top_k}, p={top_p}"
        torch.testing.assert_close(logprobs.double(), q[tokens].log(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- determinism
def test_deterministic_and_batch_independent():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    logits, p = _random_case(32, 500, gen)
    tokens, logprobs = sample_tokens(logits, **p)
    again = sample_tokens(logits, **p)
    assert torch.equal(tokens, again[0]) and torch.equal(logprobs, again[1])
    perm = torch.randperm(32, generator=gen)
    shuffled = sample_tokens(logits[perm], **{k: t[perm] for k, t in p.items()})
    assert torch.equal(shuffled[0], tokens[perm])
    torch.testing.assert_close(shuffled[1], logprobs[perm], atol=1e-6, rtol=0)
    for i in (0, 7, 31):
        alone = sample_tokens(logits[i:i + 1], **{k: t[i:i + 1] for k, t in p.items()})
        assert alone[0].item() == tokens[i].item()
    # a different offset is a different draw
    row = torch.zeros(1, 1000)
    draws = {sample_tokens(row, **_params(1, seed=5, offset=o))[0].item() for o in range(50)}
    assert len(draws) > 40


# ---------------------------------------------------------------- edge cases
def test_greedy_ties_and_filters_ignored():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    tokens, logprobs = sample_tokens(logits, **_params(2, temperature=0.0, top_k=1, top_p=0.1))
    assert tokens.tolist() == [1, 0]
    expected = torch.log_softmax(logits, 1)[[0, 1], [1, 0]]
    torch.testing.assert_close(logprobs, expected)


def test_top_k_one_and_tiny_top_p_pick_the_maximum():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    logits = torch.randn(16, 200, generator=gen)
    for kw in (dict(top_k=1), dict(top_p=1e-7)):
        tokens, logprobs = sample_tokens(logits, **_params(16, temperature=1.0, seed=3, **kw))
        assert torch.equal(tokens, logits.argmax(1))
        assert torch.equal(logprobs, torch.zeros(16))


def test_ties_at_thresholds_are_kept():
    # probabilities 1/2, 1/4, 1/8, 1/8: top_p 0.76 needs the third token, which ties the fourth
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])).expand(400, 4)
    params = _params(400, top_p=0.76, seed=11, offset=torch.arange(400))
    tokens, logprobs = sample_tokens(logits, **params)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))[tokens])
    # top_k=2 with a tie for second place keeps three tokens
    logits = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0]]).expand(300, 5)
    lp = processed_logprobs(logits[:1], *list(_params(1, top_k=2).values())[:3])
    assert torch.isfinite(lp).tolist() == [[True, False, True, True, False]]


def test_vocab_of_one_and_empty_batch():
    tokens, logprobs = sample_tokens(torch.tensor([[4.0], [-2.0]]), **_params(2, top_k=3, top_p=0.5))
    assert tokens.tolist() == [0, 0] and logprobs.tolist() == [0.0, 0.0]
    tokens, logprobs = sample_tokens(torch.empty(0, 5), **_params(0))
    assert tokens.shape == (0,) and logprobs.shape == (0,)


def test_negative_infinity_logits_are_never_sampled():
    logits = torch.full((200, 10), float("-inf"))
    logits[:, [2, 7]] = torch.tensor([0.0, 1.0])
    for kw in (dict(), dict(top_k=5), dict(top_p=0.99)):
        tokens, logprobs = sample_tokens(logits, **_params(200, offset=torch.arange(200), **kw))
        assert set(tokens.tolist()) == {2, 7}
        torch.testing.assert_close(logprobs, torch.log_softmax(logits, 1)[torch.arange(200), tokens])


def test_noncontiguous_logits():
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    big = torch.randn(8, 64, generator=gen)
    view = big[:, ::2]
    params = _params(8, temperature=0.9, top_p=0.8, offset=torch.arange(8))
    assert torch.equal(sample_tokens(view, **params)[0], sample_tokens(view.contiguous(), **params)[0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_logits_raise(bad):
    logits = torch.randn(3, 8)
    logits[1, 4] = bad
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        sample_tokens(logits, **_params(3))
    with pytest.raises(ValueError, match="entirely -inf"):
        sample_tokens(torch.full((1, 4), float("-inf")), **_params(1))


def test_validation_errors():
    logits = torch.randn(2, 5)
    ok = _params(2)
    cases = [
        (dict(logits=torch.randn(5)), "2-D"),
        (dict(logits=torch.randn(2, 5).long()), "float32"),
        (dict(temperature=torch.tensor([1.0, -1.0])), "temperature"),
        (dict(temperature=torch.tensor([1.0, float("nan")])), "temperature"),
        (dict(top_k=torch.tensor([0, -1], dtype=torch.int32)), "top_k"),
        (dict(top_k=torch.tensor([0, 1])), "int32"),
        (dict(top_p=torch.tensor([0.0, 1.0])), "top_p"),
        (dict(top_p=torch.tensor([1.0, 1.5])), "top_p"),
        (dict(seeds=torch.zeros(3, dtype=torch.int64)), "shape"),
        (dict(offsets=torch.zeros(2, dtype=torch.int32)), "int64"),
    ]
    for override, match in cases:
        kw = dict(logits=logits, **ok)
        kw.update(override)
        with pytest.raises(ValueError, match=match):
            sample_tokens(**kw)
    with pytest.raises(ValueError, match="impl"):
        sample_tokens(logits, impl="numpy", **ok)
    with pytest.raises(ValueError, match="CUDA"):
        sample_tokens(logits, impl="cuda", **ok)


def test_load_extension_without_cuda_torch_is_none():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here; the GPU tests cover the extension")
    assert load_extension() is None


# ---------------------------------------------------------------- CUDA kernel
def _require_cuda_ext():
    if load_extension() is None:
        pytest.fail("CUDA is available but the extension vinekernels._C neither imports nor builds")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 37, 3000, 32000, 50304, 152064])
def test_cuda_matches_reference(dtype, v):
    _require_cuda_ext()
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    b = 64 if v < 100000 else 24
    logits, p = _random_case(b, v, gen, dtype)
    ref_tokens, ref_lp = sample_tokens(logits, impl="torch", **p)
    dev = {k: t.cuda() for k, t in p.items()}
    tokens, lp = sample_tokens(logits.cuda(), impl="cuda", **dev)
    assert tokens.is_cuda and tokens.dtype == torch.int64 and lp.dtype == torch.float32
    tokens, lp = tokens.cpu(), lp.cpu()
    same = tokens == ref_tokens
    assert int(same.sum()) >= b - max(1, b // 20), f"{int((~same).sum())}/{b} tokens differ"
    torch.testing.assert_close(lp[same], ref_lp[same], atol=2e-4, rtol=1e-5)
    # a differing token must still be in the kept set (a rounding tie, not a bug)
    ref_lp_all = processed_logprobs(logits, p["temperature"], p["top_k"], p["top_p"])
    assert bool(torch.isfinite(ref_lp_all[torch.arange(b), tokens]).all())


@pytest.mark.gpu
def test_cuda_batch_invariant_and_deterministic():
    _require_cuda_ext()
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    logits, p = _random_case(48, 32000, gen, torch.bfloat16)
    logits = logits.cuda()
    p = {k: t.cuda() for k, t in p.items()}
    tokens, lp = sample_tokens(logits, **p)
    again = sample_tokens(logits, **p)
    assert torch.equal(tokens, again[0]) and torch.equal(lp, again[1])
    for i in (0, 17, 47):
        alone = sample_tokens(logits[i:i + 1], **{k: t[i:i + 1] for k, t in p.items()})
        assert torch.equal(alone[0], tokens[i:i + 1]) and torch.equal(alone[1], lp[i:i + 1])


@pytest.mark.gpu
def test_cuda_empirical_distribution_and_errors():
    _require_cuda_ext()
    v, n = 12, 40000
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    row = torch.randn(v, generator=gen) * 1.5
    q = _probs64(row, 0.8, 8, 0.9)
    params = _params(n, 0.8, 8, 0.9, seed=99, offset=torch.arange(n), device="cuda")
    tokens, _ = sample_tokens(row.cuda().expand(n, v), impl="cuda", **params)
    freq = torch.bincount(tokens.cpu(), minlength=v).double() / n
    assert float(freq[q == 0].sum()) == 0.0
    assert 0.5 * float((freq - q).abs().sum()) < 0.02
    bad = torch.randn(4, 100, device="cuda")
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        sample_tokens(bad, impl="cuda", **_params(4, device="cuda"))


# ---------------------------------------------------------------- fast path == sorting path, bit for bit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unfiltered_path_is_bit_identical_to_the_sorting_path(dtype):
    from vinekernels.sampling import _sample_sorting, sample_tokens_torch

    gen = torch.Generator().manual_seed(7)
    for trial in range(30):
        b, v = random.choice([(1, 5), (7, 64), (33, 1000), (64, 4096)])
        logits, kw = _random_case(b, v, gen, dtype)
        if trial % 3 == 0:      # no filtering at all: the fast path alone
            kw["top_k"] = torch.zeros(b, dtype=torch.int32)
            kw["top_p"] = torch.ones(b)
        if trial % 5 == 0:      # every row at T = 1 skips the division
            kw["temperature"] = torch.ones(b)
        if trial % 7 == 0:      # -inf entries (masked vocabulary) and a spike
            logits[:, : v // 2] = float("-inf")
            logits[0, -1] = 80.0
        t1, l1 = sample_tokens_torch(logits, **kw)
        t2, l2 = _sample_sorting(logits, **kw)
        assert torch.equal(t1, t2), trial
        assert torch.equal(l1.view(torch.int32), l2.view(torch.int32)), trial


def test_unfiltered_path_rejects_the_same_rows():
    logits = torch.randn(6, 50)
    logits[1, 3] = float("nan")
    logits[3, 7] = float("inf")
    logits[4] = float("-inf")
    kw = _params(6)
    with pytest.raises(ValueError, match=r"\[1, 3, 4\]"):
        sample_tokens(logits, impl="torch", **kw)
    # T small enough to overflow a finite logit to +inf is rejected too
    logits = torch.randn(2, 50)
    logits[1, 0] = 3e38
    with pytest.raises(ValueError, match=r"\[1\]"):
        sample_tokens(logits, impl="torch", **_params(2, temperature=0.5))


def test_unfiltered_path_falls_back_to_the_last_token_with_mass():
    # u * M at the total can only be reached through rounding; force it with a row whose mass is
    # all on its first token and check the fallback picks a token with mass, as the sorting path does.
    from vinekernels.sampling import _sample_sorting, sample_tokens_torch

    logits = torch.full((4, 30), -1e4)
    logits[:, 0] = 0.0
    kw = _params(4, seed=torch.tensor([1, 2, 3, 4]), offset=torch.tensor([0, 1, 2, 3]))
    t1, l1 = sample_tokens_torch(logits, **kw)
    t2, l2 = _sample_sorting(logits, **kw)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
    assert t1.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("v", [50, 700, 5000])
def test_top_p_candidate_path_is_bit_identical_to_the_sorting_path(v, monkeypatch):
    import vinekernels.sampling as smp

    gen = torch.Generator().manual_seed(v)
    decided = 0
    for trial in range(25):
        b = 40
        logits = torch.randn(b, v, generator=gen) * random.choice([0.3, 1.0, 3.0, 8.0])
        logits[::5, :3] = 4.0                       # ties at the top
        kw = _params(b, temperature=torch.tensor([random.choice([0.0, 0.5, 1.0]) for _ in range(b)]),
                     top_p=torch.tensor([random.choice([1.0, 0.9, 0.5, 0.99, 1e-6]) for _ in range(b)]),
                     seed=torch.randint(0, 2**62, (b,), generator=gen), offset=trial)
        kw["top_k"][::7] = 3                         # a few top-k rows stay on the sorting path
        t1, l1 = smp.sample_tokens_torch(logits, **kw)
        t2, l2 = smp._sample_sorting(logits, **kw)
        assert torch.equal(t1, t2), trial
        assert torch.equal(l1.view(torch.int32), l2.view(torch.int32)), trial
        only_p = (kw["top_p"] < 1) & (kw["temperature"] > 0) & (kw["top_k"] == 0)
        _, _, ok = smp._sample_top_p(logits[only_p], kw["temperature"][only_p], kw["top_p"][only_p],
                                     kw["seeds"][only_p], kw["offsets"][only_p])
        decided += int(ok.sum())
    assert decided > 0 or v <= min(smp.TOP_P_CANDIDATES)   # the candidate path does decide rows


def test_top_p_rows_the_candidates_cannot_decide_fall_back_to_the_sort(monkeypatch):
    import vinekernels.sampling as smp

    monkeypatch.setattr(smp, "TOP_P_CANDIDATES", (4,))
    logits = torch.zeros(3, 300)                     # flat rows: the nucleus is far beyond 4 candidates
    kw = _params(3, top_p=0.9, seed=torch.tensor([1, 2, 3]))
    _, _, ok = smp._sample_top_p(logits, kw["temperature"], kw["top_p"], kw["seeds"], kw["offsets"])
    assert not bool(ok.any())
    t1, l1 = smp.sample_tokens_torch(logits, **kw)
    t2, l2 = smp._sample_sorting(logits, **kw)
    assert torch.equal(t1, t2) and torch.equal(l1, l2)
