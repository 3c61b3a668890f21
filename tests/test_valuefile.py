"""GGUF validation and ivl.* metadata: bad files fail with one clear line, before llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local.errors import FormatVersionError, ModelFileError
from ivl_local.gguf_keys import FORMAT_MAJOR, Keys
from ivl_local.valuefile import RawValueModelWarning, read_gguf_header, read_value_info


def write_gguf(path, ivl: dict | None = None, tensors: int = 2):
    """A tiny but complete GGUF: a few metadata keys and small f32 tensors."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_token_list(["<s>", "a", "b"])
    w.add_token_types([3, 1, 1])
    for key, value in (ivl or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for i in range(tensors):
        w.add_tensor(f"t{i}", np.arange(64, dtype=np.float32) + i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


IVL_KEYS = {Keys.FORMAT_VERSION: f"{FORMAT_MAJOR}.0", Keys.CONNECTION: "residual",
            Keys.DEFAULT_ALPHA: 0.75, Keys.BASE_NAME: "smollm2-135m",
            Keys.BASE_VOCAB_FINGERPRINT: "0123456789abcdef", Keys.BASE_VOCAB_SIZE: 49152,
            "ivl.recipe.steps": 100}


def test_header_of_a_small_file(tmp_path):
    header = read_gguf_header(write_gguf(tmp_path / "ok.gguf"))
    assert header.version == 3
    assert header.get("general.name") == "tiny"
    assert header.get("tokenizer.ggml.tokens") == [b"<s>", b"a", b"b"]
    assert [t.name for t in header.tensors] == ["t0", "t1"]
    assert header.tensors[0].n_bytes == 64 * 4


def test_ivl_metadata(tmp_path):
    info = read_value_info(write_gguf(tmp_path / "v.ivl.gguf", IVL_KEYS))
    assert not info.is_raw
    assert info.default_alpha == pytest.approx(0.75)
    assert info.training_base_name == "smollm2-135m"
    assert info.training_base_fingerprint == "0123456789abcdef"
    assert info.training_base_vocab_size == 49152
    assert info.recipe == {"steps": 100}


def test_raw_value_model_warns_once(tmp_path):
    path = write_gguf(tmp_path / "raw.gguf")
    with pytest.warns(RawValueModelWarning, match="raw value model"):
        info = read_value_info(path)
    assert info.is_raw and info.default_alpha == 1.0


def test_newer_major_format_is_refused(tmp_path):
    path = write_gguf(tmp_path / "new.ivl.gguf", {**IVL_KEYS, Keys.FORMAT_VERSION: "99.0"})
    with pytest.raises(FormatVersionError, match="99.0.*upgrade"):
        read_value_info(path)


def test_newer_minor_format_is_accepted(tmp_path):
    path = write_gguf(tmp_path / "minor.ivl.gguf", {**IVL_KEYS, Keys.FORMAT_VERSION: f"{FORMAT_MAJOR}.7"})
    assert read_value_info(path).format_version == f"{FORMAT_MAJOR}.7"


@pytest.mark.parametrize("alpha", ["abc", [1.0, 2.0], float("nan"), -0.5, 101.0, float("inf")])
def test_bad_default_alpha_names_the_key(tmp_path, alpha):
    path = write_gguf(tmp_path / "a.ivl.gguf", {**IVL_KEYS, Keys.DEFAULT_ALPHA: alpha})
    with pytest.raises(ModelFileError, match=f"{Keys.DEFAULT_ALPHA} must be"):
        read_value_info(path)


@pytest.mark.parametrize("key, value", [(Keys.BASE_VOCAB_SIZE, "49152"), (Keys.BASE_VOCAB_SIZE, [1, 2]),
                                        (Keys.BASE_VOCAB_SIZE, 0), (Keys.BASE_NAME, 7),
                                        (Keys.BASE_VOCAB_FINGERPRINT, ["a", "b"]), (Keys.CONNECTION, 1),
                                        (Keys.FORMAT_VERSION, 1)])
def test_ivl_keys_of_the_wrong_type_name_the_key(tmp_path, key, value):
    path = write_gguf(tmp_path / "t.ivl.gguf", {**IVL_KEYS, key: value})
    with pytest.raises(ModelFileError, match=key.replace(".", r"\.")):
        read_value_info(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_gguf_header(tmp_path / "nope.gguf")


def test_folder(tmp_path):
    with pytest.raises(ModelFileError, match="folder"):
        read_gguf_header(tmp_path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not the weights you are looking for\n" * 3)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf_header(path)


def test_tiny_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf_header(path)


def test_unsupported_version(tmp_path):
    path = write_gguf(tmp_path / "v.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="version 7"):
        read_gguf_header(path)


@pytest.mark.parametrize("keep", [0.999, 0.5, 40])
def test_truncated_small_file(tmp_path, keep):
    full = write_gguf(tmp_path / "full.gguf").read_bytes()
    n = int(len(full) * keep) if keep < 1 else keep
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:n])
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf_header(path)


@pytest.mark.real
def test_real_headers(smollm2_path, gemma3_path):
    for path, arch, n_vocab in ((smollm2_path, "llama", 49152), (gemma3_path, "gemma3", 262144)):
        header = read_gguf_header(path)
        assert header.get("general.architecture") == arch
        assert len(header.get("tokenizer.ggml.tokens")) == n_vocab
        end = max(header.data_offset + t.offset + t.n_bytes for t in header.tensors)
        assert end == header.file_size  # the extents computed account for every byte


@pytest.mark.real
def test_truncated_real_model(smollm2_path, tmp_path):
    path = tmp_path / "smollm2-cut.gguf"
    with open(smollm2_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(3_000_000))  # header intact, tensor data cut
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf_header(path)
