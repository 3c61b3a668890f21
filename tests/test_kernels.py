"""ivl_local._core fuse kernels against a numpy reference, at every SIMD level."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from ivl_local import _core

LENGTHS = [1, 7, 31, 32, 33, 63, 257, 4099, 262_144]


@pytest.fixture(params=_core.available_simd_levels())
def simd_level(request):
    _core.set_simd_level(request.param)
    assert _core.simd_level() == request.param
    yield request.param
    _core.set_simd_level("auto")


def reference(base, value, token_map=None, alpha=1.0, token_weights=None):
    """out[i] = base[i] + alpha * w[i] * value[map[i]] in float32; zero contributions add
    nothing and an infinite base is kept (the contract's rules, spelled out)."""
    base = base.astype(np.float32)
    n = base.size
    index = np.arange(n) if token_map is None else token_map
    weights = np.ones(n, np.float32) if token_weights is None else token_weights
    coef = np.float32(alpha) * weights
    mapped = index >= 0
    gathered = np.where(mapped, value[np.maximum(index, 0)], np.float32(0))
    with np.errstate(invalid="ignore", over="ignore"):
        out = base + coef * gathered
    keep = ~mapped | (coef == 0) | np.isinf(base)
    return np.where(keep, base, out).astype(np.float32)


def random_logits(rng, n, scale=3.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("n", LENGTHS)
def test_identity_matches_numpy(simd_level, n):
    rng = np.random.default_rng(n)
    base, value = random_logits(rng, n), random_logits(rng, n)
    out = _core.fuse_logits(base, value, alpha=0.7)
    assert out.dtype == np.float32 and out.shape == (n,)
    np.testing.assert_allclose(out, reference(base, value, alpha=0.7), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n", LENGTHS)
def test_mapped_with_weights_matches_numpy(simd_level, n):
    rng = np.random.default_rng(n + 1)
    n_value = max(1, n // 2 + 3)
    base, value = random_logits(rng, n), random_logits(rng, n_value)
    token_map = rng.integers(-1, n_value, n).astype(np.int32)
    token_weights = rng.random(n).astype(np.float32)
    token_weights[rng.random(n) < 0.1] = 0.0
    out = _core.fuse_logits(base, value, token_map, 1.3, token_weights)
    expected = reference(base, value, token_map, 1.3, token_weights)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)


def test_unmapped_and_zero_weight_entries_are_exactly_base(simd_level):
    rng = np.random.default_rng(3)
    n = 1000
    base, value = random_logits(rng, n), random_logits(rng, n)
    value[::3] = -np.inf
    value[1::3] = np.inf
    token_map = np.arange(n, dtype=np.int32)
    token_map[::2] = -1
    token_weights = np.ones(n, np.float32)
    token_weights[1::2] = 0.0  # every mapped entry has weight 0 -> no contribution anywhere
    out = _core.fuse_logits(base, value, token_map, 2.0, token_weights)
    np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("n", [7, 33, 262_144])
def test_alpha_zero_returns_base_exactly(simd_level, n):
    rng = np.random.default_rng(4)
    base = random_logits(rng, n)
    base[::5] = -np.inf
    value = random_logits(rng, n)
    value[::2] = -np.inf
    value[1::4] = np.nan  # value is not read at all when alpha == 0
    np.testing.assert_array_equal(_core.fuse_logits(base, value, alpha=0.0), base)
    token_map = np.arange(n, dtype=np.int32)[::-1].copy()
    np.testing.assert_array_equal(_core.fuse_logits(base, value, token_map, 0.0), base)


def test_infinities(simd_level):
    n = 70  # two SIMD blocks and a tail
    base = np.zeros(n, np.float32)
    value = np.zeros(n, np.float32)
    base[0], value[0] = -np.inf, np.inf     # -inf base stays -inf despite +inf value
    base[1], value[1] = 1.0, -np.inf        # finite base + (-inf) contribution -> -inf
    base[2], value[2] = -np.inf, 5.0        # -inf + finite -> -inf
    base[40], value[40] = 2.0, np.inf       # -> +inf
    base[69], value[69] = -np.inf, np.inf   # in the tail
    out = _core.fuse_logits(base, value, alpha=0.5)
    assert out[0] == -np.inf and out[1] == -np.inf and out[2] == -np.inf
    assert out[40] == np.inf and out[69] == -np.inf
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[3:40], 0.0)
    # negative alpha flips the infinite contribution
    out = _core.fuse_logits(base, value, alpha=-1.0)
    assert out[1] == np.inf and out[40] == -np.inf and out[0] == -np.inf


@pytest.mark.parametrize("index", [0, 5, 31, 32, 100, 262_143])
def test_nan_in_base_raises_with_index(simd_level, index):
    n = 262_144
    base, value = np.zeros(n, np.float32), np.zeros(n, np.float32)
    base[index] = np.nan
    with pytest.raises(ValueError, match=rf"NaN in base logits at index {index}$"):
        _core.fuse_logits(base, value)
    with pytest.raises(ValueError, match=rf"NaN in base logits at index {index}$"):
        _core.fuse_logits(base, value, alpha=0.0)


@pytest.mark.parametrize("index", [3, 40, 1000])
def test_nan_in_value_raises_with_value_index(simd_level, index):
    n = 1001
    base, value = np.zeros(n, np.float32), np.zeros(n, np.float32)
    value[index] = np.nan
    with pytest.raises(ValueError, match=rf"NaN in value logits at index {index}$"):
        _core.fuse_logits(base, value)
    reverse = np.arange(n, dtype=np.int32)[::-1].copy()
    with pytest.raises(ValueError, match=rf"NaN in value logits at index {index}$"):
        _core.fuse_logits(base, value, reverse)
    # a NaN that no base token maps to is not used
    unused = reverse.copy()
    unused[reverse == index] = -1
    np.testing.assert_array_equal(_core.fuse_logits(base, value, unused), base)


@pytest.mark.parametrize("bad", [-2, 50, 2**31 - 1, -(2**31)])
def test_map_out_of_range_raises(simd_level, bad):
    n, n_value = 100, 50
    base, value = np.zeros(n, np.float32), np.zeros(n_value, np.float32)
    token_map = np.zeros(n, np.int32)
    token_map[77] = bad
    with pytest.raises(ValueError, match=r"token_map\[77\]"):
        _core.fuse_logits(base, value, token_map)


def test_empty_value_vocab_with_all_unmapped():
    base = np.arange(40, dtype=np.float32)
    out = _core.fuse_logits(base, np.zeros(0, np.float32), np.full(40, -1, np.int32))
    np.testing.assert_array_equal(out, base)


def test_levels_agree():
    rng = np.random.default_rng(9)
    n = 10_007
    base, value = random_logits(rng, n), random_logits(rng, 5000)
    token_map = rng.integers(-1, 5000, n).astype(np.int32)
    token_weights = rng.random(n).astype(np.float32)
    results = []
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            results.append(_core.fuse_logits(base, value, token_map, 0.9, token_weights))
    finally:
        _core.set_simd_level("auto")
    for out in results[1:]:
        np.testing.assert_allclose(out, results[0], rtol=2e-6, atol=2e-6)


def test_ptr_variant_out_of_place_and_in_place(simd_level):
    rng = np.random.default_rng(5)
    n = 4099
    base, value = random_logits(rng, n), random_logits(rng, n)
    token_map = rng.permutation(n).astype(np.int32)
    expected = reference(base, value, token_map, 0.5)
    out = np.empty_like(base)
    _core._fuse_logits_ptr(out.ctypes.data, base.ctypes.data, n, value.ctypes.data, n,
                          token_map, 0.5, None)
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)
    in_place = base.copy()
    _core._fuse_logits_ptr(in_place.ctypes.data, in_place.ctypes.data, n, value.ctypes.data, n,
                          token_map, 0.5, None)
    np.testing.assert_array_equal(in_place, out)
    # ctypes buffers (what llama_get_logits_ith hands out) work the same way
    raw = (ctypes.c_float * n)(*base.tolist())
    _core._fuse_logits_ptr(ctypes.addressof(raw), ctypes.addressof(raw), n, value.ctypes.data, n,
                          token_map, 0.5, None)
    np.testing.assert_array_equal(np.ctypeslib.as_array(raw), out)


def test_in_place_nan_error_still_names_base_index(simd_level):
    n = 64
    buf = np.zeros(n, np.float32)
    buf[10] = np.nan
    value = np.ones(n, np.float32)
    with pytest.raises(ValueError, match=r"NaN in base logits at index 10$"):
        _core._fuse_logits_ptr(buf.ctypes.data, buf.ctypes.data, n, value.ctypes.data, n,
                              None, 1.0, None)


def test_rejects_bad_arrays():
    base = np.zeros(16, np.float32)
    with pytest.raises(TypeError, match="base_logits must have dtype float32"):
        _core.fuse_logits(base.astype(np.float64), base)
    with pytest.raises(TypeError, match="base_logits must have dtype float32"):
        _core.fuse_logits(base.astype(">f4"), base)
    with pytest.raises(TypeError, match="value_logits must be a numpy float32 array"):
        _core.fuse_logits(base, [0.0] * 16)
    with pytest.raises(TypeError, match="token_map must have dtype int32"):
        _core.fuse_logits(base, base, np.zeros(16, np.int64))
    with pytest.raises(TypeError, match="token_weights must have dtype float32"):
        _core.fuse_logits(base, base, None, 1.0, np.ones(16, np.float64))
    with pytest.raises(ValueError, match="must be C-contiguous"):
        _core.fuse_logits(np.zeros(32, np.float32)[::2], base)
    with pytest.raises(ValueError, match="must be 1-D"):
        _core.fuse_logits(base.reshape(4, 4), base.reshape(4, 4))
    with pytest.raises(ValueError, match="token_map must have length 16"):
        _core.fuse_logits(base, base, np.zeros(15, np.int32))
    with pytest.raises(ValueError, match="without a token_map"):
        _core.fuse_logits(base, np.zeros(17, np.float32))
    with pytest.raises(ValueError, match="null pointer"):
        _core._fuse_logits_ptr(0, base.ctypes.data, 16, base.ctypes.data, 16, None, 1.0, None)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        _core.fuse_logits(base, base, alpha=float("nan"))
    for bad in (np.nan, -0.5, 1.5, np.inf):
        weights = np.ones(16, np.float32)
        weights[11] = bad
        with pytest.raises(ValueError, match=r"token_weights\[11\] is .*must be in \[0, 1\]"):
            _core.fuse_logits(base, base, np.arange(16, dtype=np.int32), 1.0, weights)
        with pytest.raises(ValueError, match=r"token_weights\[11\]"):
            _core._fuse_logits_ptr(base.ctypes.data, base.ctypes.data, 16, base.ctypes.data, 16,
                                   None, 1.0, weights)


def test_raw_pointer_entry_points_are_private():
    """Apps cannot pass a wild address through a public name (only the engine uses these)."""
    public = {name for name in dir(_core) if not name.startswith("_")}
    assert not {"fuse_logits_ptr", "fuse_and_sample"} & public
    assert "sample_ptr" not in dir(_core.Sampler) and "_sample_ptr" in dir(_core.Sampler)


def test_simd_level_controls():
    levels = _core.available_simd_levels()
    assert levels[0] == "scalar"
    assert set(levels) <= {"scalar", "neon", "avx2", "avx512"}
    try:
        _core.set_simd_level("scalar")
        assert _core.simd_level() == "scalar"
        with pytest.raises(ValueError, match="not available"):
            _core.set_simd_level("sse9")
    finally:
        _core.set_simd_level("auto")
    assert _core.simd_level() == levels[-1]
