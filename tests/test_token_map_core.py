"""ivl_local._core.build_token_map / normalize_token on synthetic SPM and BPE vocabularies."""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local import _core

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table, written independently: printable bytes keep their code point, the
    other 68 get U+0100 + their rank."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_text(raw: bytes) -> bytes:
    table = gpt2_bytes_to_unicode()
    return "".join(table[b] for b in raw).encode("utf-8")


@pytest.mark.parametrize("text, expected", [
    ("▁hello".encode(), b" hello"),
    ("▁▁x▁".encode(), b"  x "),
    (b"<0x0A>", b"\n"),
    (b"<0xff>", b"\xff"),
    (b"<0xZZ>", b"<0xZZ>"),
    ("caf\u00e9".encode(), "café".encode()),
    (b"", b""),
])
def test_normalize_spm(text, expected):
    assert _core.normalize_token(text, "spm") == expected


def test_normalize_bpe_full_byte_table():
    table = gpt2_bytes_to_unicode()
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    for b in range(256):
        assert _core.normalize_token(table[b].encode("utf-8"), "bpe") == bytes([b]), b
    raw = "héllo wörld\n\t€".encode("utf-8")
    assert _core.normalize_token(bpe_text(raw), "bpe") == raw


def test_normalize_bpe_literal_and_user_defined():
    assert _core.normalize_token("Ġhello".encode(), "bpe") == b" hello"
    assert _core.normalize_token("中".encode(), "bpe") == "中".encode()  # outside the table
    assert _core.normalize_token("▁a".encode(), "spm", USER) == "▁a".encode()
    assert _core.normalize_token("Ġa".encode(), "bpe", USER) == "Ġa".encode()
    with pytest.raises(ValueError, match="'spm' or 'bpe'"):
        _core.normalize_token(b"x", "wordpiece")


def build(base, value, base_kind="spm", value_kind="bpe"):
    base_tokens = [t.encode() if isinstance(t, str) else t for t, _ in base]
    value_tokens = [t.encode() if isinstance(t, str) else t for t, _ in value]
    return _core.build_token_map(base_tokens, np.array([k for _, k in base], np.int32), base_kind,
                                 value_tokens, np.array([k for _, k in value], np.int32),
                                 value_kind)


SPM_BASE = [
    ("<unk>", UNKNOWN),     # 0 -> -1, not unmatched
    ("<s>", CONTROL),       # 1 -> -1
    ("▁the", NORMAL),       # 2 -> value 2 ("Ġthe" normal beats " the" user-defined at 1)
    ("the", NORMAL),        # 3 -> value 3 (lowest id of two "the")
    ("<0x0A>", BYTE),       # 4 -> value 5 ("Ċ")
    ("▁zebra", NORMAL),     # 5 -> unmatched (value's "Ġzebra" is a control token)
    ("<unused0>", UNUSED),  # 6 -> -1
    ("<tag>", USER),        # 7 -> value 6
    ("▁", NORMAL),          # 8 -> value 8 ("Ġ")
    ("xyz", NORMAL),        # 9 -> unmatched
    ("", NORMAL),           # 10 -> -1, nothing to match
]
BPE_VALUE = [
    ("<|endoftext|>", CONTROL),  # 0
    (" the", USER),              # 1
    ("Ġthe", NORMAL),            # 2
    ("the", NORMAL),             # 3
    ("the", NORMAL),             # 4
    ("Ċ", NORMAL),               # 5
    ("<tag>", USER),             # 6
    ("Ġzebra", CONTROL),         # 7
    ("Ġ", NORMAL),               # 8
    ("xyz", UNUSED),             # 9
]


def test_spm_base_onto_bpe_value():
    token_map, token_weights, unmatched = build(SPM_BASE, BPE_VALUE)
    assert token_map.dtype == np.int32 and token_weights.dtype == np.float32
    assert unmatched.dtype == np.int32
    assert token_map.tolist() == [-1, -1, 2, 3, 5, -1, -1, 6, 8, -1, -1]
    assert token_weights.tolist() == [float(m >= 0) for m in token_map]
    assert unmatched.tolist() == [5, 9]


def test_bpe_base_onto_spm_value():
    base = [("Ġthe", NORMAL), ("Ċ", NORMAL), ("<|im_start|>", CONTROL), ("Ã©", NORMAL),
            ("zz", NORMAL)]
    value = [("<unk>", UNKNOWN), ("<0x0A>", BYTE), ("▁the", NORMAL), ("é", NORMAL),
             ("<|im_start|>", NORMAL)]
    token_map, token_weights, unmatched = build(base, value, "bpe", "spm")
    assert token_map.tolist() == [2, 1, -1, 3, -1]
    assert token_weights.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert unmatched.tolist() == [4]


def test_same_vocab_maps_to_itself():
    vocab = [("<s>", CONTROL)] + [(bpe_text(bytes([b])), NORMAL) for b in range(256)]
    vocab += [(bpe_text(w.encode()), NORMAL) for w in (" hello", " world", "ing", "\n\n")]
    token_map, token_weights, unmatched = build(vocab, vocab, "bpe", "bpe")
    assert token_map.tolist() == list(range(len(vocab)))   # the control token "<s>" too
    assert unmatched.size == 0
    assert token_weights.min() == 1.0


def test_control_tokens_map_only_to_control_tokens_of_identical_text():
    # Two ChatML vocabularies (SmolLM2 and Qwen share <|im_start|>/<|im_end|>/<|endoftext|>):
    # without this the value's end-of-turn never reaches the base's, and answers run on.
    base = [("<|im_end|>", CONTROL), ("<|endoftext|>", CONTROL), ("<end_of_turn>", CONTROL),
            ("<|im_start|>", CONTROL), ("hi", NORMAL), ("<s>", CONTROL)]
    value = [("hi", NORMAL), ("<|endoftext|>", CONTROL), ("<|im_end|>", CONTROL),
             ("<|im_start|>", NORMAL), ("<end_of_turn>", USER), ("<|im_end|>", CONTROL),
             ("<s>", NORMAL)]
    token_map, token_weights, unmatched = build(base, value, "bpe", "bpe")
    # <|im_end|>: the lowest of two control ids; <end_of_turn>, <|im_start|>, <s>: the value's
    # tokens of that text are not control tokens, so no match (and never "unmatched")
    assert token_map.tolist() == [2, 1, -1, -1, 0, -1]
    assert token_weights.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert unmatched.size == 0


def test_rejects_bad_inputs():
    types = np.ones(2, np.int32)
    with pytest.raises(TypeError, match="base_tokens must be a list of bytes"):
        _core.build_token_map(["a", "b"], types, "spm", [b"a", b"b"], types, "bpe")
    with pytest.raises(ValueError, match="base_types must have length 2"):
        _core.build_token_map([b"a", b"b"], np.ones(3, np.int32), "spm", [b"a"],
                              np.ones(1, np.int32), "bpe")
    with pytest.raises(TypeError, match="value_types must have dtype int32"):
        _core.build_token_map([b"a", b"b"], types, "spm", [b"a", b"b"], np.ones(2), "bpe")
    with pytest.raises(ValueError, match="'spm' or 'bpe'"):
        _core.build_token_map([b"a", b"b"], types, "sp", [b"a", b"b"], types, "bpe")


def test_end_tokens_map_by_role_where_text_does_not():
    from ivl_local.vocab import VocabData, map_end_tokens

    def vocab(tokens, types, ends):
        return VocabData([t.encode() for t in tokens], np.array(types, np.int32), "gpt2", "fp", ends)

    base = vocab(["<eos>", "<|im_end|>", "a", "<end_of_turn>"], [CONTROL, CONTROL, NORMAL, CONTROL], (3, 0, 1))
    value = vocab(["a", "<|im_end|>", "<|endoftext|>"], [NORMAL, CONTROL, CONTROL], (1, 2))
    assert value.turn_end == 1                      # end-of-turn first, then end-of-sequence
    token_map = np.array([-1, 1, 0, -1], np.int32)  # <|im_end|> already matched by text
    weights = (token_map >= 0).astype(np.float32)
    assert map_end_tokens(base, value, token_map, weights) == 2
    assert token_map.tolist() == [1, 1, 0, 1] and weights.tolist() == [1.0, 1.0, 1.0, 1.0]
    # a value file that names no end token: nothing to map to
    lone = vocab(["a"], [NORMAL], ())
    token_map = np.array([-1, -1, 0, -1], np.int32)
    assert map_end_tokens(base, lone, token_map, np.zeros(4, np.float32)) == 0
    assert token_map.tolist() == [-1, -1, 0, -1]
