"""ivl_local._core.Sampler: probability tables per step, draws, determinism, greedy."""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local import _core

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)  # no truncation


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def f32(values):
    return np.asarray(values, np.float32)


def chain_reference(logits, temperature, top_k, top_p, min_p):
    """The chain written plainly in numpy (full sort allowed here): ids and probs, best first."""
    logits = np.asarray(logits, np.float64)
    order = np.lexsort((np.arange(logits.size), -logits))  # logit desc, then id
    order = [int(i) for i in order if np.isfinite(logits[i])]
    if top_k > 0:
        order = order[:top_k]
    scaled = logits[order] / temperature
    if top_p < 1.0:
        probs = softmax(scaled)
        keep = int(np.argmax(np.cumsum(probs) >= top_p)) + 1
        order, scaled = order[:keep], scaled[:keep]
    if min_p > 0.0:
        keep = scaled - scaled.max() >= np.log(min_p)
        order, scaled = [i for i, k in zip(order, keep) if k], scaled[keep]
    return np.array(order), softmax(scaled)


def assert_probs(sampler, logits, ids, probs):
    got_ids, got_probs = sampler.probs(f32(logits))
    assert got_ids.dtype == np.int32 and got_probs.dtype == np.float32
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_probs, probs, rtol=1e-5, atol=1e-7)


LOGITS = [1.0, 2.0, 3.0, 4.0, 5.0]


def test_no_truncation_is_softmax():
    assert_probs(_core.Sampler(temperature=1.0, **OFF), LOGITS, [4, 3, 2, 1, 0],
                 softmax(LOGITS[::-1]))


def test_top_k_table():
    sampler = _core.Sampler(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
    assert_probs(sampler, LOGITS, [4, 3], softmax([5.0, 4.0]))
    assert_probs(_core.Sampler(temperature=1.0, top_k=9, top_p=1.0, min_p=0.0), LOGITS,
                 [4, 3, 2, 1, 0], softmax([5, 4, 3, 2, 1]))


def test_temperature_table():
    sampler = _core.Sampler(temperature=0.5, **OFF)
    assert_probs(sampler, LOGITS, [4, 3, 2, 1, 0], softmax(np.array([5, 4, 3, 2, 1]) / 0.5))
    hot = _core.Sampler(temperature=4.0, **OFF)
    assert_probs(hot, LOGITS, [4, 3, 2, 1, 0], softmax(np.array([5, 4, 3, 2, 1]) / 4.0))


PROBS4 = np.log([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize("top_p, kept", [(0.4, 1), (0.75, 2), (0.85, 3), (0.99, 4)])
def test_top_p_table(top_p, kept):
    sampler = _core.Sampler(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0)
    expected = np.array([0.5, 0.3, 0.15, 0.05])[:kept]
    assert_probs(sampler, PROBS4, np.arange(kept), expected / expected.sum())


@pytest.mark.parametrize("min_p, kept", [(0.05, 4), (0.2, 3), (0.5, 2), (0.9, 1)])
def test_min_p_table(min_p, kept):
    sampler = _core.Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p)
    expected = np.array([0.5, 0.3, 0.15, 0.05])[:kept]
    assert_probs(sampler, PROBS4, np.arange(kept), expected / expected.sum())


def test_penalties_table():
    logits = [2.0, -1.0, 0.5, 3.0]
    sampler = _core.Sampler(temperature=1.0, **OFF, repeat_penalty=2.0, repeat_last_n=8,
                            frequency_penalty=0.5, presence_penalty=0.25)
    for token in (0, 0, 1):
        sampler.accept(token)
    # seen twice: 2/2 - 2*0.5 - 0.25; seen once (negative logit): -1*2 - 0.5 - 0.25
    adjusted = np.array([2.0 / 2 - 1.0 - 0.25, -1.0 * 2 - 0.5 - 0.25, 0.5, 3.0])
    order = np.argsort(-adjusted, kind="stable")
    assert_probs(sampler, logits, order, softmax(adjusted)[order])
    sampler.reset()
    assert_probs(sampler, logits, [3, 0, 2, 1], softmax([3.0, 2.0, 0.5, -1.0]))


def test_penalty_window_is_last_n():
    logits = [1.0, 1.0, 1.0]
    sampler = _core.Sampler(temperature=1.0, **OFF, repeat_last_n=1, presence_penalty=1.0)
    sampler.accept(0)
    sampler.accept(2)  # pushes token 0 out of the window
    assert_probs(sampler, logits, [0, 1, 2], softmax([1.0, 1.0, 0.0]))
    off = _core.Sampler(temperature=1.0, **OFF, repeat_last_n=0, presence_penalty=1.0)
    off.accept(0)
    assert_probs(off, logits, [0, 1, 2], [1 / 3] * 3)


def test_penalties_do_not_modify_the_input():
    logits = f32([3.0, 1.0, 2.0])
    sampler = _core.Sampler(temperature=0.0, repeat_penalty=10.0)
    sampler.accept(0)
    assert sampler.sample(logits) == 2
    np.testing.assert_array_equal(logits, [3.0, 1.0, 2.0])


@pytest.mark.parametrize("config", [
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=0.7, min_p=0.0),
    dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.05),
    dict(temperature=1.0, top_k=100, top_p=0.95, min_p=0.02),
])
def test_chain_matches_reference_on_a_large_vocab(config):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal(50_000) * 3).astype(np.float32)
    logits[rng.choice(50_000, 1000, replace=False)] = -np.inf
    ids, probs = chain_reference(logits, **config)
    assert_probs(_core.Sampler(**config), logits, ids, probs)


def test_full_vocab_top_k_top_p_every_level():
    rng = np.random.default_rng(12)
    logits = (rng.standard_normal(262_144) * 2.5).astype(np.float32)
    logits[rng.choice(logits.size, 30, replace=False)] += 10
    ids, probs = chain_reference(logits, 0.8, 40, 0.9, 0.0)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            assert_probs(_core.Sampler(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0),
                         logits, ids, probs)
    finally:
        _core.set_simd_level("auto")


def test_draw_frequencies_match_probs():
    logits = f32(np.log([0.5, 0.25, 0.15, 0.1]))
    sampler = _core.Sampler(temperature=1.0, **OFF, seed=1234)
    draws = np.array([sampler.sample(logits) for _ in range(20_000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.15, 0.1], atol=0.015)


def test_draws_only_from_survivors():
    logits = f32([5.0, 4.9, 4.8, 0.0, -1.0])
    sampler = _core.Sampler(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=3)
    assert {sampler.sample(logits) for _ in range(500)} == {0, 1}


def test_seeded_determinism_and_reset():
    rng = np.random.default_rng(13)
    logits = (rng.standard_normal(262_144) * 2).astype(np.float32)
    a = _core.Sampler(temperature=1.5, top_k=0, top_p=0.95, min_p=0.0, seed=42)
    b = _core.Sampler(temperature=1.5, top_k=0, top_p=0.95, min_p=0.0, seed=42)
    c = _core.Sampler(temperature=1.5, top_k=0, top_p=0.95, min_p=0.0, seed=43)
    first = [a.sample(logits) for _ in range(12)]
    assert first == [b.sample(logits) for _ in range(12)]
    assert first != [c.sample(logits) for _ in range(12)]
    a.reset()
    assert first == [a.sample(logits) for _ in range(12)]


def test_draws_follow_the_standard_mt19937_64_stream():
    # std::mt19937_64 is fully specified by the C++ standard (seed 5489: first output
    # 14514284786278117030, 10000th 9981545732273789042), and each draw takes the top 53
    # bits as a uniform in [0, 1): the same tokens on every platform.
    cumulative = np.cumsum([0.5, 0.25, 0.15, 0.1])
    sampler = _core.Sampler(temperature=1.0, **OFF, seed=5489)
    logits = f32(np.log([0.5, 0.25, 0.15, 0.1]))
    draws = [sampler.sample(logits) for _ in range(10_000)]
    for draw, output in ((draws[0], 14514284786278117030), (draws[-1], 9981545732273789042)):
        uniform = (output >> 11) * 2.0**-53
        assert draw == int(np.searchsorted(cumulative, uniform, side="right"))


def test_greedy_ties_go_to_lowest_id_every_level():
    logits = np.zeros(262_144, np.float32)
    logits[200_000] = 7.0
    logits[100_001] = 7.0
    logits[5] = 6.9
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            for seed in (0, 1, 2):
                sampler = _core.Sampler(temperature=0.0, seed=seed)
                assert sampler.sample(logits) == 100_001
                ids, probs = sampler.probs(logits)
                assert ids.tolist() == [100_001] and probs.tolist() == [1.0]
    finally:
        _core.set_simd_level("auto")
    assert _core.Sampler(temperature=0.0).sample(f32([1.0, 5.0, 5.0, 2.0])) == 1


def test_greedy_applies_penalties():
    sampler = _core.Sampler(temperature=0.0, repeat_penalty=2.0)
    logits = f32([1.0, 3.0, 2.0])
    assert sampler.sample(logits) == 1
    sampler.accept(1)
    assert sampler.sample(logits) == 2  # 3 / 2 = 1.5 < 2


def test_fuse_and_sample_equals_fuse_then_sample_every_level():
    rng = np.random.default_rng(14)
    n, n_value = 70_001, 40_000
    base = (rng.standard_normal(n) * 2).astype(np.float32)
    value = rng.standard_normal(n_value).astype(np.float32)
    token_map = rng.integers(-1, n_value, n).astype(np.int32)
    token_weights = np.ones(n, np.float32)
    scratch = np.empty(n, np.float32)
    config = dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.0, repeat_penalty=1.3, seed=7)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            one_call, two_calls = _core.Sampler(**config), _core.Sampler(**config)
            for _ in range(20):
                token = _core._fuse_and_sample(one_call, base.ctypes.data, n, value.ctypes.data,
                                              n_value, token_map, 0.8, token_weights, scratch)
                fused = _core.fuse_logits(base, value, token_map, 0.8, token_weights)
                assert token == two_calls.sample(fused)
                one_call.accept(token)
                two_calls.accept(token)
    finally:
        _core.set_simd_level("auto")


def test_fuse_and_sample_identity_and_errors():
    n = 1000
    base, value = np.zeros(n, np.float32), np.zeros(n, np.float32)
    base[123], value[456] = 5.0, 9.0
    scratch = np.empty(n, np.float32)
    greedy = _core.Sampler(temperature=0.0)
    args = (base.ctypes.data, n, value.ctypes.data, n, None)
    assert _core._fuse_and_sample(greedy, *args, 1.0, None, scratch) == 456
    assert _core._fuse_and_sample(greedy, *args, 0.0, None, scratch) == 123
    value[7] = np.nan
    with pytest.raises(ValueError, match="NaN in value logits at index 7"):
        _core._fuse_and_sample(greedy, *args, 1.0, None, scratch)
    with pytest.raises(ValueError, match="scratch must have length 1000"):
        _core._fuse_and_sample(greedy, *args, 0.0, None, np.empty(10, np.float32))
    read_only = np.empty(n, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="scratch must be writable"):
        _core._fuse_and_sample(greedy, *args, 0.0, None, read_only)


def test_sample_ptr_and_errors():
    logits = f32([0.0, 2.0, 1.0])
    sampler = _core.Sampler(temperature=0.0)
    assert sampler._sample_ptr(logits.ctypes.data, 3) == 1
    with pytest.raises(ValueError, match="NaN in logits at index 1"):
        sampler.sample(f32([0.0, np.nan]))
    with pytest.raises(ValueError, match="all logits are -inf"):
        _core.Sampler(temperature=1.0).sample(f32([-np.inf, -np.inf]))
    with pytest.raises(ValueError, match="all logits are -inf"):
        sampler.sample(f32([-np.inf] * 3))
    with pytest.raises(ValueError, match="empty logits"):
        sampler.sample(np.zeros(0, np.float32))
    with pytest.raises(TypeError, match="logits must have dtype float32"):
        sampler.sample(np.zeros(3))


@pytest.mark.parametrize("bad", [
    dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
    dict(min_p=1.0), dict(repeat_penalty=0.0), dict(repeat_last_n=-1),
    dict(presence_penalty=float("inf")),
])
def test_invalid_settings_raise(bad):
    with pytest.raises(ValueError, match="invalid sampler setting"):
        _core.Sampler(**bad)


@pytest.mark.parametrize("setting", [
    dict(temperature=1e308), dict(temperature=3.5e38), dict(temperature=1e-320), dict(top_p=1e-320),
    dict(top_p=1e-46), dict(min_p=0.99999999999), dict(repeat_penalty=1e-300), dict(repeat_penalty=1e39),
    dict(presence_penalty=1e300), dict(presence_penalty=-1e39), dict(frequency_penalty=-1e300),
    dict(presence_penalty=3e38), dict(top_p=1e-40), dict(min_p=0.9999999),
    dict(temperature=10**400), dict(presence_penalty=-10**400), dict(temperature=1), dict(top_p=1),
])
def test_a_sampling_config_is_refused_or_builds_its_sampler(setting):
    """SamplingConfig checks in Python floats, the sampler in C++ floats: a 1e300 penalty (inf
    as a float) or a 1e-320 top_p (0) passed the first and failed the second at the first
    token (ivl serve: a 500)."""
    from ivl_local.config import SamplingConfig
    from ivl_local.errors import ConfigError

    try:
        config = SamplingConfig(**setting)
    except ConfigError as e:
        assert "invalid sampling setting" in str(e)
        return
    _core.Sampler(config.temperature, config.top_k, config.top_p, config.min_p, config.repeat_penalty,
                  config.repeat_last_n, config.presence_penalty, config.frequency_penalty, 1)


# --- fused chunked fuse + top-k / argmax (fuse_and_sample without penalties) -------------

def _fused_inputs(rng, n, mapped):
    base = (rng.standard_normal(n) * 2).astype(np.float32)
    base[rng.random(n) < 0.05] = -np.inf
    # ties: repeated maxima across chunk borders (chunks are 4096 floats)
    for i in (3, 4095, 4096, n - 1):
        if i < n:
            base[i] = 9.0
    if mapped:
        n_value = max(1, n // 3 + 5)
        value = rng.standard_normal(n_value).astype(np.float32)
        token_map = rng.integers(-1, n_value, n).astype(np.int32)
        token_map[[i for i in (3, 4095, 4096, n - 1) if i < n]] = -1  # keep the ties exact
        weights = rng.random(n).astype(np.float32)
        return base, value, token_map, weights
    value = (rng.standard_normal(n) * 0.5).astype(np.float32)
    value[[i for i in (3, 4095, 4096, n - 1) if i < n]] = 0.0
    return base, value, None, None


@pytest.mark.parametrize("n", [1, 7, 33, 4095, 4097, 8193, 70_001])
@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("config", [
    dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.0),
    dict(temperature=1.0, top_k=5, top_p=1.0, min_p=0.05),
    dict(temperature=0.0),
])
def test_fused_top_k_matches_fuse_then_sample_every_level(n, mapped, config):
    rng = np.random.default_rng(n + mapped)
    base, value, token_map, weights = _fused_inputs(rng, n, mapped)
    scratch = np.empty(n, np.float32)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            fused = _core.fuse_logits(base, value, token_map, 0.8, weights)  # FMA or not
            one_call, two_calls = _core.Sampler(**config, seed=5), _core.Sampler(**config, seed=5)
            for _ in range(8):
                token = _core._fuse_and_sample(one_call, base.ctypes.data, n, value.ctypes.data,
                                              value.size, token_map, 0.8, weights, scratch)
                assert token == two_calls.sample(fused)
                np.testing.assert_array_equal(scratch, fused)  # scratch still holds the fuse
            if config["temperature"] == 0.0:
                finite = np.where(np.isfinite(fused), fused, -np.inf)
                assert token == int(np.argmax(finite))  # ties -> lowest id
    finally:
        _core.set_simd_level("auto")


def test_fused_top_k_candidates_match_numpy_with_ties():
    # top-k 40 draws come only from the exact numpy top-40 (ties broken by lower id)
    n = 10_007
    base = np.full(n, -np.inf, np.float32)
    base[::7] = 1.0                    # 1430 tied candidates at 1.0
    base[[5000, 9000, 10_006]] = 2.0
    value = np.zeros(n, np.float32)
    scratch = np.empty(n, np.float32)
    ids, _ = chain_reference(base, 1.0, 40, 1.0, 0.0)
    assert ids[:3].tolist() == [5000, 9000, 10_006]
    sampler = _core.Sampler(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0, seed=9)
    seen = {_core._fuse_and_sample(sampler, base.ctypes.data, n, value.ctypes.data, n, None,
                                  1.0, None, scratch) for _ in range(3000)}
    assert seen <= set(ids.tolist()) and len(seen) > 30


def test_fused_path_errors_name_absolute_indexes():
    n = 20_000
    base, value = np.zeros(n, np.float32), np.zeros(n, np.float32)
    scratch = np.empty(n, np.float32)
    sampler = _core.Sampler(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0)
    greedy = _core.Sampler(temperature=0.0)
    value[13_000] = np.nan
    for s in (sampler, greedy):
        with pytest.raises(ValueError, match="NaN in value logits at index 13000"):
            _core._fuse_and_sample(s, base.ctypes.data, n, value.ctypes.data, n, None, 1.0, None,
                                  scratch)
    value[13_000] = 0.0
    base[9_001] = np.nan
    for alpha in (1.0, 0.0):
        with pytest.raises(ValueError, match="NaN in base logits at index 9001"):
            _core._fuse_and_sample(sampler, base.ctypes.data, n, value.ctypes.data, n, None,
                                  alpha, None, scratch)
    base[9_001] = 0.0
    token_map = np.zeros(n, np.int32)
    token_map[17_777] = n
    with pytest.raises(ValueError, match=r"token_map\[17777\]"):
        _core._fuse_and_sample(sampler, base.ctypes.data, n, value.ctypes.data, n, token_map,
                              1.0, None, scratch)
    base[:] = -np.inf
    for s in (sampler, greedy):
        with pytest.raises(ValueError, match="all logits are -inf"):
            _core._fuse_and_sample(s, base.ctypes.data, n, value.ctypes.data, n, None, 1.0, None,
                                  scratch)


# --- top_k = 0 on a full vocabulary: vectorised exp, counted collect, top-p bands --------

@pytest.mark.parametrize("n", [5, 9, 1031, 262_144])
@pytest.mark.parametrize("config", [
    dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0),
    dict(temperature=1.5, top_k=0, top_p=0.95, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=1.0, top_k=0, top_p=0.5, min_p=0.01),
])
def test_top_k_off_matches_reference_every_level(n, config):
    rng = np.random.default_rng(n)
    # a flat body (large nucleus) plus a few strong tokens and -inf holes
    logits = (rng.standard_normal(n) * 1.5).astype(np.float32)
    logits[rng.random(n) < 0.03] = -np.inf
    logits[rng.choice(n, min(n, 4), replace=False)] += 4.0
    ids, probs = chain_reference(logits, **config)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            got_ids, got_probs = _core.Sampler(**config).probs(logits)
            # compared by id: logits / temperature in float32 can tie where the float64
            # reference does not, which reorders equal-probability neighbours
            order, got_order = np.argsort(ids), np.argsort(got_ids)
            np.testing.assert_array_equal(got_ids[got_order], ids[order])
            np.testing.assert_allclose(got_probs[got_order], probs[order], rtol=1e-5, atol=1e-9)
    finally:
        _core.set_simd_level("auto")


def test_exp_underflow_after_top_k_every_level():
    # top-k keeps candidates whatever their distance to the max: weights of e^-709 and
    # below are subnormal or zero (the vector exp hands those lanes to std::exp)
    logits = f32([0.0, -1.0, -708.5, -709.0, -720.0, -745.0, -800.0, -1e30, -2.0, -3.0,
                  -740.0, -0.5])
    ids, probs = chain_reference(logits, 1.0, 12, 1.0, 0.0)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            sampler = _core.Sampler(temperature=1.0, top_k=12, top_p=1.0, min_p=0.0)
            got_ids, got_probs = sampler.probs(logits)
            np.testing.assert_array_equal(got_ids, ids)
            np.testing.assert_allclose(got_probs, probs, rtol=1e-6, atol=1e-45)
    finally:
        _core.set_simd_level("auto")


def test_top_k_off_draws_agree_across_levels():
    rng = np.random.default_rng(21)
    logits = (rng.standard_normal(262_144) * 2).astype(np.float32)
    draws = {}
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            sampler = _core.Sampler(temperature=1.2, top_k=0, top_p=0.95, min_p=0.0, seed=77)
            draws[level] = [sampler.sample(logits) for _ in range(20)]
    finally:
        _core.set_simd_level("auto")
    assert len({tuple(d) for d in draws.values()}) == 1


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, 1e-8])
@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (40, 0.95, 0.05), (0, 0.95, 0.0),
                                               (0, 0.95, 0.05)])
def test_a_tiny_temperature_samples_the_best_token(temperature, top_k, top_p, min_p):
    """logit / 1e-38 overflows a float to inf and the softmax after it to NaN: the sampler
    answered garbage (' shabe kounounso' where greedy said 'Hello'). Now the distance below
    the best logit is divided instead: the best token, every time; ties share the draws."""
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(50_000) * 3).astype(np.float32)
    logits[123] = logits.max() + 0.5
    for seed in range(5):
        sampler = _core.Sampler(temperature, top_k, top_p, min_p, 1.0, 64, 0.0, 0.0, seed)
        assert {sampler.sample(logits) for _ in range(20)} == {123}
    logits[456] = logits[123]   # a tie: both, and only them
    sampler = _core.Sampler(temperature, top_k, top_p, min_p, 1.0, 64, 0.0, 0.0, 7)
    assert {sampler.sample(logits) for _ in range(200)} <= {123, 456}


# --- the nucleus path: top_k = 0 with min-p (the chat settings without top-k) -------------
# One read of the vocabulary keeps the tokens within e^-10 of the best exactly; the rest
# enter top-p's total only as bounds. These pin it to the plain chain.

CHAT_NO_TOP_K = dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.05)


def _llm_like(rng, n, spikes=20, scale=2.5):
    logits = (rng.standard_normal(n) * scale).astype(np.float32)
    logits[rng.choice(n, spikes, replace=False)] += 12.0
    return logits


def _peaked(n, p_best, p_second, tail_mass, seed=0):
    """Log-probabilities: a best and a second token, the rest spread over n - 2 tokens."""
    rng = np.random.default_rng(seed)
    tail = rng.random(n - 2) + 0.5
    tail *= tail_mass / tail.sum()
    probs = np.concatenate([[p_best, p_second], tail])
    order = rng.permutation(n)
    return np.log(probs[order] / probs.sum()).astype(np.float32), order


@pytest.mark.parametrize("case", ["llm", "holes", "ties", "flat", "cut_inside", "cut_at_edge",
                                  "one_survivor", "hot"])
def test_nucleus_path_matches_reference_every_level(case):
    rng = np.random.default_rng(31)
    n = 262_144
    config = dict(CHAT_NO_TOP_K)
    if case == "llm":
        logits = _llm_like(rng, n)
    elif case == "holes":
        logits = _llm_like(rng, n)
        logits[rng.random(n) < 0.3] = -np.inf
    elif case == "ties":  # tied best tokens across chunk and block borders
        logits = _llm_like(rng, n)
        logits[[31, 32, 4095, 4096, n - 1]] = logits.max() + 1.0
    elif case == "flat":  # every token within the exact band: the scan keeps them all
        logits = (rng.standard_normal(n) * 0.3).astype(np.float32)
    elif case == "cut_inside":  # top-p stops at the best token though two survive min-p
        logits, _ = _peaked(n, 0.951, 0.0476, 0.0014)
        config.update(temperature=1.0)
    elif case == "cut_at_edge":  # the cut 1e-4 from the boundary: the bounds cannot tell
        logits, _ = _peaked(n, 0.9499, 0.0476, 0.0025)
        config.update(temperature=1.0)
    elif case == "one_survivor":
        logits, _ = _peaked(n, 0.99, 0.001, 0.009)
    else:
        logits = _llm_like(rng, n)
        config.update(temperature=1.7, top_p=0.9, min_p=0.01)
    ids, probs = chain_reference(logits, **config)
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            got_ids, got_probs = _core.Sampler(**config).probs(logits)
            if case == "flat":  # float32 / t can tie where float64 does not: compare by id
                order, got_order = np.argsort(ids), np.argsort(got_ids)
                np.testing.assert_array_equal(got_ids[got_order], ids[order])
                np.testing.assert_allclose(got_probs[got_order], probs[order], rtol=1e-5, atol=1e-9)
            else:
                np.testing.assert_array_equal(got_ids, ids)
                np.testing.assert_allclose(got_probs, probs, rtol=1e-5, atol=1e-9)
    finally:
        _core.set_simd_level("auto")


def test_nucleus_path_cuts_where_top_p_says():
    n, config = 262_144, dict(CHAT_NO_TOP_K, temperature=1.0)
    inside, _ = _peaked(n, 0.951, 0.0476, 0.0014)  # the best alone is 95.1 %
    assert len(_core.Sampler(**dict(config, top_p=1.0)).probs(inside)[0]) == 2  # min-p: 2
    ids, probs = _core.Sampler(**config).probs(inside)
    assert ids.tolist() == [int(np.argmax(inside))] and probs.tolist() == [1.0]
    at_two, _ = _peaked(n, 0.90, 0.07, 0.03)  # 90 % then 97 %: top-p keeps both
    assert len(_core.Sampler(**config).probs(at_two)[0]) == 2


def test_nucleus_draws_follow_the_canonical_order_and_the_mt19937_64_stream():
    # seed 5489: the first output of std::mt19937_64 is 14514284786278117030
    rng = np.random.default_rng(32)
    logits = _llm_like(rng, 262_144, spikes=6)
    logits[rng.choice(logits.size, 6, replace=False)] = logits.max() - 0.3
    ids, probs = chain_reference(logits, **CHAT_NO_TOP_K)
    assert len(ids) > 3
    uniform = (14514284786278117030 >> 11) * 2.0**-53
    expected = ids[int(np.searchsorted(np.cumsum(probs), uniform, side="right"))]
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            assert _core.Sampler(**CHAT_NO_TOP_K, seed=5489).sample(logits) == expected
    finally:
        _core.set_simd_level("auto")


@pytest.mark.parametrize("mapped", [False, True])
def test_nucleus_fused_paths_equal_fuse_then_sample_every_level(mapped):
    rng = np.random.default_rng(33 + mapped)
    n = 262_144 - 5  # a partial last block
    base = _llm_like(rng, n)
    base[rng.random(n) < 0.05] = -np.inf
    n_value = 49_152 if mapped else n
    value = (rng.standard_normal(n_value) * 2).astype(np.float32)
    token_map = rng.integers(-1, n_value, n).astype(np.int32) if mapped else None
    weights = rng.random(n).astype(np.float32) if mapped else None
    scratch = np.empty(n, np.float32)
    terms = [(value.ctypes.data, n_value, token_map, weights, 0.8, "raw")]
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            fused = _core.fuse_terms(base, [(value, token_map, weights, 0.8, "raw")])
            ids, probs = chain_reference(fused, **CHAT_NO_TOP_K)
            one, two, three = (_core.Sampler(**CHAT_NO_TOP_K, seed=9) for _ in range(3))
            np.testing.assert_array_equal(one.probs(fused)[0], ids)
            drawn = []
            for _ in range(30):
                token = _core._fuse_terms_and_sample(one, base.ctypes.data, n, terms, 0.0, scratch)
                assert token == two.sample(fused)
                if not mapped:
                    assert token == _core._fuse_and_sample(three, base.ctypes.data, n,
                                                          value.ctypes.data, n, None, 0.8, None,
                                                          scratch)
                drawn.append(token)
            assert set(drawn) <= set(ids.tolist())
    finally:
        _core.set_simd_level("auto")


def test_nucleus_path_with_penalties_matches_reference():
    rng = np.random.default_rng(34)
    logits = _llm_like(rng, 262_144)
    best = np.argsort(-logits)[:3]
    sampler = _core.Sampler(**CHAT_NO_TOP_K, repeat_penalty=1.5, presence_penalty=0.5)
    for token in best[:2]:
        sampler.accept(int(token))
    adjusted = logits.astype(np.float64)
    for token in best[:2]:
        x = adjusted[token]
        adjusted[token] = (x / 1.5 if x > 0 else x * 1.5) - 0.5
    ids, probs = chain_reference(adjusted.astype(np.float32), **CHAT_NO_TOP_K)
    got_ids, got_probs = sampler.probs(logits)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_probs, probs, rtol=1e-5, atol=1e-9)


def test_nucleus_draw_frequencies_match_probs():
    logits = np.full(70_000, -30.0, np.float32)
    logits[[10, 20_000, 69_999]] = np.log([0.6, 0.3, 0.1]).astype(np.float32) + 10
    sampler = _core.Sampler(temperature=1.0, top_k=0, top_p=0.95, min_p=0.05, seed=4)
    ids, probs = sampler.probs(logits)
    assert ids.tolist() == [10, 20_000, 69_999]
    draws = np.array([sampler.sample(logits) for _ in range(20_000)])
    freq = np.array([(draws == i).mean() for i in ids])
    np.testing.assert_allclose(freq, probs, atol=0.015)
