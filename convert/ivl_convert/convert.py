"""Checkpoint folder -> `.ivl.gguf`: a plain llama.cpp llama- or qwen2-arch GGUF carrying the training
base's tokenizer (copied key by key from the base GGUF, so the file loads on its own) and
the `ivl.*` metadata of ivl_local.gguf_keys.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ivl_local.errors import CheckpointError, ConfigError, ModelFileError
from ivl_local.gguf_keys import FORMAT_MAJOR, FORMAT_MINOR, Keys
from ivl_local.valuefile import read_gguf_header
from ivl_local.vocab_fp import vocab_fingerprint

from .checkpoint import Checkpoint, HParams, read_checkpoint
from .writer import OUT_TYPES, ValueFileWriter

FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}   # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def permute_for_llama_cpp(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows with the two RoPE halves of each head split apart; llama.cpp's
    llama arch expects them interleaved in pairs. (transformers applies the inverse when it
    loads a llama GGUF.)"""
    rows, cols = weight.shape
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(ckpt: Checkpoint):
    """(GGUF name, array) in llama.cpp order; q/k permuted for llama (qwen2's NEOX RoPE takes
    HF's layout as is, plus its q/k/v biases)."""
    h, t = ckpt.hparams, ckpt.tensors
    llama = h.arch == "llama"
    yield "token_embd.weight", t["model.embed_tokens.weight"]
    for i in range(h.layers):
        p = f"model.layers.{i}."
        q, k = t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"]
        if llama:
            q, k = permute_for_llama_cpp(q, h.heads), permute_for_llama_cpp(k, h.kv_heads)
        yield f"blk.{i}.attn_norm.weight", t[p + "input_layernorm.weight"]
        yield f"blk.{i}.attn_q.weight", q
        yield f"blk.{i}.attn_k.weight", k
        yield f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"]
        if not llama:
            for proj in ("q", "k", "v"):
                yield f"blk.{i}.attn_{proj}.bias", t[p + f"self_attn.{proj}_proj.bias"]
        yield f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"]
        yield f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", t["model.norm.weight"]
    if not h.tied:
        yield "output.weight", t["lm_head.weight"]


def _arch_hparams(w: ValueFileWriter, h: HParams) -> None:
    """The `<arch>.*` keys; llama and qwen2 read the same set."""
    from gguf import GGUFValueType as V

    for key, value, vtype in [
        ("context_length", h.context_length, V.UINT32),
        ("embedding_length", h.hidden, V.UINT32),
        ("block_count", h.layers, V.UINT32),
        ("feed_forward_length", h.intermediate, V.UINT32),
        ("attention.head_count", h.heads, V.UINT32),
        ("attention.head_count_kv", h.kv_heads, V.UINT32),
        ("attention.layer_norm_rms_epsilon", h.rms_eps, V.FLOAT32),
        ("rope.freq_base", h.rope_theta, V.FLOAT32),
        ("rope.dimension_count", h.head_dim, V.UINT32),
        ("attention.key_length", h.head_dim, V.UINT32),
        ("attention.value_length", h.head_dim, V.UINT32),
        ("vocab_size", h.vocab_size, V.UINT32),
    ]:
        w.add_metadata(f"{h.arch}.{key}", value, vtype)


def _base_gguf(ckpt: Checkpoint, base_gguf: str | os.PathLike | None) -> Path:
    if base_gguf is not None:
        path = Path(base_gguf)
    else:
        recorded = (ckpt.meta.get("training_base") or {})
        path = Path(recorded.get("file", ""))
        if not path.is_file():  # moved since training: resolve the name again
            from ivl_local.models import resolve_model

            try:
                path = resolve_model(recorded.get("name", ""))
            except ModelFileError:
                raise CheckpointError(f"{ckpt.path}: training base {recorded.get('name')!r} not "
                                      "found; pass base_gguf=") from None
    return path


def _tokenizer(w: ValueFileWriter, ckpt: Checkpoint, base_path: Path) -> str:
    """Copy every tokenizer.* key of the base GGUF, with its stored type; returns the vocab
    fingerprint."""
    from gguf import GGUFValueType as V

    base = read_gguf_header(base_path)
    tokens = base.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFileError(f"{base_path}: GGUF has no tokenizer to copy")
    types = base.get("tokenizer.ggml.token_type")
    fingerprint = vocab_fingerprint(tokens, None if types is None else types.tolist())
    expected = (ckpt.meta.get("training_base") or {}).get("vocab_fingerprint")
    if expected and expected != fingerprint:
        raise CheckpointError(f"{base_path}: vocabulary fingerprint {fingerprint} differs from the "
                              f"one the checkpoint was trained with ({expected})")
    if len(tokens) != ckpt.hparams.vocab_size:
        raise CheckpointError(f"{base_path}: {len(tokens)} tokens, but the checkpoint has "
                              f"{ckpt.hparams.vocab_size} logits")
    for key, value in base.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        vtype, elem = base.value_type(key)
        if elem == V.ARRAY:
            raise ModelFileError(f"{base_path}: {key} is an array of arrays; cannot copy it")
        if isinstance(value, np.ndarray):
            value = value.tolist()      # the gguf writer takes sequences
        w.add_metadata(key, value, vtype, elem)
    return fingerprint


def _ivl_keys(w: ValueFileWriter, ckpt: Checkpoint, fingerprint: str) -> None:
    from gguf import GGUFValueType as V

    import ivl_local

    base = ckpt.meta.get("training_base") or {}
    recipe = ckpt.meta.get("recipe") or {}
    for key, value, vtype in [
        (Keys.FORMAT_VERSION, f"{FORMAT_MAJOR}.{FORMAT_MINOR}", V.STRING),
        (Keys.CONNECTION, recipe.get("connection", "residual"), V.STRING),
        (Keys.DEFAULT_ALPHA, 1.0, V.FLOAT32),
        (Keys.BASE_NAME, str(base.get("name", "?")), V.STRING),
        (Keys.BASE_VOCAB_FINGERPRINT, fingerprint, V.STRING),
        (Keys.BASE_VOCAB_SIZE, ckpt.hparams.vocab_size, V.UINT32),
        (Keys.INIT, str(ckpt.meta.get("init", "?")), V.STRING),
        (Keys.NORM_WEIGHT, float(recipe.get("norm_weight", 1.0)), V.FLOAT32),
        (Keys.NORM_KIND, recipe.get("norm_kind", "mean_abs"), V.STRING),
        (Keys.STEPS, int(recipe.get("steps", ckpt.meta.get("step", 0))), V.UINT32),
        (Keys.LEARNING_RATE, float(recipe.get("learning_rate", 0.0)), V.FLOAT32),
        (Keys.DATA, str(recipe.get("data", "?")), V.STRING),
        (Keys.CREATED, datetime.now(timezone.utc).isoformat(timespec="seconds"), V.STRING),
        (Keys.TOOL, f"ivl-local {ivl_local.__version__}", V.STRING),
    ]:
        w.add_metadata(key, value, vtype)


def convert_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike,
                       out_type: str = "f16", progress: bool = True,
                       base_gguf: str | os.PathLike | None = None) -> Path:
    """Write `out_path` (f32 | f16 | q8_0; norms stay f32) and return it. Nothing is left at
    out_path unless the whole file was written. Raises CheckpointError, ModelFileError,
    ConfigError."""
    from gguf import GGUFValueType as V

    from ivl_local.progress import byte_progress

    if out_type not in OUT_TYPES:
        raise ConfigError(f"out_type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    out_path = Path(out_path)
    ckpt = read_checkpoint(ckpt_dir)
    base_path = _base_gguf(ckpt, base_gguf)
    with ValueFileWriter(out_path, arch=ckpt.hparams.arch) as w:
        base_name = (ckpt.meta.get("training_base") or {}).get("name", "?")
        kind = "value network" if ckpt.is_value_net else "fine-tuned model"
        w.add_metadata("general.name", f"ivl {kind} for {base_name}", V.STRING)
        w.add_metadata("general.file_type", FILE_TYPE[out_type], V.UINT32)
        if out_type == "q8_0":
            w.add_metadata("general.quantization_version", 2, V.UINT32)
        _arch_hparams(w, ckpt.hparams)
        fingerprint = _tokenizer(w, ckpt, base_path)
        if ckpt.is_value_net:  # a full fine-tune is an ordinary model, not a value file
            _ivl_keys(w, ckpt, fingerprint)
        for name, array in gguf_tensors(ckpt):
            w.add_tensor(name, array, out_type)
        total = sum(a.nbytes for a in ckpt.tensors.values())
        ratio = {"f32": 1.0, "f16": 0.5, "q8_0": 34 / 128}[out_type]
        with byte_progress(f"writing {out_path.name}", int(total * ratio) if progress else 0) as advance:
            w.write(advance if progress else (lambda n: None))
    return out_path


def inspect_value_file(path: str | os.PathLike) -> dict:
    """{'path', 'size_bytes', 'architecture', 'is_value_file', 'ivl': {key: value},
    'general': {...}, 'hparams': {...}, 'tokenizer': {...}, 'tensor_types': {type: count},
    'n_tensors', 'n_params'} -- header only, fast even for a 262k vocabulary. Reads through
    ivl_local.valuefile, so a corrupt or hostile file raises ModelFileError."""
    from gguf import GGMLQuantizationType

    header = read_gguf_header(path)
    md = header.metadata

    def plain(value):
        return value.tolist() if isinstance(value, np.ndarray) else value

    arch = str(md.get("general.architecture", "?"))
    types: dict[str, int] = {}
    n_params = 0
    for t in header.tensors:
        name = GGMLQuantizationType(t.ggml_type).name
        types[name] = types.get(name, 0) + 1
        n_params += int(np.prod(t.shape, dtype=object))
    ivl = {k: plain(v) for k, v in md.items() if k.startswith("ivl.")}
    tokens = md.get("tokenizer.ggml.tokens")
    return {
        "path": str(header.path),
        "size_bytes": header.file_size,
        "architecture": arch,
        "is_value_file": bool(ivl),
        "ivl": ivl,
        "general": {k: plain(v) for k, v in md.items() if k.startswith("general.")},
        "hparams": {k: plain(v) for k, v in md.items() if k.startswith(f"{arch}.")},
        "tokenizer": {"model": md.get("tokenizer.ggml.model"),
                      "n_tokens": len(tokens) if isinstance(tokens, list) else 0,
                      "has_chat_template": "tokenizer.chat_template" in md},
        "tensor_types": types,
        "n_tensors": len(header.tensors),
        "n_params": n_params,
    }
