"""Incremental detokenization: complete UTF-8 characters only, same text as llama-cpp-python."""

from __future__ import annotations

import pytest

from ivl_local.detok import Detokenizer

BOS = 0
PIECES = {0: b"", 1: b"caf", 2: b"\xc3", 3: b"\xa9", 4: b" ", 5: b"\xf0\x9f", 6: b"\x98", 7: b"\x80",
          8: b"\xff", 9: b" hi", 10: b"!"}


def run(tokens, bos=BOS):
    detok = Detokenizer(PIECES.__getitem__, bos=bos)
    deltas = [detok.push(t) for t in tokens]
    return deltas, detok.flush()


def test_multibyte_split_across_tokens():
    deltas, tail = run([1, 2, 3])
    assert deltas == ["caf", "", "é"]
    assert tail == ""


def test_four_byte_emoji_in_three_tokens():
    deltas, tail = run([4, 5, 6, 7, 10])
    assert deltas == [" ", "", "", "😀", "!"]
    assert tail == ""


def test_invalid_byte_becomes_replacement_and_does_not_stall():
    deltas, _ = run([8, 10])
    assert "".join(deltas) == "\ufffd!"


def test_incomplete_at_end_is_flushed_as_replacement():
    deltas, tail = run([1, 2])
    assert deltas == ["caf", ""]
    assert tail == "\ufffd"


def test_pending_flag():
    detok = Detokenizer(PIECES.__getitem__)
    detok.push(2)
    assert detok.pending
    detok.push(3)
    assert not detok.pending


def test_leading_space_after_bos_is_dropped_like_llama_cpp_python():
    assert "".join(run([BOS, 9, 10])[0]) == "hi!"
    assert "".join(run([9, 10])[0]) == " hi!"          # no BOS: kept
    assert "".join(run([BOS, 1, 9])[0]) == "caf hi"   # only the very first space


@pytest.mark.real
@pytest.mark.parametrize("model", ["gemma3_path", "smollm2_path"])
def test_matches_llama_cpp_python_on_real_vocab(model, request):
    """Token by token, the concatenated deltas equal Llama.detokenize of the whole list."""
    import llama_cpp

    from ivl_local.backend import Model

    path = request.getfixturevalue(model)
    text = " Ünïcödé — 漢字 ✓ 🚀 tabs\tand\nnewlines; numbers 3.14159 and €5 "
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    with Model(path, vocab_only=True) as m:
        for add_bos in (True, False):
            tokens = m.vocab.tokenize(text, add_special=add_bos)
            detok = Detokenizer(m.vocab.piece, bos=m.vocab.bos)
            ours = "".join(detok.push(t) for t in tokens) + detok.flush()
            theirs = llm.detokenize(tokens).decode("utf-8", errors="replace")
            assert ours == theirs
            # one token at a time never emits a broken character
            for t in tokens:
                assert "\ufffd" not in detok.push(t)
    llm.close()
