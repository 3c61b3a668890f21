"""ivl_convert without torch: checkpoint validation, writer order, atomic writes, metadata.

A tiny random llama checkpoint over SmolLM2's vocabulary is built with numpy; the logits
agreement of converted files with the torch value net is tested in test_train.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ivl_local.errors import CheckpointError, ConfigError, ModelFileError, VocabMismatchError
from ivl_local.gguf_keys import REQUIRED, Keys

pytest.importorskip("gguf")
from ivl_convert import ValueFileWriter, WriterStateError, convert_checkpoint, inspect_value_file, permute_for_llama_cpp  # noqa: E402
from ivl_convert.checkpoint import expected_shapes, read_checkpoint, HParams  # noqa: E402

VOCAB = 49152  # SmolLM2


def tiny_config(vocab: int = VOCAB) -> dict:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": True}


def write_checkpoint(folder: Path, config: dict, base_file: str | None = None, drop: str | None = None,
                     seed: int = 0) -> Path:
    from safetensors.numpy import save_file

    from ivl_convert.checkpoint import _hparams

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(_hparams(config, folder))
    tensors = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in shapes.items()}
    for name in tensors:
        if name.endswith("norm.weight"):
            tensors[name] = np.ones_like(tensors[name])
    if drop:
        tensors.pop(drop)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    meta = {"checkpoint_format": 1, "kind": "value", "init": "fresh", "step": 3,
            "training_base": {"name": "smollm2-135m", "file": base_file or "", "vocab_size": config["vocab_size"]},
            "recipe": {"connection": "residual", "norm_kind": "mean_abs", "norm_weight": 1.0,
                       "learning_rate": 1e-4, "steps": 3, "data": "test.jsonl sha256:000000000000"}}
    (folder / "ivl_checkpoint.json").write_text(json.dumps(meta))
    return folder


# --------------------------------------------------------------------------------------
# fast, offline


def test_permutation_interleaves_rope_halves():
    # one head, head_dim 4: HF rows [r0 r1 | r2 r3] (halves) -> llama.cpp pairs (r0 r2)(r1 r3)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = permute_for_llama_cpp(w, n_head=1)
    assert out[:, 0].tolist() == [0, 4, 2, 6]
    # per head, and invertible
    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    p = permute_for_llama_cpp(w, n_head=3)
    back = p.reshape(3, 2, 2, 5).swapaxes(1, 2).reshape(12, 5)
    np.testing.assert_array_equal(back, w)


def test_missing_tensor_is_a_checkpoint_error(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", tiny_config(vocab=300), drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        read_checkpoint(ckpt)


def test_wrong_shape_and_unknown_arch(tmp_path):
    config = tiny_config(vocab=300)
    ckpt = write_checkpoint(tmp_path / "ck", config)
    bad = dict(config, intermediate_size=96)
    (ckpt / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="has shape"):
        read_checkpoint(ckpt)
    (ckpt / "config.json").write_text(json.dumps(dict(config, model_type="mistral")))
    with pytest.raises(CheckpointError, match="unsupported architecture 'mistral'"):
        read_checkpoint(ckpt)
    (ckpt / "ivl_checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match="missing ivl_checkpoint.json"):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        read_checkpoint(tmp_path / "nope")


def test_safetensors_reader_takes_bf16_and_refuses_forged_files(tmp_path):
    import struct

    from ivl_convert.safetensors_np import read_safetensors

    def write(header: dict, data: bytes, length: int | None = None) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / "t.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
        return path

    values = np.array([1.0, -2.5, 3.140625], np.float32)           # exact in bf16
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    got = read_safetensors(write({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, bf16))
    np.testing.assert_array_equal(got["w"], values)
    for header, data, length, needle in [
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}, b"\0" * 8, None, "does not fit"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, b"\0" * 12, None, "does not fit"),
        ({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "expected float"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "malformed"),
        ({}, b"", 1 << 40, "header of"),
    ]:
        with pytest.raises(CheckpointError, match=needle):
            read_safetensors(write(header, data, length))


def test_bad_out_type(tmp_path):
    with pytest.raises(ConfigError, match="out_type"):
        convert_checkpoint(tmp_path, tmp_path / "x.gguf", out_type="q4_0")


def test_writer_refuses_out_of_order_use_and_leaves_nothing(tmp_path):
    from gguf import GGUFValueType as V

    out = tmp_path / "v.gguf"
    with ValueFileWriter(out) as w:
        w.add_metadata("general.name", "x", V.STRING)
        w.add_tensor("a.weight", np.zeros((2, 32), np.float32), "f16")
        with pytest.raises(WriterStateError, match="add_metadata"):
            w.add_metadata("general.late", "y", V.STRING)
    assert list(tmp_path.iterdir()) == []          # not written: temp file removed
    with ValueFileWriter(out) as w:
        with pytest.raises(WriterStateError, match="write"):
            w.write()                               # no tensors declared
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        ValueFileWriter(tmp_path / "missing" / "v.gguf")


def _write_tiny(out: Path) -> Path:
    from gguf import GGUFValueType as V

    with ValueFileWriter(out) as w:
        w.add_metadata("general.name", "x", V.STRING)
        w.add_tensor("a.weight", np.ones((2, 32), np.float32), "f16")
        return w.write()


def test_a_full_disk_is_one_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    import gguf

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(ModelFileError, match=r"cannot write .*v\.gguf: No space left on device"):
        _write_tiny(tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_cannot_be_written_is_one_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):   # what mkstemp raises in a read-only folder (tests run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ModelFileError, match=r"cannot write .*v\.gguf: Permission denied"):
        _write_tiny(tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []


def test_temp_file_of_a_killed_conversion_is_removed_by_the_next(tmp_path):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".v.gguf.{dead.pid}.x1y2z3.tmp"
    stale.write_bytes(b"GGUF half written")
    _write_tiny(tmp_path / "v.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gguf"]


def test_ivl_convert_onto_a_full_disk_prints_one_error_line(tmp_path, monkeypatch):
    """The CLI: ModelFileError from the writer -> one line; an OSError from elsewhere in the
    conversion (reading the checkpoint) is one line too."""
    import errno

    import ivl_convert
    from typer.testing import CliRunner

    from ivl_local.cli.main import app

    (tmp_path / "ck").mkdir()

    def convert(ckpt, out, out_type, progress, base_gguf, **kwargs):
        _write_tiny(Path(out))

    import gguf

    monkeypatch.setattr(ivl_convert, "convert_checkpoint", convert)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "ck"), "-o", str(out / "v.ivl.gguf")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [f"error: cannot write {out / 'v.ivl.gguf'}: No space left on device"]
    assert list(out.iterdir()) == []

    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(tmp_path / "ck" / "model.safetensors"))

    monkeypatch.setattr(ivl_convert, "convert_checkpoint", unreadable)
    r = CliRunner().invoke(app, ["convert", str(tmp_path / "ck"), "-o", str(out / "v.ivl.gguf")])
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"error: Input/output error: {tmp_path / 'ck' / 'model.safetensors'}"]


# --------------------------------------------------------------------------------------
# with the real SmolLM2 GGUF (its tokenizer is copied into the value file)


@pytest.mark.real
def test_convert_tiny_checkpoint_all_types(tmp_path, smollm2_path):
    import gguf
    import llama_cpp
    from ivl_local.backend import safe_llama_params

    ckpt = write_checkpoint(tmp_path / "ck", tiny_config(), base_file=str(smollm2_path))
    sizes = {}
    for out_type in ("f32", "f16", "q8_0"):
        out = convert_checkpoint(ckpt, tmp_path / f"v.{out_type}.ivl.gguf", out_type=out_type, progress=False)
        info = inspect_value_file(out)
        sizes[out_type] = info["size_bytes"]
        assert info["is_value_file"] and info["architecture"] == "llama"
        assert all(k in info["ivl"] for k in REQUIRED)
        expected = {"f32": {"F32"}, "f16": {"F16", "F32"}, "q8_0": {"Q8_0", "F32"}}[out_type]
        assert set(info["tensor_types"]) == expected
        assert info["tokenizer"]["n_tokens"] == VOCAB and info["tokenizer"]["has_chat_template"]
        with safe_llama_params():
            llm = llama_cpp.Llama(str(out), logits_all=True, n_ctx=64, verbose=False)  # loads on its own
        tokens = llm.tokenize(b"Hello world, how are you?")
        llm.eval(tokens)
        assert np.isfinite(np.asarray(llm.scores[:len(tokens)])).all()
        del llm
    assert list(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    print(f"sizes: {sizes}, q8_0/f32 = {sizes['q8_0'] / sizes['f32']:.3f}")

    # GGUFReader (the reference reader) sees every ivl.* key with the right value.
    reader = gguf.GGUFReader(tmp_path / "v.f16.ivl.gguf")
    keys = [v for k, v in vars(Keys).items() if k.isupper()]
    for key in keys:
        assert key in reader.fields, key
    assert reader.fields[Keys.BASE_NAME].contents() == "smollm2-135m"
    assert reader.fields[Keys.CONNECTION].contents() == "residual"
    assert reader.fields[Keys.BASE_VOCAB_SIZE].contents() == VOCAB
    from ivl_local.train.basefile import BaseGGUF
    assert reader.fields[Keys.BASE_VOCAB_FINGERPRINT].contents() == BaseGGUF.open(str(smollm2_path)).fingerprint


@pytest.mark.real
def test_interrupted_write_leaves_no_file(tmp_path, smollm2_path, monkeypatch):
    import ivl_convert.writer as writer

    ckpt = write_checkpoint(tmp_path / "ck", tiny_config(), base_file=str(smollm2_path))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    calls = {"n": 0}
    real_encode = writer.encode

    def encode_then_interrupt(array, ggml_type):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_encode(array, ggml_type)

    monkeypatch.setattr(writer, "encode", encode_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(ckpt, out_dir / "v.ivl.gguf", out_type="q8_0", progress=False)
    assert list(out_dir.iterdir()) == []


@pytest.mark.real
def test_vocab_mismatch_with_base_is_refused(tmp_path, smollm2_path):
    ckpt = write_checkpoint(tmp_path / "ck", tiny_config(vocab=300), base_file=str(smollm2_path))
    with pytest.raises(VocabMismatchError, match="300 logits"):
        convert_checkpoint(ckpt, tmp_path / "v.gguf", progress=False)
    assert not (tmp_path / "v.gguf").exists()


def tiny_qwen2_config(vocab: int = VOCAB, tied: bool = True) -> dict:
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": tied, "use_sliding_window": False}


def test_qwen2_checkpoint_needs_its_biases(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ck", tiny_qwen2_config(vocab=300), drop="model.layers.0.self_attn.k_proj.bias")
    with pytest.raises(CheckpointError, match="missing tensor model.layers.0.self_attn.k_proj.bias"):
        read_checkpoint(ckpt)
    config = dict(tiny_qwen2_config(vocab=300), use_sliding_window=True)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="sliding-window"):
        read_checkpoint(ckpt)


@pytest.mark.real
@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_value_file_matches_torch_logits(tmp_path, smollm2_path, tied):
    """qwen2 is written without the llama q/k permutation and with q/k/v biases: llama.cpp's
    logits of the converted file must equal transformers' Qwen2ForCausalLM on the same weights."""
    torch = pytest.importorskip("torch")
    import llama_cpp
    from ivl_local.backend import safe_llama_params
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ivl_local.train.checkpoint import load_weights_into

    config = tiny_qwen2_config(tied=tied)
    ckpt = write_checkpoint(tmp_path / "ck", config, base_file=str(smollm2_path))
    out = convert_checkpoint(ckpt, tmp_path / "v.f32.ivl.gguf", out_type="f32", progress=False)
    info = inspect_value_file(out)
    assert info["architecture"] == "qwen2" and info["is_value_file"]
    assert info["hparams"]["qwen2.block_count"] == 2

    with safe_llama_params():
        llm = llama_cpp.Llama(str(out), logits_all=True, n_ctx=64, verbose=False)
    tokens = llm.tokenize(b"Hello world, 12 + 30 = 42. How are you?", add_bos=False)
    llm.eval(tokens)
    got = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
    del llm
    model = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in config.items() if k != "model_type"}))
    load_weights_into(model, ckpt)
    model.eval()
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    scale = float(np.abs(ref).max())
    assert scale > 0.1                      # not a degenerate all-zero comparison
    assert float(np.abs(got - ref).max()) < 2e-3 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_move_into_place_gives_the_usual_file_mode(tmp_path):
    import os
    import tempfile

    from ivl_local.atomic import move_into_place

    old = os.umask(0o022)
    try:
        fd, tmp = tempfile.mkstemp(dir=tmp_path)
        os.write(fd, b"data")
        os.close(fd)
        assert os.stat(tmp).st_mode & 0o777 == 0o600          # what mkstemp makes
        move_into_place(tmp, tmp_path / "final.bin")
    finally:
        os.umask(old)
    final = tmp_path / "final.bin"
    assert final.read_bytes() == b"data" and not Path(tmp).exists()
    assert final.stat().st_mode & 0o777 == 0o644
    assert os.umask(old) == old                                # the umask is left as it was


def test_the_umask_is_read_without_being_changed(monkeypatch):
    """Setting the umask to read it is process-wide: two threads doing it at once can leave it
    at 0. Linux reports it in /proc/self/status; the set-and-restore fallback takes a lock."""
    import builtins
    import os

    from ivl_local import atomic

    old = os.umask(0o027)
    try:
        if os.path.exists("/proc/self/status"):            # Linux: read, never set
            with monkeypatch.context() as m:
                m.setattr(os, "umask", lambda mask: pytest.fail("the umask was set to read it"))
                assert atomic.current_umask() == 0o027
        real_open = builtins.open

        def no_proc(path, *args, **kw):
            if str(path).startswith("/proc/"):
                raise FileNotFoundError(path)
            return real_open(path, *args, **kw)

        monkeypatch.setattr(builtins, "open", no_proc)
        assert atomic.current_umask() == 0o027                 # the fallback: set and restored
    finally:
        assert os.umask(old) == 0o027                          # left as it was


# --------------------------------------------------------------------------------------
# Hugging Face folders made elsewhere (transformers' save_pretrained), with SmolLM2's real
# tokenizer (transformers rebuilds it from the GGUF; its tokenizer.json is what an HF folder
# trained on SmolLM2 carries)


def tiny_hf_model(arch: str, vocab: int = VOCAB, seed: int = 0):
    """A random transformers causal LM of `arch` (llama | qwen2), 2 layers, hidden 64."""
    torch = pytest.importorskip("torch")
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                  rms_norm_eps=1e-6)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, head_dim=16, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():                     # norms away from 1, so a wrong norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def save_hf_folder(model, folder: Path, tokenizer_dir: Path | None, shard: str | None = None,
                   bf16: bool = False) -> Path:
    """save_pretrained (safetensors; sharded when `shard`, e.g. "2MB"); -> the folder.
    With bf16 the model itself is rounded to bf16 and back, so it stays the reference."""
    import shutil

    import torch

    if bf16:
        model.to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=shard or "10GB")
    if bf16:
        model.to(torch.float32)
    if tokenizer_dir is not None:
        shutil.copy(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory, smollm2_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name).save_pretrained(folder)
    return folder


def llama_cpp_logits(path: Path, text: bytes) -> tuple[list[int], np.ndarray]:
    import llama_cpp
    from ivl_local.backend import safe_llama_params

    with safe_llama_params():
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, verbose=False)
    tokens = llm.tokenize(text, add_bos=False)
    llm.eval(tokens)
    got = np.asarray(llm.scores[:len(tokens)], dtype=np.float32)
    del llm
    return tokens, got


def assert_logits_match(got: np.ndarray, model, tokens: list[int]) -> None:
    import torch

    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].float().numpy()
    scale = float(np.abs(ref).max())
    assert scale > 0.1                      # not a degenerate all-zero comparison
    assert float(np.abs(got - ref).max()) < 2e-3 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.real
@pytest.mark.parametrize("arch, shard, bf16", [("llama", "2MB", True), ("qwen2", None, False)])
def test_hf_folder_converts_and_matches_transformers_logits(tmp_path, smollm2_path, smollm2_tokenizer_dir,
                                                            arch, shard, bf16):
    """An HF folder (llama: sharded, bf16, untied head; qwen2: one file, f32, tied) -> a value
    file whose llama.cpp logits are transformers' on the same weights, marked as foreign."""
    from ivl_local.train.basefile import BaseGGUF
    from ivl_local.valuefile import read_value_info

    model = tiny_hf_model(arch)
    folder = save_hf_folder(model, tmp_path / f"hf-{arch}", smollm2_tokenizer_dir, shard=shard, bf16=bf16)
    assert (folder / "model.safetensors.index.json").is_file() == bool(shard)
    out = convert_checkpoint(folder, tmp_path / "v.ivl.gguf", out_type="f32", progress=False,
                             base_gguf=str(smollm2_path))
    info = inspect_value_file(out)
    assert info["architecture"] == arch and info["is_value_file"]
    ivl = info["ivl"]
    assert ivl[Keys.SOURCE] == "foreign" and ivl[Keys.SOURCE_DETAIL].startswith(type(model).__name__)
    assert ivl[Keys.BASE_NAME] == str(smollm2_path)
    assert ivl[Keys.BASE_VOCAB_FINGERPRINT] == BaseGGUF.open(str(smollm2_path)).fingerprint
    assert Keys.STEPS not in ivl and Keys.INIT not in ivl       # a foreign recipe is not made up
    assert read_value_info(out).source == "foreign"
    tokens, got = llama_cpp_logits(out, b"Hello world, 12 + 30 = 42. How are you?")
    assert_logits_match(got, model, tokens)


@pytest.mark.real
def test_hf_folder_bad_input_is_one_clear_error_each(tmp_path, smollm2_path, gemma3_path, smollm2_tokenizer_dir):
    from typer.testing import CliRunner

    from ivl_local.cli.main import app

    folder = save_hf_folder(tiny_hf_model("llama"), tmp_path / "hf", smollm2_tokenizer_dir, shard="2MB")
    out = tmp_path / "v.ivl.gguf"

    def error(*flags) -> str:
        r = CliRunner().invoke(app, ["convert", str(folder), "-o", str(out), *flags])
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.exit_code != 0 and len(lines) == 1 and "Traceback" not in r.output, r.output
        assert not out.exists()
        return lines[0]

    assert "give the base it steers with --base" in error()
    # another vocabulary: the size, then (same size) a token that differs
    assert "262144 tokens, but" in error("--base", str(gemma3_path))
    tj = json.loads((folder / "tokenizer.json").read_text())
    token, id_ = next((t, i) for t, i in tj["model"]["vocab"].items() if i == 1000)
    tj["model"]["vocab"][token + "x"] = tj["model"]["vocab"].pop(token)
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    line = error("--base", str(smollm2_path))
    assert f"differs from {smollm2_path.name}'s on 1 of 49152 tokens (id 1000" in line and "--allow-other-vocab" in line
    assert "needs --allow-other-vocab" in error("--base", str(smollm2_path), "--vocab-gguf", str(smollm2_path))
    assert "needs --vocab-gguf" in error("--base", str(smollm2_path), "--allow-other-vocab")
    (folder / "tokenizer.json").unlink()
    # a missing shard
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (folder / shard).rename(tmp_path / shard)
    assert f"missing shard {shard} (listed in model.safetensors.index.json)" in error("--base", str(smollm2_path))
    (tmp_path / shard).rename(folder / shard)
    # a truncated shard
    data = (folder / shard).read_bytes()
    (folder / shard).write_bytes(data[:len(data) // 2])
    assert "unreadable safetensors file" in error("--base", str(smollm2_path))
    (folder / shard).write_bytes(data)
    # an architecture ivl-convert does not write
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    assert "unsupported architecture 'gpt2'" in error("--base", str(smollm2_path))
    (folder / "config.json").write_text(json.dumps(config))
    # without a tokenizer.json only the size can be checked: a warning line, and it converts
    r = CliRunner().invoke(app, ["convert", str(folder), "-o", str(out), "--base", str(smollm2_path)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        f"warning: {folder} has no tokenizer.json: only its vocabulary size (49152) could be checked "
        f"against {smollm2_path.name}"]


@pytest.mark.real
@pytest.mark.slow
def test_hf_folder_of_another_vocabulary_steers_through_a_token_map(tmp_path, smollm2_path, gemma3_path,
                                                                     smollm2_tokenizer_dir):
    """--allow-other-vocab: a SmolLM2-vocabulary folder as a value network for Gemma 3. The
    file carries SmolLM2's tokenizer (from --vocab-gguf), records Gemma as its training base,
    and the engine reads it through a token map."""
    from ivl_local.engine import Engine
    from ivl_local.train.basefile import BaseGGUF

    folder = save_hf_folder(tiny_hf_model("qwen2"), tmp_path / "hf", smollm2_tokenizer_dir)
    out = convert_checkpoint(folder, tmp_path / "v.ivl.gguf", out_type="q8_0", progress=False,
                             base_gguf="gemma3-270m", allow_other_vocab=True, vocab_gguf=str(smollm2_path))
    info = inspect_value_file(out)
    assert info["tokenizer"]["n_tokens"] == VOCAB
    assert info["ivl"][Keys.BASE_NAME] == "gemma3-270m"
    assert info["ivl"][Keys.BASE_VOCAB_FINGERPRINT] == BaseGGUF.open(str(gemma3_path)).fingerprint
    with Engine(gemma3_path, out, 1.0, n_ctx=256, n_threads=1) as engine:
        assert not engine.mapping.identity
        text = engine.complete("The capital of France is", max_tokens=3)
    assert isinstance(text, str)


# --------------------------------------------------------------------------------------
# gemma3: llama.cpp's gemma3 architecture (norms stored as 1 + w, q/k norms, pre/post FFN
# norms, sqrt(hidden) embedding scale, every 6th layer full attention, the others sliding)

GEMMA_VOCAB = 262144


def tiny_gemma3_config(vocab: int = GEMMA_VOCAB, **changes) -> dict:
    """7 layers: sliding, ..., full (layer 5), sliding; a window of 4 tokens, so a test prompt
    longer than that exercises the sliding mask."""
    from ivl_convert.checkpoint import gemma3_layer_types

    config = {"model_type": "gemma3_text", "vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 7,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 128,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 16,
              "sliding_window": 4, "layer_types": gemma3_layer_types(7), "tie_word_embeddings": True,
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
              "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None,
              "attn_logit_softcapping": None}
    config.update(changes)
    return config


@pytest.mark.parametrize("changes, needle", [
    ({"layer_types": ["full_attention"] * 7}, "not every 6th layer full attention"),
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"sliding_window": None}, "sliding_window None"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
                          "full_attention": {"rope_type": "default", "rope_theta": 1e6}}}, "RoPE base 5000"),
    ({"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}},
     "RoPE scaling 'linear'"),
])
def test_gemma3_configs_llama_cpp_cannot_express_are_refused(tmp_path, changes, needle):
    ckpt = write_checkpoint(tmp_path / "ck", tiny_gemma3_config(vocab=300))
    read_checkpoint(ckpt)                                   # the tiny config itself is fine
    (ckpt / "config.json").write_text(json.dumps(tiny_gemma3_config(vocab=300, **changes)))
    with pytest.raises(CheckpointError, match=needle):
        read_checkpoint(ckpt)


def test_gemma3_older_config_spelling_is_read(tmp_path):
    """transformers 4.x wrote rope_theta / rope_local_base_freq / sliding_window_pattern."""
    old = {k: v for k, v in tiny_gemma3_config(vocab=300).items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=6, rope_scaling=None)
    ckpt = write_checkpoint(tmp_path / "ck", old)
    h = read_checkpoint(ckpt).hparams
    assert (h.arch, h.rope_theta, h.sliding_window, h.tied) == ("gemma3", 1e6, 4, True)


@pytest.mark.real
def test_gemma3_hf_folder_matches_transformers_logits(tmp_path, gemma3_path):
    """A tiny Gemma3ForCausalLM over Gemma 3's real vocabulary -> llama.cpp's gemma3 logits
    equal transformers' (prompt longer than the 4-token window, so sliding layers slide)."""
    torch = pytest.importorskip("torch")
    import transformers

    config = tiny_gemma3_config()
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{k: v for k, v in config.items() if k != "model_type"})).eval()
    with torch.no_grad():                     # norms away from 0 (Gemma's identity), so +1 matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    folder = save_hf_folder(model, tmp_path / "hf-gemma3", None)
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        out = convert_checkpoint(folder, tmp_path / "v.ivl.gguf", out_type="f32", progress=False,
                                 base_gguf=str(gemma3_path))
    info = inspect_value_file(out)
    assert info["architecture"] == "gemma3" and info["hparams"]["gemma3.attention.sliding_window"] == 4
    assert info["ivl"][Keys.SOURCE] == "foreign" and info["tokenizer"]["n_tokens"] == GEMMA_VOCAB
    tokens, got = llama_cpp_logits(out, b"Hello world, 12 + 30 = 42. How are you today, my friend?")
    assert len(tokens) > 3 * config["sliding_window"]
    assert_logits_match(got, model, tokens)
