"""Hostile GGUF files fail in `read_gguf_header` with one ModelFileError naming what is wrong,
before llama.cpp sees them.

Each case rewrites a tiny but complete llama model (tests/gguf_craft.py). The cases llama.cpp
would GGML_ASSERT on (exit 134) or crash on (139) are also run through the Engine and
`ivl-chat` in a subprocess, so a regression shows as an exit code instead of killing pytest.
"""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGUFValueType as VT

from ivl_local.errors import ModelFileError
from ivl_local.valuefile import read_gguf_header

sys.path.insert(0, str(Path(__file__).parent))
from gguf_craft import TINY_TOKENS, TINY_TYPES, Raw, nested_array, rewrite, tiny_llama  # noqa: E402

N_VOCAB = len(TINY_TOKENS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def refused(path, match: str) -> str:
    with pytest.raises(ModelFileError) as e:
        read_gguf_header(path)
    message = str(e.value)
    assert match in message, message
    assert "\n" not in message
    return message


def test_tiny_llama_is_valid(tiny):
    header = read_gguf_header(tiny)
    assert header.get("llama.block_count") == 2 and len(header.get("tokenizer.ggml.tokens")) == N_VOCAB
    assert header.value_type("tokenizer.ggml.scores") == (VT.ARRAY, VT.FLOAT32)
    assert header.value_type("llama.block_count") == (VT.UINT32, None)


# --- the file format ------------------------------------------------------------------------

def _offset(tensors, name, delta):
    return [(n, s, t, o + delta if n == name else o) for n, s, t, o in tensors]


def _rename(tensors, old, new):
    return [(new if n == old else n, s, t, o) for n, s, t, o in tensors]


FORMAT_CASES = {
    "n_kv 2^63": (dict(n_kv=2**63), "truncated or corrupt"),
    "n_tensors 2^64-1": (dict(n_tensors=2**64 - 1), "truncated or corrupt"),
    "string length past the end": (dict(set={"general.name": (Raw(struct.pack("<Q", 2**62) + b"x"), VT.STRING)}),
                                   "truncated or corrupt"),
    "array count past the end": (dict(set={"x.big": (Raw(struct.pack("<IQ", VT.UINT32, 2**61)), VT.ARRAY)}),
                                 "truncated or corrupt"),
    "arrays nested 100000 deep": (dict(set={"x.deep": (nested_array(100_000), VT.ARRAY)}),
                                  "x.deep nests arrays more than 8 levels deep"),
    "arrays nested 9 deep": (dict(set={"x.deep": (nested_array(9), VT.ARRAY)}), "x.deep nests arrays"),
    "non-UTF-8 key": (dict(extra=[(b"llama.\xff\xfe", VT.UINT32, 1, None)]), "is not valid UTF-8"),
    "empty key": (dict(extra=[(b"", VT.UINT32, 1, None)]), "is empty"),
    "duplicate key": (dict(extra=[("llama.block_count", VT.UINT32, 2, None)]), "llama.block_count appears twice"),
    "unknown value type": (dict(set={"x.odd": (Raw(b""), 99)}), "x.odd has an unknown GGUF value type 99"),
    "unknown array element type": (dict(set={"x.odd": (Raw(struct.pack("<IQ", 77, 0)), VT.ARRAY)}),
                                   "unknown GGUF value type 77"),
    "non-UTF-8 tensor name": (dict(tensors=lambda ts: _rename(ts, "output_norm.weight", b"output\xff")),
                              "is not valid UTF-8"),
    "tensor name of 64 bytes": (dict(tensors=lambda ts: _rename(ts, "output_norm.weight", "n" * 64)),
                                "longer than 63 bytes"),
    "duplicate tensor": (dict(tensors=lambda ts: _rename(ts, "output_norm.weight", "token_embd.weight")),
                         "tensor token_embd.weight appears twice"),
    "unknown tensor type": (dict(tensors=lambda ts: [(n, s, 200 if n == "output_norm.weight" else t, o)
                                                     for n, s, t, o in ts]), "unknown tensor type 200"),
    "removed tensor type Q4_2": (dict(tensors=lambda ts: [(n, s, 4 if n == "output_norm.weight" else t, o)
                                                          for n, s, t, o in ts]), "unknown tensor type 4"),
    "5 dimensions": (dict(tensors=lambda ts: [(n, (*s, 1, 1, 1, 1)[:5] if n == "output_norm.weight" else s, t, o)
                                              for n, s, t, o in ts]), "has 5 dimensions"),
    "overlapping tensor data": (dict(tensors=lambda ts: _offset(ts, "output_norm.weight", -32)), "data offset"),
    "alignment 48": (dict(set={"general.alignment": (48, VT.UINT32)}), "general.alignment 48 is not a power of two"),
    "alignment as a string": (dict(set={"general.alignment": ("32", VT.STRING)}),
                              "general.alignment must be a uint32"),
    "GGUF version 4": (dict(version=4), "GGUF version 4 is not supported"),
    "GGUF version 1": (dict(version=1), "GGUF version 1 is not supported"),
    "big-endian": (dict(version=0x03000000), "big-endian GGUF files are not supported"),
}


@pytest.mark.parametrize("case", FORMAT_CASES)
def test_format_case_is_refused(tiny, tmp_path, case):
    changes, match = FORMAT_CASES[case]
    refused(rewrite(tiny, tmp_path / "bad.gguf", **changes), match)


def test_one_byte_short_of_the_tensor_data(tiny, tmp_path):
    data = tiny.read_bytes()
    assert read_gguf_header(tiny).file_size == len(data)
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:-1])
    refused(short, "is truncated: its tensors need")


def test_arrays_nested_within_the_bound_are_read(tiny, tmp_path):
    path = rewrite(tiny, tmp_path / "nested.gguf", set={"x.nested": (nested_array(8), VT.ARRAY)})
    value = read_gguf_header(path).get("x.nested")
    for _ in range(7):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert isinstance(value, np.ndarray) and value.dtype == np.uint8 and len(value) == 0


# --- hyperparameters ------------------------------------------------------------------------

U32, F32 = VT.UINT32, VT.FLOAT32
SHORT = N_VOCAB - 1
HPARAM_CASES = {
    "block_count 0": ({"llama.block_count": (0, U32)}, (), "llama.block_count = 0 is out of range"),
    "block_count 2^31": ({"llama.block_count": (2**31, U32)}, (), "llama.block_count = 2147483648 is out of range"),
    "block_count 513": ({"llama.block_count": (513, U32)}, (), "llama.block_count = 513"),
    "block_count without its blocks": ({"llama.block_count": (3, U32)}, (),
                                       "llama.block_count = 3, but the file has tensors for 2 blocks"),
    "block_count as a string": ({"llama.block_count": ("2", VT.STRING)}, (),
                                "llama.block_count must be UINT32, found STRING"),
    "block_count as uint64": ({"llama.block_count": (2, VT.UINT64)}, (), "llama.block_count must be UINT32"),
    "expert_used_count without expert_count": ({"llama.expert_used_count": (2, U32)}, (),
                                               "llama.expert_used_count = 2 exceeds llama.expert_count = 0"),
    "expert_used_count above expert_count": ({"llama.expert_count": (2, U32), "llama.expert_used_count": (4, U32)},
                                             (), "llama.expert_used_count = 4 exceeds llama.expert_count = 2"),
    "expert_count without expert_used_count": ({"llama.expert_count": (4, U32)}, (),
                                               "llama.expert_count = 4 needs llama.expert_used_count"),
    "expert_count 2000": ({"llama.expert_count": (2000, U32)}, (), "llama.expert_count = 2000 is out of range"),
    "expert groups without experts": ({"llama.expert_group_count": (2, U32)}, (), "llama.expert_group_count"),
    "expert groups not dividing experts": ({"llama.expert_count": (6, U32), "llama.expert_used_count": (2, U32),
                                            "llama.expert_group_count": (4, U32)}, (),
                                           "llama.expert_count = 6 is not a multiple of llama.expert_group_count"),
    "nextn_predict_layers above block_count": ({"llama.nextn_predict_layers": (3, U32)}, (),
                                               "llama.nextn_predict_layers = 3 exceeds"),
    "rms epsilon NaN": ({"llama.attention.layer_norm_rms_epsilon": (math.nan, F32)}, (),
                        "llama.attention.layer_norm_rms_epsilon = nan"),
    "rms epsilon inf": ({"llama.attention.layer_norm_rms_epsilon": (math.inf, F32)}, (),
                        "llama.attention.layer_norm_rms_epsilon = inf"),
    "rms epsilon negative": ({"llama.attention.layer_norm_rms_epsilon": (-1e-5, F32)}, (),
                             "llama.attention.layer_norm_rms_epsilon = -1e-05"),
    "rms epsilon 0": ({"llama.attention.layer_norm_rms_epsilon": (0.0, F32)}, (),
                      "llama.attention.layer_norm_rms_epsilon = 0 must be"),
    "rms epsilon as float64": ({"llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT64)}, (),
                               "llama.attention.layer_norm_rms_epsilon must be FLOAT32, found FLOAT64"),
    "layer norm epsilon NaN": ({"llama.attention.layer_norm_epsilon": (math.nan, F32)}, (),
                               "llama.attention.layer_norm_epsilon = nan"),
    "head_count 0": ({"llama.attention.head_count": (0, U32)}, (), "llama.attention.head_count is 0"),
    "head_count not dividing embedding_length": ({"llama.attention.head_count": (3, U32)}, (),
                                                 "llama.attention.head_count = 3 does not divide "
                                                 "llama.embedding_length = 8"),
    "head_count_kv 0": ({"llama.attention.head_count_kv": (0, U32)}, (),
                        "llama.attention.head_count_kv = 0 must divide llama.attention.head_count = 2"),
    "head_count_kv not dividing head_count": ({"llama.attention.head_count_kv": (3, U32)}, (),
                                              "llama.attention.head_count_kv = 3 must divide"),
    "head_count per layer, wrong length": ({"llama.attention.head_count": (np.array([2, 2, 2]), VT.ARRAY, VT.INT32)},
                                           (), "llama.attention.head_count has 3 entries, expected one per layer (2)"),
    "head_count per layer, a 0": ({"llama.attention.head_count": (np.array([2, 0]), VT.ARRAY, VT.UINT32)}, (),
                                  "llama.attention.head_count is 0 (layer 1)"),
    "head_count_kv per layer against the tensors": ({"llama.attention.head_count_kv": ([1, 2], VT.ARRAY, VT.INT32)},
                                                    (), "blk.1.attn_k.weight has 4 rows, but "
                                                        "llama.attention.head_count_kv and the head size give 8"),
    "head_count missing": ({}, ("llama.attention.head_count",), "llama.attention.head_count is missing"),
    "embedding_length 0": ({"llama.embedding_length": (0, U32)}, (), "llama.embedding_length = 0 is out of range"),
    "embedding_length not the tensors'": ({"llama.embedding_length": (16, U32)}, (),
                                          "llama.embedding_length = 16, but token_embd.weight has rows of 8"),
    "context_length 0": ({"llama.context_length": (0, U32)}, (), "llama.context_length = 0 is out of range"),
    "context_length 2^31": ({"llama.context_length": (2**31, U32)}, (), "llama.context_length = 2147483648"),
    "feed_forward_length 0": ({"llama.feed_forward_length": (0, U32)}, (), "llama.feed_forward_length is 0"),
    "rope dimension odd": ({"llama.rope.dimension_count": (3, U32)}, (), "llama.rope.dimension_count = 3 must be"),
    "rope dimension not the head size": ({"llama.rope.dimension_count": (2, U32)}, (),
                                         "llama.rope.dimension_count = 2 must be = 4"),
    "rope scaling type unknown": ({"llama.rope.scaling.type": ("bogus", VT.STRING)}, (),
                                  "llama.rope.scaling.type 'bogus' is not one of"),
    "rope freq_base NaN": ({"llama.rope.freq_base": (math.nan, F32)}, (), "llama.rope.freq_base = nan"),
    "fewer tokens than embedding rows": ({"tokenizer.ggml.tokens": (TINY_TOKENS[:SHORT], VT.ARRAY, VT.STRING),
                                          "tokenizer.ggml.scores": ([0.0] * SHORT, VT.ARRAY, F32),
                                          "tokenizer.ggml.token_type": ([1] * SHORT, VT.ARRAY, VT.INT32)}, (),
                                         f"tokenizer.ggml.tokens has {SHORT} tokens, but token_embd.weight "
                                         f"has {N_VOCAB} rows"),
    "token_type shorter than tokens": ({"tokenizer.ggml.token_type": ([1] * SHORT, VT.ARRAY, VT.INT32)}, (),
                                       f"tokenizer.ggml.token_type has {SHORT} entries for {N_VOCAB} tokens"),
    "scores longer than tokens": ({"tokenizer.ggml.scores": ([0.0] * (N_VOCAB + 1), VT.ARRAY, F32)}, (),
                                  f"tokenizer.ggml.scores has {N_VOCAB + 1} entries"),
    "token_type as floats": ({"tokenizer.ggml.token_type": ([1.0] * N_VOCAB, VT.ARRAY, F32)}, (),
                             "tokenizer.ggml.token_type must be ARRAY of INT32, found ARRAY of FLOAT32"),
    "tokens as one string": ({"tokenizer.ggml.tokens": ("a", VT.STRING)}, (),
                             "tokenizer.ggml.tokens must be ARRAY of STRING, found STRING"),
    "no tokens": ({"tokenizer.ggml.tokens": ([], VT.ARRAY, VT.STRING)}, (), "tokenizer.ggml.tokens is empty"),
    "a token twice": ({"tokenizer.ggml.tokens": (TINY_TOKENS[:-1] + ["<s>"], VT.ARRAY, VT.STRING)}, (),
                      f"tokenizer.ggml.tokens has token b'<s>' twice (ids 1 and {N_VOCAB - 1})"),
    "a byte token missing": ({"tokenizer.ggml.tokens": (["A!" if t == "<0x41>" else t for t in TINY_TOKENS],
                                                        VT.ARRAY, VT.STRING),
                              "tokenizer.ggml.token_type": ([1 if t == "<0x41>" else k for t, k in
                                                             zip(TINY_TOKENS, TINY_TYPES)], VT.ARRAY, VT.INT32)}, (),
                             "tokenizer.ggml.tokens has no byte token <0x41>"),
    "SentencePiece without byte tokens": ({"tokenizer.ggml.tokens": ([t.replace("<0x", "<1x") for t in TINY_TOKENS],
                                                                     VT.ARRAY, VT.STRING),
                                           "tokenizer.ggml.token_type": ([1 if k == 6 else k for k in TINY_TYPES],
                                                                         VT.ARRAY, VT.INT32)}, (),
                                          "tokenizer.ggml.tokens has no byte token <0x00>"),
    "a byte token in a WordPiece vocabulary": ({"tokenizer.ggml.model": ("bert", VT.STRING)}, (),
                                               "tokenizer.ggml.token_type marks token 3 as a byte token, which "
                                               "a WordPiece ('bert') vocabulary cannot have"),
    "a byte token not spelled <0xXX>": ({"tokenizer.ggml.token_type": (TINY_TYPES[:-1] + [6], VT.ARRAY, VT.INT32)},
                                        (), f"marks token {N_VOCAB - 1} b'i' as a byte token, but it is not"),
    "bos id past the vocabulary": ({"tokenizer.ggml.bos_token_id": (N_VOCAB, U32)}, (),
                                   f"tokenizer.ggml.bos_token_id = {N_VOCAB} is outside the vocabulary"),
    "eos id 2^32-1": ({"tokenizer.ggml.eos_token_id": (2**32 - 1, U32)}, (), "tokenizer.ggml.eos_token_id = 4294967295"),
    "padding id past the vocabulary": ({"tokenizer.ggml.padding_token_id": (10_000, U32)}, (),
                                       "tokenizer.ggml.padding_token_id = 10000"),
    "eos id as int32": ({"tokenizer.ggml.eos_token_id": (2, VT.INT32)}, (),
                        "tokenizer.ggml.eos_token_id must be UINT32, found INT32"),
    "add_bos_token without bos id": ({"tokenizer.ggml.add_bos_token": (True, VT.BOOL)},
                                     ("tokenizer.ggml.bos_token_id",), "tokenizer.ggml.add_bos_token is set"),
    "architecture as a number": ({"general.architecture": (7, U32)}, (),
                                 "general.architecture must be STRING, found UINT32"),
    "another architecture's block_count": ({"general.architecture": ("mamba", VT.STRING),
                                            "mamba.block_count": (0, U32)}, (), "mamba.block_count = 0"),
}


@pytest.mark.parametrize("case", HPARAM_CASES)
def test_hparam_case_is_refused_naming_the_key(tiny, tmp_path, case):
    changes, drop, match = HPARAM_CASES[case]
    refused(rewrite(tiny, tmp_path / "bad.gguf", set=changes, drop=drop), match)


def test_hparams_are_checked_only_where_present(tmp_path):
    """A metadata-only file (no blocks, no head counts) is not a model llama.cpp would run
    on; it passes, as value files under test and vocabulary-only GGUFs do."""
    import gguf

    path = tmp_path / "meta.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["a", "b"])
    w.add_tensor("t", np.zeros(8, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert read_gguf_header(path).get("general.architecture") == "llama"


# --- through llama.cpp, in a subprocess -----------------------------------------------------

# Each of these makes this llama.cpp abort (exit 134) when loaded, or when it tokenizes
# text: GGML_ASSERTs in load_hparams (layers, experts, RoPE scaling type), ggml's rms_norm
# `eps >= 0`, the vocab loader's one-id-per-text assert, SentencePiece's byte fallback
# (an uncaught std::out_of_range), a byte token in a WordPiece vocabulary (GGML_ABORT), per-layer
# KV head counts the K/V projections do not have (ggml_mul_mat's shape assert, found by fuzzing).
# The issue's four come first.
ABORTS_IN_LLAMA_CPP = ("block_count 0", "block_count 2^31", "expert_used_count without expert_count",
                       "rms epsilon NaN", "block_count 513", "expert_used_count above expert_count",
                       "expert_count without expert_used_count", "expert_count 2000", "expert groups without experts",
                       "expert groups not dividing experts", "nextn_predict_layers above block_count",
                       "rms epsilon negative", "rope scaling type unknown", "a token twice", "a byte token missing",
                       "SentencePiece without byte tokens", "a byte token in a WordPiece vocabulary",
                       "head_count_kv per layer against the tensors")
ISSUE_CASES = ABORTS_IN_LLAMA_CPP[:4]


def _hostile_files(tiny, folder, cases):
    return {case: rewrite(tiny, folder / f"{i}.gguf", set=HPARAM_CASES[case][0], drop=HPARAM_CASES[case][1])
            for i, case in enumerate(cases)}


def test_engine_refuses_every_case_in_one_process(tiny, tmp_path):
    files = _hostile_files(tiny, tmp_path, ABORTS_IN_LLAMA_CPP)
    code = textwrap.dedent("""
        import sys
        from ivl_local.engine import Engine
        from ivl_local.errors import ModelFileError
        for path in sys.argv[1:]:
            try:
                Engine(path, n_ctx=64, n_threads=1).close()
                print("LOADED", path)
            except ModelFileError as e:
                print("REFUSED", path, str(e).replace(chr(10), " "))
    """)
    proc = subprocess.run([sys.executable, "-P", "-c", code, *map(str, files.values())],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(files) and all(line.startswith("REFUSED") for line in lines), proc.stdout


def _ivl_chat(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from ivl_local.cli.main import chat_entry; sys.argv[0] = 'ivl-chat'; chat_entry()"
    return subprocess.run([sys.executable, "-P", "-c", code, *args], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def test_ivl_chat_runs_the_tiny_model(tiny):
    proc = _ivl_chat("--base", str(tiny), "--value", "none", "-p", "hi", "--max-tokens", "4", "--ctx", "64",
                     "--threads", "1", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("case", ISSUE_CASES)
def test_ivl_chat_gives_one_error_line(tiny, tmp_path, case):
    path = _hostile_files(tiny, tmp_path, [case])[case]
    proc = _ivl_chat("--base", str(path), "--value", "none", "-p", "hi", "--max-tokens", "4", "--ctx", "64",
                     "--threads", "1")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert HPARAM_CASES[case][2] in lines[0]


@pytest.mark.real
@pytest.mark.parametrize("case", ISSUE_CASES)
def test_real_models_with_the_issue_cases(smollm2_path, gemma3_path, tmp_path, case):
    """The same edits on SmolLM2 (llama) and Gemma 3 (gemma3) metadata: refused, naming the key."""
    changes, drop, match = HPARAM_CASES[case]
    for path, arch in ((smollm2_path, "llama"), (gemma3_path, "gemma3")):
        renamed = {key.replace("llama.", f"{arch}."): spec for key, spec in changes.items()}
        mutant = rewrite(path, tmp_path / f"{arch}.gguf", set=renamed)
        refused(mutant, match.replace("llama.", f"{arch}."))
        mutant.unlink()   # a full copy of the model


# --- ivl inspect ----------------------------------------------------------------------------

INSPECT_CASES = ("n_kv 2^63", "non-UTF-8 tensor name", "unknown tensor type", "GGUF version 4", "big-endian",
                 "arrays nested 100000 deep")


@pytest.mark.parametrize("case", [*INSPECT_CASES, "one byte short"])
def test_inspect_gives_one_error_line(tiny, tmp_path, case):
    from typer.testing import CliRunner

    from ivl_local.cli.main import app

    path = tmp_path / "bad.gguf"
    if case == "one byte short":
        path.write_bytes(tiny.read_bytes()[:-1])
        match = "truncated"
    else:
        changes, match = FORMAT_CASES[case]
        rewrite(tiny, path, **changes)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_inspect_value_file_uses_the_one_reader(tiny, tmp_path):
    from ivl_convert import inspect_value_file

    info = inspect_value_file(tiny)
    assert info["architecture"] == "llama" and info["n_tensors"] == 20
    assert info["tokenizer"] == {"model": "llama", "n_tokens": N_VOCAB, "has_chat_template": False}
    with pytest.raises(ModelFileError, match="GGUF version 4"):
        inspect_value_file(rewrite(tiny, tmp_path / "v4.gguf", version=4))
