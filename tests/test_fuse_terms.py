"""ivl_local._core.fuse_terms (a base plus N terms, optional plausibility mask) against a
numpy reference at every SIMD level, and _fuse_terms_and_sample against fuse-then-sample."""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local import _core

LENGTHS = [1, 7, 31, 32, 33, 63, 257, 4099, 262_144]
# Raw terms: FMA (vector levels) vs multiply-then-add (x86 scalar), as test_kernels.py.
RAW_TOL = 2e-6
# Log-softmax terms: logsumexp from each level's own float exps, summed in double, then
# rounded to float32 (1 ulp of a logsumexp near 12 is ~1e-6).
LOG_SOFTMAX_TOL = 1e-5


@pytest.fixture(params=_core.available_simd_levels())
def simd_level(request):
    _core.set_simd_level(request.param)
    assert _core.simd_level() == request.param
    yield request.param
    _core.set_simd_level("auto")


def logsumexp(z):
    z = z.astype(np.float64)
    top = z.max()
    return top + np.log(np.exp(z - top).sum())


def reference(base, terms, mask_alpha=0.0):
    """fuse_terms.h's rules in numpy: terms added in order in float32; map -1 and zero
    coefficients add nothing, an infinite base is kept, opposite infinities give -inf."""
    base = base.astype(np.float32)
    out = base.copy()
    n = base.size
    for logits, token_map, token_weights, weight, transform in terms:
        if weight == 0:
            continue
        shift = np.float32(logsumexp(logits)) if transform == "log_softmax" else np.float32(0)
        index = np.arange(n) if token_map is None else token_map
        mapped = index >= 0
        coef = np.float32(weight) * (np.ones(n, np.float32) if token_weights is None
                                     else token_weights)
        with np.errstate(invalid="ignore", over="ignore"):
            x = np.where(mapped, logits[np.maximum(index, 0)] - shift, np.float32(0))
            new = out + coef * x
        new = np.where(np.isnan(new), -np.inf, new).astype(np.float32)
        out = np.where(mapped & (coef != 0) & np.isfinite(base), new, out)
    if mask_alpha > 0:
        bound = np.float64(base.max()) + np.log(np.float64(np.float32(mask_alpha)))
        out = np.where(base.astype(np.float64) < bound, -np.inf, out)
    return out.astype(np.float32)


def random_logits(rng, n, scale=3.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


def random_map(rng, n, n_logits, unmapped=0.05):
    token_map = rng.integers(0, n_logits, n).astype(np.int32)
    token_map[rng.random(n) < unmapped] = -1
    return token_map


def random_weights(rng, n):
    weights = rng.random(n).astype(np.float32)
    weights[rng.random(n) < 0.1] = 0.0
    return weights


def three_terms(rng, n):
    """An IVL value net (raw, identity), an expert and an anti-expert (log-softmax, mapped
    onto a smaller vocabulary, weighted)."""
    n_small = max(1, n // 2 + 3)
    expert, anti = random_logits(rng, n_small), random_logits(rng, n_small)
    token_map, token_weights = random_map(rng, n, n_small), random_weights(rng, n)
    return [
        (random_logits(rng, n, 1.0), None, None, 0.8, "raw"),
        (expert, token_map, token_weights, 1.5, "log_softmax"),
        (anti, token_map, token_weights, -1.5, "log_softmax"),
    ]


# --- against numpy, every level ------------------------------------------------------------


@pytest.mark.parametrize("n", LENGTHS)
def test_no_terms_is_exactly_base(simd_level, n):
    base = random_logits(np.random.default_rng(n), n)
    base[::7] = -np.inf
    np.testing.assert_array_equal(_core.fuse_terms(base, []), base)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("transform", ["raw", "log_softmax"])
@pytest.mark.parametrize("mapped, weighted", [(False, False), (False, True), (True, False),
                                              (True, True)])
def test_one_term_matches_numpy(simd_level, n, transform, mapped, weighted):
    rng = np.random.default_rng(n + 10 * mapped + weighted)
    n_logits = max(1, n // 2 + 3) if mapped else n
    base, logits = random_logits(rng, n), random_logits(rng, n_logits)
    term = (logits, random_map(rng, n, n_logits) if mapped else None,
            random_weights(rng, n) if weighted else None, -0.7 if weighted else 1.3, transform)
    out = _core.fuse_terms(base, [term])
    assert out.dtype == np.float32 and out.shape == (n,)
    tol = RAW_TOL if transform == "raw" else LOG_SOFTMAX_TOL
    np.testing.assert_allclose(out, reference(base, [term]), rtol=tol, atol=tol)


@pytest.mark.parametrize("n", LENGTHS)
def test_three_terms_match_numpy(simd_level, n):
    rng = np.random.default_rng(n + 100)
    base, terms = random_logits(rng, n), three_terms(rng, n)
    out = _core.fuse_terms(base, terms)
    np.testing.assert_allclose(out, reference(base, terms), rtol=LOG_SOFTMAX_TOL,
                               atol=LOG_SOFTMAX_TOL)


def test_full_vocab_with_a_49152_entry_mapped_term(simd_level):
    rng = np.random.default_rng(5)
    n, n_value = 262_144, 49_152
    base = random_logits(rng, n)
    terms = [(random_logits(rng, n), None, None, 1.0, "log_softmax"),
             (random_logits(rng, n_value, 0.5), random_map(rng, n, n_value, 0.024),
              random_weights(rng, n), 0.8, "raw")]
    np.testing.assert_allclose(_core.fuse_terms(base, terms), reference(base, terms),
                               rtol=LOG_SOFTMAX_TOL, atol=LOG_SOFTMAX_TOL)


def test_levels_agree_with_scalar():
    rng = np.random.default_rng(6)
    n = 4099
    base, terms = random_logits(rng, n), three_terms(rng, n)
    outs = {}
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            outs[level] = _core.fuse_terms(base, terms, mask_alpha=0.01)
    finally:
        _core.set_simd_level("auto")
    for level, out in outs.items():
        np.testing.assert_allclose(out, outs["scalar"], rtol=LOG_SOFTMAX_TOL,
                                   atol=LOG_SOFTMAX_TOL, err_msg=level)


def test_zero_contributions_are_exactly_base(simd_level):
    rng = np.random.default_rng(7)
    n = 1000
    base, logits = random_logits(rng, n), random_logits(rng, n)
    logits[::3] = -np.inf
    logits[1::3] = np.inf
    token_map = np.arange(n, dtype=np.int32)
    token_map[::2] = -1
    token_weights = np.ones(n, np.float32)
    token_weights[1::2] = 0.0  # every mapped entry has weight 0
    nan_logits = np.full(n, np.nan, np.float32)  # weight 0: never read
    terms = [(logits, token_map, token_weights, 2.0, "raw"),
             (nan_logits, None, None, 0.0, "log_softmax"),
             (nan_logits, np.full(n, 10**6, np.int32), None, 0.0, "raw")]  # map not checked
    np.testing.assert_array_equal(_core.fuse_terms(base, terms), base)


def test_infinities(simd_level):
    n = 70  # blocks of 16/32/64 and a tail
    base = np.zeros(n, np.float32)
    plus, minus = np.zeros(n, np.float32), np.zeros(n, np.float32)
    base[0], plus[0] = -np.inf, np.inf        # -inf base stays -inf
    base[1], plus[1] = np.inf, -np.inf        # +inf base stays +inf
    minus[2] = -np.inf                        # one -inf contribution
    plus[3] = np.inf                          # one +inf contribution
    plus[40], minus[40] = np.inf, -np.inf     # opposite infinities: -inf wins
    plus[69], minus[69] = -np.inf, np.inf     # the other order, in the tail
    terms = [(plus, None, None, 1.0, "raw"), (minus, None, None, 0.5, "raw")]
    out = _core.fuse_terms(base, terms)
    expected = np.zeros(n, np.float32)
    expected[[0, 2, 40, 69]] = -np.inf
    expected[[1, 3]] = np.inf
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, reference(base, terms))
    flipped = _core.fuse_terms(base, [(plus, None, None, -1.0, "raw")])  # -w flips the sign
    assert flipped[3] == -np.inf and flipped[0] == -np.inf and flipped[1] == np.inf


def test_log_softmax_of_minus_inf_logits(simd_level):
    logits = np.array([0.0, -np.inf, 1.0, -np.inf] * 10, np.float32)
    base = np.zeros(logits.size, np.float32)
    out = _core.fuse_terms(base, [(logits, None, None, -2.0, "log_softmax")])
    assert np.all(out[1::4] == np.inf)  # an anti-expert's -inf: +inf
    np.testing.assert_allclose(out, reference(base, [(logits, None, None, -2.0, "log_softmax")]),
                               rtol=LOG_SOFTMAX_TOL, atol=LOG_SOFTMAX_TOL)


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 31, 32, 100, 262_143])
def test_nan_in_base_names_the_index(simd_level, index):
    n = 262_144
    base = np.zeros(n, np.float32)
    base[index] = np.nan
    for terms in ([], [(np.zeros(n, np.float32), None, None, 1.0, "raw")]):
        with pytest.raises(ValueError, match=f"^NaN in base logits at index {index}$"):
            _core.fuse_terms(base, terms, mask_alpha=0.5)


@pytest.mark.parametrize("index", [3, 40, 1000])
def test_nan_in_a_term_names_term_and_index(simd_level, index):
    m = 1001
    base = np.zeros(m, np.float32)
    logits = np.zeros(m, np.float32)
    logits[index] = np.nan
    reversed_map = np.arange(m - 1, -1, -1, dtype=np.int32)
    ok = (np.zeros(m, np.float32), None, None, 1.0, "raw")
    for term in [(logits, None, None, 1.0, "raw"), (logits, reversed_map, None, 0.5, "raw"),
                 (logits, None, None, 1.0, "log_softmax")]:
        with pytest.raises(ValueError, match=f"^NaN in term 1 logits at index {index}$"):
            _core.fuse_terms(base, [ok, term])
    unused = reversed_map.copy()
    unused[m - 1 - index] = -1  # nobody maps to the NaN: a raw term does not use it ...
    np.testing.assert_array_equal(_core.fuse_terms(base, [(logits, unused, None, 1.0, "raw")]),
                                  base)
    with pytest.raises(ValueError, match=f"^NaN in term 0 logits at index {index}$"):
        # ... but a log-softmax term's normaliser uses every logit
        _core.fuse_terms(base, [(logits, unused, None, 1.0, "log_softmax")])


def test_log_softmax_needs_a_finite_distribution(simd_level):
    base = np.zeros(40, np.float32)
    plus = np.zeros(40, np.float32)
    plus[17] = np.inf
    with pytest.raises(ValueError, match=r"^term 0: logit 17 is \+inf"):
        _core.fuse_terms(base, [(plus, None, None, 1.0, "log_softmax")])
    with pytest.raises(ValueError, match="^term 0: every logit is -inf"):
        _core.fuse_terms(base, [(np.full(40, -np.inf, np.float32), None, None, 1.0,
                                 "log_softmax")])


@pytest.mark.parametrize("bad", [-2, 50, 2**31 - 1, -(2**31)])
@pytest.mark.parametrize("at", [77, 99])  # in a block, in the tail
def test_map_out_of_range_names_term_and_index(simd_level, bad, at):
    base = np.zeros(100, np.float32)
    token_map = np.zeros(100, np.int32)
    token_map[at] = bad
    terms = [(np.zeros(100, np.float32), None, None, 1.0, "raw"),
             (np.zeros(50, np.float32), token_map, None, 1.0, "raw")]
    with pytest.raises(ValueError, match=rf"^term 1: token_map\[{at}\] = {bad} is outside "
                                         r"\[-1, 50\)$"):
        _core.fuse_terms(base, terms)


def test_binding_validation():
    base = np.zeros(8, np.float32)
    logits = np.zeros(8, np.float32)
    good = (logits, None, None, 1.0, "raw")
    cases = [
        (TypeError, "terms must be a list", dict(terms=good)),
        (TypeError, r"terms\[0\] must be a tuple", dict(terms=[(logits, None, None, 1.0)])),
        (TypeError, r"terms\[0\].logits must have dtype float32",
         dict(terms=[(logits.astype(np.float64), None, None, 1.0, "raw")])),
        (ValueError, r"terms\[0\].logits must be C-contiguous",
         dict(terms=[(np.zeros(16, np.float32)[::2], None, None, 1.0, "raw")])),
        (ValueError, r"terms\[0\]: without a token_map, its logits must have the base length",
         dict(terms=[(np.zeros(9, np.float32), None, None, 1.0, "raw")])),
        (ValueError, "token_map must have length 8",
         dict(terms=[(logits, np.zeros(9, np.int32), None, 1.0, "raw")])),
        (TypeError, "token_map must have dtype int32",
         dict(terms=[(logits, np.zeros(8, np.int64), None, 1.0, "raw")])),
        (ValueError, r"token_weights\[3\] is nan",
         dict(terms=[(logits, None, np.array([1, 1, 1, np.nan, 1, 1, 1, 1], np.float32), 1.0,
                      "raw")])),
        (ValueError, r"token_weights\[0\] is 1.5",
         dict(terms=[(logits, None, np.full(8, 1.5, np.float32), 1.0, "raw")])),
        (ValueError, r"terms\[0\]: weight must be a finite", dict(terms=[(logits, None, None,
                                                                          float("nan"), "raw")])),
        (ValueError, r"terms\[0\]: weight must be a finite", dict(terms=[(logits, None, None,
                                                                          1e39, "raw")])),
        (TypeError, r"terms\[0\]: weight must be a number", dict(terms=[(logits, None, None,
                                                                         "1", "raw")])),
        (ValueError, r"terms\[0\]: transform must be 'raw' or 'log_softmax'",
         dict(terms=[(logits, None, None, 1.0, "softmax")])),
        (ValueError, "at most 16 terms", dict(terms=[good] * 17)),
        (ValueError, r"mask_alpha must be in \[0, 1\]", dict(terms=[good], mask_alpha=1.5)),
        (ValueError, r"mask_alpha must be in \[0, 1\]", dict(terms=[good], mask_alpha=-0.1)),
        (ValueError, r"mask_alpha must be in \[0, 1\]",
         dict(terms=[good], mask_alpha=float("nan"))),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            _core.fuse_terms(base, **kwargs)
    with pytest.raises(TypeError, match="base_logits must have dtype float32"):
        _core.fuse_terms(base.astype(np.float16), [good])
    assert _core.fuse_terms(base, [good] * 16).shape == (8,)


# --- the plausibility mask -----------------------------------------------------------------


@pytest.mark.parametrize("mask_alpha", [1e-30, 0.1, 0.5, 1.0])
def test_mask_matches_numpy(simd_level, mask_alpha):
    rng = np.random.default_rng(8)
    n = 4099
    base, terms = random_logits(rng, n), three_terms(rng, n)
    base[::11] = -np.inf
    out = _core.fuse_terms(base, terms, mask_alpha=mask_alpha)
    expected = reference(base, terms, mask_alpha)
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(expected))
    np.testing.assert_allclose(out, expected, rtol=LOG_SOFTMAX_TOL, atol=LOG_SOFTMAX_TOL)
    # The kept tokens are exactly those with base probability >= alpha * the best one's.
    probs = np.exp(base.astype(np.float64) - base.max())
    assert np.array_equal(np.isfinite(out), probs >= np.float32(mask_alpha) * (1 - 1e-12))


def test_mask_one_keeps_only_the_base_argmax(simd_level):
    base = np.array([1.0, 3.0, 2.0, 3.0, -np.inf], np.float32)
    out = _core.fuse_terms(base, [(np.ones(5, np.float32), None, None, 1.0, "raw")],
                           mask_alpha=1.0)
    np.testing.assert_array_equal(out, [-np.inf, 4.0, -np.inf, 4.0, -np.inf])


def test_mask_off_equals_no_mask(simd_level):
    rng = np.random.default_rng(9)
    base, terms = random_logits(rng, 4099), three_terms(rng, 4099)
    np.testing.assert_array_equal(_core.fuse_terms(base, terms, mask_alpha=0.0),
                                  _core.fuse_terms(base, terms))


# --- identities the composition relies on ----------------------------------------------------


@pytest.mark.parametrize("weight", [1.0, 0.8, 3.0])
def test_expert_minus_itself_is_base_within_float_tolerance(simd_level, weight):
    """Not bit-exact: base + w*x - w*x rounds twice (FMA or not). Within a float ulp or two
    of the larger of base and w*x."""
    rng = np.random.default_rng(10)
    n, n_expert = 4099, 2000
    base, expert = random_logits(rng, n), random_logits(rng, n_expert)
    token_map, token_weights = random_map(rng, n, n_expert), random_weights(rng, n)
    terms = [(expert, token_map, token_weights, weight, "log_softmax"),
             (expert, token_map, token_weights, -weight, "log_softmax")]
    out = _core.fuse_terms(base, terms)
    np.testing.assert_allclose(out, base, rtol=0, atol=4e-6 * weight * 10)


def test_two_halves_equal_one_whole(simd_level):
    rng = np.random.default_rng(11)
    n, n_value = 4099, 3000
    base, value = random_logits(rng, n), random_logits(rng, n_value)
    token_map, token_weights = random_map(rng, n, n_value), random_weights(rng, n)
    for transform in ("raw", "log_softmax"):
        half = (value, token_map, token_weights, 0.5, transform)
        whole = (value, token_map, token_weights, 1.0, transform)
        np.testing.assert_allclose(_core.fuse_terms(base, [half, half]),
                                   _core.fuse_terms(base, [whole]), rtol=0, atol=1e-5)


# --- _fuse_terms_and_sample ----------------------------------------------------------------


def pointer_terms(terms):
    return [(z.ctypes.data, z.size, m, w, weight, t) for z, m, w, weight, t in terms]


@pytest.mark.parametrize("n", [33, 4099, 262_144])
@pytest.mark.parametrize("mask_alpha", [0.0, 0.05])
@pytest.mark.parametrize("config", [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.05),
    dict(temperature=0.7, top_k=40, top_p=1.0, min_p=0.0, repeat_penalty=1.3),
])
def test_fuse_terms_and_sample_equals_fuse_then_sample(n, mask_alpha, config):
    rng = np.random.default_rng(n)
    base, terms = random_logits(rng, n), three_terms(rng, n)
    base[rng.choice(n, min(n, 5), replace=False)] += 8.0
    scratch = np.empty(n, np.float32)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            one_call = _core.Sampler(seed=7, **config)
            two_calls = _core.Sampler(seed=7, **config)
            for _ in range(12):
                scratch.fill(np.nan)
                token = _core._fuse_terms_and_sample(one_call, base.ctypes.data, n,
                                                     pointer_terms(terms), mask_alpha, scratch)
                fused = _core.fuse_terms(base, terms, mask_alpha)
                if "repeat_penalty" not in config:  # the penalties edit scratch in place
                    written = ~np.isnan(scratch)  # blocks the bounds ruled out stay unfused
                    np.testing.assert_array_equal(scratch[written], fused[written])
                assert token == two_calls.sample(fused), level
                one_call.accept(token)
                two_calls.accept(token)
    finally:
        _core.set_simd_level("auto")


def test_fuse_terms_and_sample_errors():
    n = 64
    base = np.zeros(n, np.float32)
    base[10] = 5.0
    scratch = np.empty(n, np.float32)
    greedy = _core.Sampler(temperature=0.0)
    value = np.zeros(n, np.float32)
    value[20] = 10.0
    terms = [(value.ctypes.data, n, None, None, 1.0, "raw")]
    assert _core._fuse_terms_and_sample(greedy, base.ctypes.data, n, [], 0.0, scratch) == 10
    assert _core._fuse_terms_and_sample(greedy, base.ctypes.data, n, terms, 0.0, scratch) == 20
    # the mask (alpha 0.5) keeps only the base's best token
    assert _core._fuse_terms_and_sample(greedy, base.ctypes.data, n, terms, 0.5, scratch) == 10
    value[3] = np.nan
    with pytest.raises(ValueError, match="^NaN in term 0 logits at index 3$"):
        _core._fuse_terms_and_sample(greedy, base.ctypes.data, n, terms, 0.0, scratch)
    with pytest.raises(ValueError, match="scratch must have length 64"):
        _core._fuse_terms_and_sample(greedy, base.ctypes.data, n, [], 0.0,
                                     np.empty(10, np.float32))
    with pytest.raises(ValueError, match=r"terms\[0\].logits_ptr is a null pointer"):
        _core._fuse_terms_and_sample(greedy, base.ctypes.data, n,
                                     [(0, n, None, None, 1.0, "raw")], 0.0, scratch)
    with pytest.raises(ValueError, match=r"terms\[0\]: without a token_map"):
        _core._fuse_terms_and_sample(greedy, base.ctypes.data, n,
                                     [(value.ctypes.data, n - 1, None, None, 1.0, "raw")], 0.0,
                                     scratch)
    with pytest.raises(ValueError, match="base_ptr is a null pointer"):
        _core._fuse_terms_and_sample(greedy, 0, n, [], 0.0, scratch)
    with pytest.raises(ValueError, match="all logits are -inf"):
        minus = np.full(n, -np.inf, np.float32)
        _core._fuse_terms_and_sample(greedy, minus.ctypes.data, n, [], 0.0, scratch)


# --- the bounded path: blocks that cannot reach the chain's survivors are never fused -------

CHAT = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)
BOUNDED_CONFIGS = {
    "greedy": dict(temperature=0.0),
    "chat": CHAT,
    "chat, top-k off": dict(CHAT, top_k=0),
    "top-k 3, hot": dict(temperature=1.5, top_k=3, top_p=1.0, min_p=0.0),
    "top-k off, cut inside": dict(temperature=1.0, top_k=0, top_p=0.95, min_p=0.05),
}


def llm_like(rng, n, spikes=20):
    """A broad body and a few strong candidates, as an LLM's logits."""
    logits = (rng.standard_normal(n) * 2.5).astype(np.float32)
    logits[rng.choice(n, spikes, replace=False)] += 14.0
    return logits


def bounded_case(case, n):
    """(base, terms in fuse_terms' form) where most blocks lie far below the best tokens."""
    rng = np.random.default_rng(len(case) * 1000 + n % 97)
    base = llm_like(rng, n)
    n_small = 49_152
    value = random_logits(rng, n, 0.8)
    small = random_logits(rng, n_small, 0.8)
    token_map, token_weights = random_map(rng, n, n_small), random_weights(rng, n)
    if case == "same vocab":
        return base, [(value, None, None, 1.0, "raw")]
    if case == "mapped":
        return base, [(small, token_map, token_weights, 1.0, "raw")]
    if case == "weighted identity, negative weight":
        return base, [(value, None, token_weights, -0.7, "raw")]
    if case == "log-softmax pair + map":
        return base, [(value, None, None, 0.5, "log_softmax"),
                      (random_logits(rng, n, 0.8), None, None, -0.5, "log_softmax"),
                      (small, token_map, None, 1.0, "raw")]
    if case == "holes and ties":  # -inf runs, and tied best tokens across block borders
        base[rng.random(n) < 0.2] = -np.inf
        base[: 64] = -np.inf
        top = np.float32(base.max() + 1.0)
        base[[31, 32, 63 * 32, n - 1]] = top
        return base, [(value, None, None, 0.0, "raw"), (small, token_map, None, 1.0, "raw")]
    if case == "+inf base":
        base[n // 3] = np.inf
        return base, [(small, token_map, token_weights, 1.0, "raw")]
    if case == "top-p cut inside":  # the best ~95 %: top-p's total is needed exactly
        logits = np.log(np.full(n, 0.0014 / (n - 2)))
        logits[[5, n // 2]] = np.log([0.951, 0.0476])
        return logits.astype(np.float32), [(value * 1e-3, None, None, 1.0, "raw")]
    raise AssertionError(case)


BOUNDED_CASES = ["same vocab", "mapped", "weighted identity, negative weight",
                 "log-softmax pair + map", "holes and ties", "+inf base", "top-p cut inside"]


@pytest.mark.parametrize("case", BOUNDED_CASES)
@pytest.mark.parametrize("n", [262_144, 262_144 - 5, 4099])
def test_bounded_path_equals_fuse_then_sample_every_level(case, n):
    base, terms = bounded_case(case, n)
    scratch = np.empty(n, np.float32)
    skipped = []  # (config, whether some block was never fused), per level
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            fused = _core.fuse_terms(base, terms)
            for name, config in BOUNDED_CONFIGS.items():
                one_call = _core.Sampler(seed=11, **config)
                reference = _core.Sampler(seed=11, **config)
                for _ in range(8):
                    scratch.fill(np.nan)
                    token = _core._fuse_terms_and_sample(one_call, base.ctypes.data, n,
                                                         pointer_terms(terms), 0.0, scratch)
                    assert token == reference.sample(fused), (level, name)
                    written = ~np.isnan(scratch)  # what was fused is exactly fuse_terms'
                    np.testing.assert_array_equal(scratch[written], fused[written])
                skipped.append((name, not written.all()))
    finally:
        _core.set_simd_level("auto")
    if n < 262_139:  # 129 blocks: top-k 40 may need them all
        return
    # Greedy and top-k never need more than the blocks near the best; without top-k, a cut
    # among min-p's survivors (tied best tokens; a best at 95.1 %) or an infinite best
    # needs top-p's exact total, and then every block is fused.
    assert all(skip for name, skip in skipped if name in ("greedy", "chat")), skipped
    if case not in ("+inf base", "top-p cut inside", "holes and ties"):
        assert any(skip for name, skip in skipped if "off" in name), skipped


def test_bounded_path_keeps_the_sweeps_nan_rules():
    rng = np.random.default_rng(77)
    n, n_small = 262_144, 49_152
    base = llm_like(rng, n)
    small = random_logits(rng, n_small, 0.8)
    token_map = random_map(rng, n, n_small - 1)  # value id n_small - 1 is never mapped
    scratch = np.empty(n, np.float32)
    sampler = _core.Sampler(seed=1, **CHAT)
    far = int(np.argmin(base))  # a token whose block the bounds would skip
    small[n_small - 1] = np.nan  # never used: no error, the same token as fuse-then-sample
    terms = [(small, token_map, None, 1.0, "raw")]
    token = _core._fuse_terms_and_sample(sampler, base.ctypes.data, n, pointer_terms(terms),
                                         0.0, scratch)
    assert token == _core.Sampler(seed=1, **CHAT).sample(_core.fuse_terms(base, terms))
    small[token_map[far]] = np.nan  # used, though only by a far block: still raised
    with pytest.raises(ValueError, match=f"^NaN in term 0 logits at index {token_map[far]}$"):
        _core._fuse_terms_and_sample(sampler, base.ctypes.data, n, pointer_terms(terms), 0.0,
                                     scratch)
    small[token_map[far]] = 0.0
    base[far] = np.nan
    with pytest.raises(ValueError, match=f"^NaN in base logits at index {far}$"):
        _core._fuse_terms_and_sample(sampler, base.ctypes.data, n, pointer_terms(terms), 0.0,
                                     scratch)


def test_bounded_path_with_penalties_and_mask_equals_fuse_then_sample():
    rng = np.random.default_rng(78)
    n = 262_144
    base, terms = bounded_case("mapped", n)
    scratch = np.empty(n, np.float32)
    for config, mask in [(dict(CHAT, top_k=0, repeat_penalty=1.3), 0.0), (CHAT, 0.05)]:
        one_call, reference = _core.Sampler(seed=3, **config), _core.Sampler(seed=3, **config)
        fused = _core.fuse_terms(base, terms, mask)
        for _ in range(10):
            token = _core._fuse_terms_and_sample(one_call, base.ctypes.data, n,
                                                 pointer_terms(terms), mask, scratch)
            assert token == reference.sample(fused)
            one_call.accept(token)
            reference.accept(token)
    del rng


def test_bounded_path_after_a_bad_map_entry_is_clean():
    n = 262_144
    base, terms = bounded_case("mapped", n)
    small, token_map, token_weights, weight, transform = terms[0]
    scratch = np.empty(n, np.float32)
    # The last (by id) of the 40 blocks top-k 40 fuses first: others are fused before it.
    block_max = base.reshape(-1, 32).max(axis=1)
    first_fused = np.sort(np.argsort(-block_max, kind="stable")[:40])
    last = int(first_fused[-1])
    bad_at = last * 32 + int(np.argmax(base[last * 32:(last + 1) * 32]))
    bad_map = token_map.copy()
    bad_map[bad_at] = small.size
    sampler = _core.Sampler(seed=5, **CHAT)
    with pytest.raises(ValueError, match=rf"^term 0: token_map\[{bad_at}\] = {small.size} "):
        _core._fuse_terms_and_sample(sampler, base.ctypes.data, n,
                                     pointer_terms([(small, bad_map, token_weights, weight,
                                                     transform)]), 0.0, scratch)
    # Another step where those blocks' best tokens come back through a same-vocabulary term
    # (so the bounds put them among the blocks fused later, not first): nothing fused before
    # the error may count as fused now.
    base, value = base.copy(), np.zeros(n, np.float32)
    for block in first_fused[:-1]:
        best = block * 32 + int(np.argmax(base[block * 32:(block + 1) * 32]))
        base[block * 32:(block + 1) * 32] -= 8.0
        value[best] = 8.0
    terms = [(value, None, None, 1.0, "raw")]
    fused = _core.fuse_terms(base, terms)
    reference = _core.Sampler(seed=5, **CHAT)
    for _ in range(10):
        scratch.fill(np.nan)
        token = _core._fuse_terms_and_sample(sampler, base.ctypes.data, n, pointer_terms(terms),
                                             0.0, scratch)
        assert token == reference.sample(fused)
        written = ~np.isnan(scratch)
        np.testing.assert_array_equal(scratch[written], fused[written])
        assert written[first_fused[:-1] * 32].all()
