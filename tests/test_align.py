"""Corpus-aligned token maps: the DTW against a plain reference, the map rule on tiny
tables, and (real) a map between Gemma 3 and SmolLM2 that vocab.load_map accepts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ivl_local.align import (band_limits, corpus_documents, dtw_path, levenshtein,
                             map_from_pairs, token_cost)


@pytest.mark.parametrize("a, b, d", [("", "", 0), ("abc", "", 3), ("kitten", "sitting", 3),
                                     ("flaw", "lawn", 2), ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_token_cost_ignores_spaces_and_discounts_containment():
    assert token_cost(" the", "the") == 0.0
    assert token_cost(" under", " understanding") == pytest.approx(0.1 * 8)
    assert token_cost("cat", "dog") == 3.0
    assert token_cost("ab", "ba") == 2.0


def reference_dtw(cost: np.ndarray) -> float:
    """Textbook O(nm) DTW on a dense matrix (inf = forbidden)."""
    n, m = cost.shape
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i, j] = cost[i - 1, j - 1] + min(d[i - 1, j], d[i, j - 1], d[i - 1, j - 1])
    return d[n, m]


def path_cost(cost: np.ndarray, path) -> float:
    return float(sum(cost[i, j] for i, j in path))


def check_path(path, n, m):
    assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
    for (i0, j0), (i1, j1) in itertools.pairwise(path):
        assert (i1 - i0, j1 - j0) in ((1, 0), (0, 1), (1, 1))


@pytest.mark.parametrize("n, m, seed", [(1, 1, 0), (1, 5, 1), (6, 1, 2), (7, 9, 3), (13, 8, 4), (20, 20, 5)])
def test_dtw_full_band_matches_reference(n, m, seed):
    cost = np.random.default_rng(seed).random((n, m)).round(2)
    lo, hi = np.zeros(n, np.int64), np.full(n, m, np.int64)
    path = dtw_path([cost[i] for i in range(n)], lo, hi, m)
    check_path(path, n, m)
    assert path_cost(cost, path) == pytest.approx(reference_dtw(cost))


def test_dtw_band_is_respected_and_optimal_within_it():
    rng = np.random.default_rng(7)
    n, m = 30, 40
    base_off = np.concatenate(([0], np.cumsum(rng.integers(1, 6, n)))).astype(float)
    value_off = np.concatenate(([0], np.cumsum(rng.integers(1, 5, m)))).astype(float)
    value_off *= base_off[-1] / value_off[-1]
    lo, hi = band_limits(base_off, value_off, band=3)
    assert lo[0] == 0 and hi[-1] == m
    assert np.all(np.diff(lo) >= 0) and np.all(np.diff(hi) >= 0) and np.all(hi > lo)
    assert np.all(lo[1:] <= hi[:-1])
    dense = rng.random((n, m))
    banded = np.full((n, m), np.inf)
    for i in range(n):
        banded[i, lo[i]:hi[i]] = dense[i, lo[i]:hi[i]]
    path = dtw_path([dense[i, lo[i]:hi[i]] for i in range(n)], lo, hi, m)
    check_path(path, n, m)
    assert all(lo[i] <= j < hi[i] for i, j in path)
    assert path_cost(banded, path) == pytest.approx(reference_dtw(banded))


def test_map_from_pairs_keeps_most_frequent_with_share_as_weight():
    # base 0: value 3 twice, value 1 once; base 2: value 1 once; base 1, 3 never aligned
    b = np.array([0, 0, 0, 2])
    v = np.array([3, 1, 3, 1])
    token_map, weights = map_from_pairs(b, v, n_base=4, n_value=5)
    assert token_map.dtype == np.int32 and weights.dtype == np.float32
    assert token_map.tolist() == [3, -1, 1, -1]
    assert weights.tolist() == pytest.approx([2 / 3, 0, 1, 0])


def test_map_from_pairs_tie_prefers_cheaper_then_lower_id():
    b = np.array([0, 0, 1, 1])
    v = np.array([4, 2, 4, 2])
    costs = np.array([0.1, 2.0, 1.0, 1.0])
    token_map, weights = map_from_pairs(b, v, 2, 5, costs)
    assert token_map.tolist() == [4, 2]
    assert weights.tolist() == pytest.approx([0.5, 0.5])
    empty_map, empty_w = map_from_pairs(np.empty(0, np.int64), np.empty(0, np.int64), 3, 3)
    assert empty_map.tolist() == [-1, -1, -1] and empty_w.tolist() == [0, 0, 0]


def test_corpus_documents_split_paragraphs_and_long_ones():
    text = "one two\n\n\nthree\n\n" + ("word " * 100)
    docs = corpus_documents(text, max_doc_bytes=64)
    assert docs[0] == "one two" and docs[1] == "three"
    assert all(len(d.encode()) <= 64 for d in docs)
    assert "".join(docs[2:]).split() == ["word"] * 100


@pytest.mark.real
def test_aligned_map_gemma_from_smollm2_loads_and_maps_digits(tmp_path, gemma3_path, smollm2_path):
    from ivl_local.align import build_aligned_map
    from ivl_local.backend import Model
    from ivl_local.valuefile import read_gguf_header
    from ivl_local.vocab import load_map, read_vocab

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("User: What is 12 + 7?\nAssistant: 19\n\nThe quick brown fox jumps over the lazy dog.\n\n"
                      "Numbers 0 1 2 3 4 5 6 7 8 9 and words: understanding, tokenizer, alignment.\n")
    out = build_aligned_map(gemma3_path, smollm2_path, corpus, tmp_path / "map.npz", progress=False)
    base, value = read_vocab(read_gguf_header(gemma3_path)), read_vocab(read_gguf_header(smollm2_path))
    mapping = load_map(out, base, value)
    assert mapping.builder == "aligned"
    with np.load(out) as z:
        assert str(z["builder"]) == "aligned" and int(z["aligned_pairs"]) > 20
    gemma, smol = Model(gemma3_path, vocab_only=True), Model(smollm2_path, vocab_only=True)
    try:
        for digit in "0123456789":
            [b_id] = gemma.vocab.tokenize(digit, add_special=False, parse_special=False)
            v_id = int(mapping.token_map[b_id])
            assert v_id >= 0 and smol.vocab.piece(v_id) == digit.encode()
        [fox] = gemma.vocab.tokenize(" fox", add_special=False, parse_special=False)
        assert smol.vocab.piece(int(mapping.token_map[fox])) == b" fox"
        assert mapping.token_weights[fox] == 1.0
        assert (mapping.token_map >= 0).sum() < 200     # only what the corpus covers
    finally:
        gemma.close()
        smol.close()
