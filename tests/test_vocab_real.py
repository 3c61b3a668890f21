"""The exact-text token map between two real vocabularies: Gemma 3 (SentencePiece, 262k)
and SmolLM2 (byte-level BPE, 49k)."""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local.errors import VocabMismatchError
from ivl_local.valuefile import read_gguf_header
from ivl_local.vocab import (build_exact_map, cached_map_path, identity_mapping, load_map, read_vocab,
                             resolve_mapping, save_map, store_map_alpha)

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def vocabs(gemma3_path, smollm2_path):
    return read_vocab(read_gguf_header(gemma3_path)), read_vocab(read_gguf_header(smollm2_path))


@pytest.fixture(scope="module")
def smollm2_model(smollm2_path):
    from ivl_local.backend import Model

    with Model(smollm2_path, vocab_only=True) as model:
        yield model


@pytest.fixture(scope="module")
def gemma_to_smollm2(vocabs, smollm2_model):
    """The map the Engine uses: from the user cache, or built (~20 s: one SmolLM2 tokenizer
    call per unmatched Gemma token) and cached there."""
    base, value = vocabs
    vv = smollm2_model.vocab
    return resolve_mapping(base, value, lambda t: vv.tokenize(t, add_special=False, parse_special=False))


def test_builder_is_deterministic_on_a_slice(vocabs, smollm2_model, gemma_to_smollm2):
    """A fresh build over the first 20k Gemma tokens agrees with the (cached) full map."""
    base, value = vocabs
    vv = smollm2_model.vocab
    head = type(base)(base.tokens[:20000], base.types[:20000], base.tokenizer_model, "head",
                      base.end_ids)
    fresh = build_exact_map(head, value, lambda t: vv.tokenize(t, add_special=False, parse_special=False))
    assert np.array_equal(fresh.token_map, gemma_to_smollm2.token_map[:20000])
    assert np.array_equal(fresh.token_weights, gemma_to_smollm2.token_weights[:20000])


def test_resolve_caches_the_map(vocabs, gemma_to_smollm2, monkeypatch, tmp_path):
    base, value = vocabs
    monkeypatch.setenv("IVL_CACHE_DIR", str(tmp_path))
    save_map(cached_map_path(base, value), gemma_to_smollm2)
    again = resolve_mapping(base, value, lambda t: pytest.fail("cached map not used"))
    assert np.array_equal(again.token_map, gemma_to_smollm2.token_map)
    assert again.builder == gemma_to_smollm2.builder


def test_vocab_kinds_and_fingerprints(vocabs):
    base, value = vocabs
    assert (base.kind, len(base)) == ("spm", 262144)
    assert (value.kind, len(value)) == ("bpe", 49152)
    assert base.fingerprint != value.fingerprint
    assert len(base.fingerprint) == 16


def test_known_pairs(vocabs, gemma_to_smollm2):
    base, value = vocabs
    b = {t: i for i, t in enumerate(base.tokens)}
    v = {t: i for i, t in enumerate(value.tokens)}
    pairs = {"the": "the", "▁the": "Ġthe", "\n": "Ċ", "Hello": "Hello", "▁world": "Ġworld"}
    pairs.update({d: d for d in "0123456789"})
    token_map, weights = gemma_to_smollm2.token_map, gemma_to_smollm2.token_weights
    for base_text, value_text in pairs.items():
        i = b[base_text.encode()]
        assert token_map[i] == v[value_text.encode()], base_text
        assert weights[i] == 1.0


def test_control_tokens_map_to_nothing_but_the_end_token(vocabs, gemma_to_smollm2):
    """Gemma's control tokens share no text with SmolLM2's; only its end token (<eos>, the
    file's eos id) maps, by role, to SmolLM2's turn end <|im_end|>."""
    base, value = vocabs
    assert base.end_ids == (1,) and base.tokens[1] == b"<eos>"
    assert value.tokens[value.turn_end] == b"<|im_end|>"
    control = np.flatnonzero(base.types == 3)
    assert len(control) > 100
    others = control[control != 1]
    assert (gemma_to_smollm2.token_map[others] == -1).all()
    assert (gemma_to_smollm2.token_weights[others] == 0).all()
    assert gemma_to_smollm2.token_map[1] == value.turn_end and gemma_to_smollm2.token_weights[1] == 1


def test_chatml_control_tokens_map_by_text(vocabs, smollm2_model):
    """Built (not the identity shortcut) from SmolLM2 onto itself, every control token,
    <|im_end|> included, maps to itself: what lets a ChatML value net end a ChatML base's turn."""
    _, smol = vocabs
    vv = smollm2_model.vocab
    mapping = build_exact_map(smol, smol, lambda t: vv.tokenize(t, add_special=False, parse_special=False))
    control = np.flatnonzero(smol.types == 3)
    names = {smol.tokens[i] for i in control}
    assert b"<|im_end|>" in names and b"<|im_start|>" in names
    assert (mapping.token_map[control] == control).all()
    assert (mapping.token_weights[control] == 1).all()


def test_unmatched_tokens_take_the_first_value_token(vocabs, gemma_to_smollm2, smollm2_model):
    """A long Gemma word SmolLM2 has no single token for maps to the first piece of its encoding."""
    base, value = vocabs
    value_index = {t: i for i, t in enumerate(value.tokens)}
    word = next(t for t in base.tokens if t.startswith("▁".encode()) and len(t) > 14
                and t.replace("▁".encode(), "Ġ".encode()) not in value_index and t[3:].isalpha())
    i = base.tokens.index(word)
    expected = smollm2_model.vocab.tokenize(word.replace("▁".encode(), b" "), add_special=False,
                                            parse_special=False)[0]
    assert gemma_to_smollm2.token_map[i] == expected


def test_coverage(vocabs, gemma_to_smollm2):
    base, _ = vocabs
    covered = gemma_to_smollm2.coverage(base)
    n_normal = int(np.isin(base.types, (1, 6)).sum())
    n_exact = gemma_to_smollm2.n_exact
    exact = f", {n_exact:,} ({n_exact / n_normal:.1%}) by exact text" if n_exact is not None else ""
    print(f"\nGemma 3 -> SmolLM2 token map: {covered:.1%} of {n_normal:,} normal Gemma tokens mapped"
          f"{exact}, the rest via SmolLM2's tokenizer")
    assert covered > 0.9
    if n_exact is not None:
        assert n_exact > 20000  # most of SmolLM2's 49k tokens have a Gemma twin


def test_map_file_round_trip_and_mismatch(vocabs, gemma_to_smollm2, tmp_path):
    base, value = vocabs
    path = tmp_path / "g2s.npz"
    save_map(path, gemma_to_smollm2)
    loaded = load_map(path, base, value)
    assert np.array_equal(loaded.token_map, gemma_to_smollm2.token_map)
    assert loaded.builder == gemma_to_smollm2.builder
    with pytest.raises(VocabMismatchError, match="vocabularies"):
        load_map(path, value, base)  # the other way round
    with pytest.raises(VocabMismatchError, match="no such token map"):
        load_map(tmp_path / "missing.npz", base, value)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(VocabMismatchError, match="not a token map"):
        load_map(tmp_path / "junk.npz", base, value)


def test_stored_alpha_round_trip_keeps_other_members(vocabs, gemma_to_smollm2, tmp_path):
    """A per-base alpha stored with a map (issue 15): read back, removable, and an aligned
    map's own members survive the rewrite; a hostile alpha is one VocabMismatchError."""
    import dataclasses

    base, value = vocabs
    path = tmp_path / "aligned.npz"
    save_map(path, gemma_to_smollm2, extra={"corpus_sha256": np.str_("abc123"), "corpus_bytes": np.int64(7),
                                            "junk": np.zeros(1000)})
    assert load_map(path, base, value).alpha is None
    assert store_map_alpha(path, gemma_to_smollm2, 1.5, base, value, alpha_base="g.gguf (9 bytes)") == path
    loaded = load_map(path, base, value)
    assert (loaded.alpha, loaded.alpha_base) == (1.5, "g.gguf (9 bytes)")
    assert np.array_equal(loaded.token_map, gemma_to_smollm2.token_map)
    with np.load(path) as z:   # the aligned map's provenance kept, anything unknown dropped
        assert str(z["corpus_sha256"]) == "abc123" and int(z["corpus_bytes"]) == 7 and "junk" not in z.files
    store_map_alpha(path, loaded, None, base, value)
    assert (load_map(path, base, value).alpha, load_map(path, base, value).alpha_base) == (None, None)
    for bad in (float("nan"), -1.0, 1e9):
        save_map(path, dataclasses.replace(gemma_to_smollm2, alpha=bad))
        with pytest.raises(VocabMismatchError, match="stores alpha"):
            load_map(path, base, value)
        with pytest.raises(VocabMismatchError, match="stores alpha"):   # not rewritten over
            store_map_alpha(path, gemma_to_smollm2, 1.0, base, value)
    with pytest.raises(VocabMismatchError, match="one vocabulary"):
        store_map_alpha(path, identity_mapping(value.fingerprint), 1.0, base, value)


def test_stored_alpha_is_for_one_base_file(tmp_path, gemma_to_smollm2):
    """A stored alpha names its base file: another base with the same vocabulary (another
    quantization, a larger model of the family) does not use it."""
    import dataclasses

    from ivl_local.vocab import base_identity, stored_alpha_for

    one, other = tmp_path / "one.gguf", tmp_path / "other.gguf"
    one.write_bytes(b"x" * 10)
    other.write_bytes(b"x" * 11)
    mapping = dataclasses.replace(gemma_to_smollm2, alpha=1.5, alpha_base=base_identity(one))
    assert base_identity(one) == "one.gguf (10 bytes)"
    assert stored_alpha_for(mapping, one) == 1.5 and stored_alpha_for(mapping, other) is None
    assert stored_alpha_for(dataclasses.replace(mapping, alpha_base=None), other) == 1.5
    assert stored_alpha_for(gemma_to_smollm2, one) is None


def test_same_vocabulary_is_identity(vocabs):
    _, value = vocabs
    mapping = resolve_mapping(value, value, lambda t: pytest.fail("no map needed"))
    assert mapping.identity and mapping == identity_mapping(value.fingerprint)
