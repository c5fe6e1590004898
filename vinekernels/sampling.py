"""Fused token sampling: temperature, top-k and top-p over the vocabulary.

Definitions shared by the torch reference and the CUDA kernel (``csrc/sampling.cu``):

* ``x = logits.float() / T`` in float32 (``T = 1`` for greedy rows, ``temperature == 0``).
* Greedy rows return the lowest index of ``max(x)`` and ``log_softmax(x)[token]``; top-k and
  top-p do not apply to them.
* top-k (``k > 0`` and ``k < V``): ``t_k`` is the k-th largest ``x``; the kept set is
  ``{i : x_i >= t_k}`` (ties at the boundary are all kept).
* top-p (``p < 1``): with ``e_i = exp(x_i - max x)`` and ``M_k`` the mass of the top-k set,
  ``t_p`` is the largest value ``t`` of ``x`` such that the mass of ``{x_i >= t}`` within the
  top-k set is at least ``p * M_k``; the kept set is ``{i : x_i >= max(t_k, t_p)}``.
* The draw ``u`` in ``[0, 1)`` is a counter-based hash of ``(seed, offset)``
  (:func:`uniform_from_seed`). The sampled token is the first index, in vocabulary order, at which
  the running kept mass exceeds ``u * M`` (``M`` = kept mass); only tokens with positive mass can
  be drawn.
* The returned logprob is ``x_token - max x - log M``: the log of the renormalised probability of
  the token within the kept set (with no filtering, ``log_softmax(x)[token]``).

Rows with NaN or ``+inf`` logits, or with every logit ``-inf``, have no distribution and raise a
``ValueError`` (the CUDA path detects them in the kernel and reports after the launch).
"""

from __future__ import annotations

import torch

from vinekernels._ext import load_extension

__all__ = ["sample_tokens", "sample_tokens_torch", "processed_logprobs", "kept_log_mass", "uniform_from_seed",
           "uniform_from_seed_python", "derive_seed"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed64(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# ---------------------------------------------------------------- counter-based hash (python)
def _mix64_python(z: int) -> int:
    """splitmix64 finaliser on unsigned 64-bit python ints."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _hash_python(seed: int, offset: int) -> int:
    return _mix64_python(_mix64_python(seed + _GOLDEN) + offset)


def uniform_from_seed_python(seed: int, offset: int) -> float:
    """Pure-python form of :func:`uniform_from_seed` for one (seed, offset) pair."""
    return (_hash_python(seed, offset) >> 40) / float(1 << 24)


def derive_seed(*values: int) -> int:
    """Deterministic 63-bit seed from any number of integers (order matters).

    Used to give each sample and each branch its own random stream, e.g.
    ``derive_seed(request_seed, offset, j)``. Negative integers are taken modulo 2**64.
    """
    h = _mix64_python(_GOLDEN ^ len(values))
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"derive_seed takes integers, got {type(v).__name__}")
        h = _mix64_python(h + _GOLDEN + (v & _MASK64))
    return h >> 1


# ---------------------------------------------------------------- counter-based hash (torch)
def _shr(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding unsigned 64-bit values."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _mix64_torch(z: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2**64, which is the unsigned product's bit pattern.
    z = (z ^ _shr(z, 30)) * _signed64(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed64(_MIX2)
    return z ^ _shr(z, 31)


def uniform_from_seed(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) with 24 random bits, a pure function of (seed, offset).

    Bit-for-bit the same as the CUDA kernel's draw: ``h = mix(mix(seed + G) + offset)`` with
    splitmix64's ``mix`` and ``u = (h >> 40) / 2**24``.
    """
    if seeds.dtype != torch.int64 or offsets.dtype != torch.int64:
        raise ValueError("seeds and offsets must be int64 tensors")
    h = _mix64_torch(_mix64_torch(seeds + _signed64(_GOLDEN)) + offsets)
    return _shr(h, 40).to(torch.float32) * (1.0 / (1 << 24))


# ---------------------------------------------------------------- validation
def _validate(logits, temperature, top_k, top_p, seeds, offsets) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a 2-D tensor [B, V], got {getattr(logits, 'shape', logits)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    b, v = logits.shape
    if v < 1:
        raise ValueError("logits must have at least one vocabulary entry")
    if v >= 2**31:
        raise ValueError(f"vocabulary of {v} entries is too large")
    expected = {"temperature": (temperature, torch.float32), "top_k": (top_k, torch.int32),
                "top_p": (top_p, torch.float32), "seeds": (seeds, torch.int64),
                "offsets": (offsets, torch.int64)}
    for name, (t, dtype) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if t.shape != (b,):
            raise ValueError(f"{name} must have shape [{b}], got {list(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    if b == 0:
        return
    if not bool(torch.isfinite(temperature).all()) or bool((temperature < 0).any()):
        raise ValueError("temperature must be finite and >= 0 (0 = greedy)")
    if bool((top_k < 0).any()):
        raise ValueError("top_k must be >= 0 (0 = off)")
    if not bool(((top_p > 0) & (top_p <= 1)).all()):
        raise ValueError("top_p must be in (0, 1] (1 = off)")


def _invalid_rows_error(rows: list[int]) -> ValueError:
    shown = ", ".join(map(str, rows[:8])) + (" ..." if len(rows) > 8 else "")
    return ValueError(f"logits rows [{shown}] contain NaN or +inf, or are entirely -inf")


# ---------------------------------------------------------------- torch reference
def _scaled(logits, temperature):
    """x = logits / T in float32, as the kernel computes it (T = 1 for greedy rows); rows without
    a distribution raise."""
    t_eff = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    x = logits.float() / t_eff[:, None]
    bad = torch.isnan(x).any(1) | (x == float("inf")).any(1) | (x == float("-inf")).all(1)
    if bool(bad.any()):
        raise _invalid_rows_error(bad.nonzero().flatten().tolist())
    return x


def _process(logits, temperature, top_k, top_p):
    """Scaled logits x (float32), row maxima, float64 masses e = exp(x - max) and the kept set."""
    v = logits.shape[1]
    greedy = temperature == 0
    x = _scaled(logits, temperature)
    xmax = x.max(dim=1, keepdim=True).values
    e = torch.exp(x.double() - xmax.double())       # float64 masses; e_max == 1
    keep = torch.ones_like(x, dtype=torch.bool)
    use_k = (top_k > 0) & (top_k < v) & ~greedy
    use_p = (top_p < 1) & ~greedy
    rows = (use_k | use_p).nonzero().flatten()
    if rows.numel() > 0:
        xs, order = torch.sort(x[rows], dim=1, descending=True, stable=True)
        es = e[rows].gather(1, order)
        neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
        # top-k: keep every value >= the k-th largest.
        kth = (top_k[rows].long().clamp(1, v) - 1)[:, None]
        thr_k = torch.where(use_k[rows][:, None], xs.gather(1, kth), neg_inf)
        in_k = xs >= thr_k
        mass_k = (es * in_k).sum(1, keepdim=True)
        # top-p: the value at the first sorted position whose cumulative mass reaches p * M_k is
        # the threshold; ties with it are kept too.
        cum = torch.cumsum(es * in_k, dim=1)
        target = top_p[rows].double()[:, None] * mass_k
        first = torch.searchsorted(cum, target).clamp(max=v - 1)
        thr_p = torch.where(use_p[rows][:, None], xs.gather(1, first), neg_inf)
        keep[rows] = x[rows] >= torch.maximum(thr_k, thr_p)
    return x, xmax, e, keep


def processed_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                       top_p: torch.Tensor) -> torch.Tensor:
    """float32 [B, V]: log of the processed (scaled, filtered, renormalised) distribution;
    -inf outside the kept set. Greedy rows give log_softmax(logits)."""
    b = logits.shape[0]
    zeros = torch.zeros(b, dtype=torch.int64, device=logits.device)
    _validate(logits, temperature, top_k, top_p, zeros, zeros)
    _, _, e, keep = _process(logits, temperature, top_k, top_p)
    ek = e * keep
    return torch.log(ek / ek.sum(1, keepdim=True)).float()


def kept_log_mass(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, candidates: int = 64) -> torch.Tensor:
    """float32 [B]: log of the probability that softmax(logits / T) puts on the kept set.

    A sampled token's returned logprob is ``log_softmax(logits / T)[token] - kept_log_mass``; 0 for
    rows that filter nothing (and for greedy rows, which :func:`sample_tokens` scores unfiltered).

    Rows with top-p alone look for the threshold among their ``candidates`` largest values first
    (a partial top-k instead of a vocabulary-wide sort); rows whose threshold lies further down,
    and rows with top-k, take the sorting path of :func:`sample_tokens_torch`."""
    b = logits.shape[0]
    zeros = torch.zeros(b, dtype=torch.int64, device=logits.device)
    _validate(logits, temperature, top_k, top_p, zeros, zeros)
    v = logits.shape[1]
    out = torch.zeros(b, dtype=torch.float32, device=logits.device)
    if b == 0:
        return out
    greedy = temperature == 0
    x = _scaled(logits, temperature)
    xmax = x.max(dim=1, keepdim=True).values
    e = torch.exp(x.double() - xmax.double())
    total = e.sum(1)
    only_p = (top_p < 1) & ((top_k == 0) | (top_k >= v)) & ~greedy
    found = torch.zeros(b, dtype=torch.bool, device=logits.device)
    rows = only_p.nonzero().flatten()
    if rows.numel() > 0:
        xs = torch.topk(x[rows], min(candidates, v), dim=1).values        # descending
        cum = torch.cumsum(torch.exp(xs.double() - xmax[rows].double()), dim=1)
        target = top_p[rows].double() * total[rows]
        # the first sorted position whose cumulative mass reaches p * M is the threshold, as in _process
        hit = cum[:, -1] >= target
        first = torch.searchsorted(cum, target[:, None]).clamp(max=xs.shape[1] - 1)
        keep = x[rows] >= xs.gather(1, first)
        mass = torch.log((e[rows] * keep).sum(1)) - torch.log(total[rows])
        out[rows[hit]] = mass[hit].float()
        found[rows[hit]] = True
    rest = ((top_p < 1) | ((top_k > 0) & (top_k < v))) & ~greedy & ~found
    rows = rest.nonzero().flatten()
    if rows.numel() > 0:
        _, _, er, keep = _process(logits[rows], temperature[rows], top_k[rows], top_p[rows])
        out[rows] = (torch.log((er * keep).sum(1)) - torch.log(er.sum(1))).float()
    return out


def _sample_sorting(logits, temperature, top_k, top_p, seeds, offsets):
    """The general path (any mix of greedy, top-k and top-p rows): sorts the rows that filter."""
    b, v = logits.shape
    device = logits.device
    greedy = temperature == 0
    x, xmax, e, keep = _process(logits, temperature, top_k, top_p)
    tokens = torch.empty(b, dtype=torch.int64, device=device)
    logprobs = torch.empty(b, dtype=torch.float32, device=device)
    ek = e * keep
    mass = ek.sum(1)
    logmass = torch.log(mass)
    if bool(greedy.any()):
        g = greedy.nonzero().flatten()
        tokens[g] = x[g].argmax(1)                  # first index of the maximum
        logprobs[g] = (-logmass[g]).float()
    s = (~greedy).nonzero().flatten()
    if s.numel() > 0:
        u = uniform_from_seed(seeds[s], offsets[s]).double()
        cum = torch.cumsum(ek[s], dim=1)
        hit = cum > (u * mass[s])[:, None]
        first = torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(s, -1))
        # Rounding can leave u * M at the total: fall back to the last token with mass.
        last = v - 1 - (ek[s] > 0).flip(1).int().argmax(1)
        tok = torch.where(first >= 0, first, last)
        tokens[s] = tok
        xt = x[s].gather(1, tok[:, None]).squeeze(1).double()
        logprobs[s] = (xt - xmax[s, 0].double() - logmass[s]).float()
    return tokens, logprobs


def _sample_unfiltered(logits, temperature, seeds, offsets):
    """Rows without top-k / top-p (greedy or plain temperature sampling), bit for bit what
    :func:`_sample_sorting` returns for them, in about a third of the passes over [B, V]:

    * one row maximum validates the row (it is NaN if any value is NaN, +inf if any is +inf and
      -inf if all are -inf: exactly the rows the reference rejects);
    * ``x / 1`` is ``x``, so rows at T = 1 (and greedy rows) skip the division;
    * the float64 masses are built in place, and with nothing filtered ``e * keep`` is ``e``;
    * the running mass is non-decreasing, so the first index where it exceeds ``u * M`` is a
      binary search (``searchsorted(right=True)``) instead of a compare, ``any`` and ``argmax``
      over the row; the last-token fallback runs only for rows that need it.
    """
    b, v = logits.shape
    device = logits.device
    greedy = temperature == 0
    x = logits.float()
    t_eff = torch.where(greedy, torch.ones_like(temperature), temperature)
    if not bool((t_eff == 1).all()):
        x = x / t_eff[:, None]
    xmax = x.max(dim=1, keepdim=True).values
    bad = ~torch.isfinite(xmax[:, 0])
    if bool(bad.any()):
        raise _invalid_rows_error(bad.nonzero().flatten().tolist())
    e = x.double().sub_(xmax.double()).exp_()       # == torch.exp(x.double() - xmax.double())
    mass = e.sum(1)
    logmass = torch.log(mass)
    tokens = torch.empty(b, dtype=torch.int64, device=device)
    logprobs = torch.empty(b, dtype=torch.float32, device=device)
    n_greedy = int(greedy.sum())
    if n_greedy:
        g = greedy.nonzero().flatten()
        tokens[g] = x[g].argmax(1)
        logprobs[g] = (-logmass[g]).float()
    if n_greedy < b:
        if n_greedy:
            s = (~greedy).nonzero().flatten()
            es, xs, ms, lms, xm = e[s], x[s], mass[s], logmass[s], xmax[s]
            sd, off = seeds[s], offsets[s]
        else:
            s = None
            es, xs, ms, lms, xm, sd, off = e, x, mass, logmass, xmax, seeds, offsets
        tok, lp = _draw(xs, xm, es, sd, off, mass=ms, logmass=lms)
        if s is None:
            tokens, logprobs = tok, lp
        else:
            tokens[s] = tok
            logprobs[s] = lp
    return tokens, logprobs


def _draw(x, xmax, ek, seeds, offsets, mass=None, logmass=None):
    """The draw of :func:`_sample_sorting` for sampled rows, given the kept masses ``ek`` (>= 0)
    and, when the caller has them, their row sums and logs: the running mass is non-decreasing, so
    the first index where it exceeds ``u * M`` is a binary search; the last-token fallback runs
    only for rows that need it."""
    v = x.shape[1]
    mass = ek.sum(1) if mass is None else mass
    logmass = torch.log(mass) if logmass is None else logmass
    u = uniform_from_seed(seeds, offsets).double()
    cum = torch.cumsum(ek, dim=1)
    tok = torch.searchsorted(cum, (u * mass)[:, None], right=True).squeeze(1)
    over = tok >= v
    if bool(over.any()):
        r = over.nonzero().flatten()
        tok[r] = v - 1 - (ek[r] > 0).flip(1).int().argmax(1)
    xt = x.gather(1, tok[:, None]).squeeze(1).double()
    return tok, (xt - xmax[:, 0].double() - logmass).float()


# Candidate counts tried, in turn, for top-p thresholds before a vocabulary-wide sort.
TOP_P_CANDIDATES = (64, 1024)
# Relative bound on how far two summation orders of the same non-negative float64 masses can
# differ (>> V * 2**-53 for any vocabulary below 2**31 / 1e3): within it a threshold is undecided.
_SUM_ORDER_SLACK = 1e-7


def _sample_top_p(logits, temperature, top_p, seeds, offsets):
    """Rows with top-p alone (no top-k, T > 0): the threshold from the largest few values
    (``torch.topk``) instead of a full sort, with results bit-identical to :func:`_sample_sorting`.

    The sorting path's running mass over the sorted values is, on the candidates, the same
    sequential sum; only its total ``M`` (summed in sorted order) is unknown, and it is replaced by
    the vocabulary-order sum with a slack bound. A row whose threshold position is the same at both
    ends of that bound, and lies among the candidates, is decided exactly; the others are returned
    as undecided (``ok`` False) for the sorting path. Returns (tokens, logprobs, ok)."""
    b, v = logits.shape
    x = _scaled(logits, temperature)
    xmax = x.max(dim=1, keepdim=True).values
    e = x.double().sub_(xmax.double()).exp_()
    total = e.sum(1, keepdim=True)
    target = top_p.double()[:, None] * total
    lo, hi = target * (1 - _SUM_ORDER_SLACK), target * (1 + _SUM_ORDER_SLACK)
    thr = torch.full((b, 1), float("nan"), dtype=x.dtype, device=x.device)
    todo = torch.arange(b, device=x.device)
    for m in TOP_P_CANDIDATES:
        if todo.numel() == 0 or m >= v:
            break
        xs = torch.topk(x[todo], m, dim=1).values                        # descending
        cum = torch.cumsum(torch.exp(xs.double() - xmax[todo].double()), dim=1)
        f_lo = torch.searchsorted(cum, lo[todo])
        f_hi = torch.searchsorted(cum, hi[todo])
        ok = (f_lo == f_hi)[:, 0] & (cum[:, -1:] >= hi[todo])[:, 0]
        thr[todo[ok]] = xs.gather(1, f_lo.clamp(max=m - 1))[ok]
        todo = todo[~ok]
    ok = ~torch.isnan(thr[:, 0])
    keep = x >= thr                                       # NaN threshold: nothing kept (undecided rows)
    ek = e.masked_fill_(~keep, 0.0)                       # == e * keep
    tokens = torch.zeros(b, dtype=torch.int64, device=x.device)
    logprobs = torch.zeros(b, dtype=torch.float32, device=x.device)
    r = ok.nonzero().flatten()
    if r.numel() == b:
        tokens, logprobs = _draw(x, xmax, ek, seeds, offsets)
    elif r.numel():
        tokens[r], logprobs[r] = _draw(x[r], xmax[r], ek[r], seeds[r], offsets[r])
    return tokens, logprobs, ok


def sample_tokens_torch(logits, temperature, top_k, top_p, seeds, offsets):
    """Reference implementation (the CPU path). Every row's result is what :func:`_sample_sorting`
    gives it, bit for bit; rows without top-k/top-p take :func:`_sample_unfiltered`, rows with
    top-p alone :func:`_sample_top_p` (a partial top-k with the sort as its fallback), and rows with
    top-k the sorting path."""
    b, v = logits.shape
    greedy = temperature == 0
    use_k = (top_k > 0) & (top_k < v) & ~greedy
    use_p = (top_p < 1) & ~greedy
    n_k, n_p = int(use_k.sum()), int((use_p & ~use_k).sum())
    if n_k == 0 and n_p == 0:
        return _sample_unfiltered(logits, temperature, seeds, offsets)
    if n_k == b:
        return _sample_sorting(logits, temperature, top_k, top_p, seeds, offsets)
    tokens = torch.empty(b, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    # Any bad row raises, listing every bad row, before anything else runs.
    _scaled(logits, temperature)
    sort_rows = use_k
    if n_p:
        p = (use_p & ~use_k).nonzero().flatten()
        tp, lp, ok = _sample_top_p(logits[p], temperature[p], top_p[p], seeds[p], offsets[p])
        tokens[p[ok]], logprobs[p[ok]] = tp[ok], lp[ok]
        sort_rows = sort_rows.clone()
        sort_rows[p[~ok]] = True
    plain = ~(use_k | use_p)
    if bool(plain.any()):
        r = plain.nonzero().flatten()
        tokens[r], logprobs[r] = _sample_unfiltered(logits[r], temperature[r], seeds[r], offsets[r])
    if bool(sort_rows.any()):
        f = sort_rows.nonzero().flatten()
        tokens[f], logprobs[f] = _sample_sorting(logits[f], temperature[f], top_k[f], top_p[f], seeds[f], offsets[f])
    return tokens, logprobs


# ---------------------------------------------------------------- dispatch
def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor,
                  impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; returns (tokens int64 [B], logprobs float32 [B]).

    ``impl``: "auto" (CUDA extension for CUDA logits when it is built, else torch), "cuda" or
    "torch". See the module docstring for the exact definitions.
    """
    if impl not in ("auto", "cuda", "torch"):
        raise ValueError(f"impl must be 'auto', 'cuda' or 'torch', got {impl!r}")
    _validate(logits, temperature, top_k, top_p, seeds, offsets)
    if logits.shape[0] == 0:
        return (torch.empty(0, dtype=torch.int64, device=logits.device),
                torch.empty(0, dtype=torch.float32, device=logits.device))
    ext = None
    if impl != "torch" and logits.is_cuda:
        ext = load_extension()
    if impl == "cuda":
        if not logits.is_cuda:
            raise ValueError("impl='cuda' needs CUDA tensors")
        if ext is None:
            raise ValueError("impl='cuda' but the CUDA extension vinekernels._C is not available")
    if ext is None:
        return sample_tokens_torch(logits, temperature, top_k, top_p, seeds, offsets)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    tokens, logprobs = ext.sample_tokens(logits, temperature.contiguous(), top_k.contiguous(),
                                         top_p.contiguous(), seeds.contiguous(),
                                         offsets.contiguous())
    bad = tokens < 0
    if bool(bad.any()):
        raise _invalid_rows_error(bad.nonzero().flatten().tolist())
    return tokens, logprobs
