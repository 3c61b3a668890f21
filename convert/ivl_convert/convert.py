"""Checkpoint folder -> `.ivl.gguf`: a plain llama.cpp GGUF (CONVERTIBLE_ARCHS) carrying a
tokenizer copied key by key from a GGUF (so the file loads on its own) and the `ivl.*`
metadata of ivl_local.gguf_keys.

The folder is an ivl-train checkpoint (training base and recipe recorded in it) or a Hugging
Face causal-LM folder made elsewhere (`base_gguf` is then required: the base it steers,
recorded as its training base). A foreign folder's vocabulary must be the base's (checked
token by token against its tokenizer.json), unless `allow_other_vocab`: then the file
carries the folder's own tokenizer, copied from `vocab_gguf`, and the engine steers the
base through a token map.
"""

from __future__ import annotations

import os
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ivl_local.errors import CheckpointError, ConfigError, ModelFileError, VocabMismatchError
from ivl_local.gguf_keys import FORMAT_MAJOR, FORMAT_MINOR, Keys
from ivl_local.valuefile import read_gguf_header
from ivl_local.vocab_fp import vocab_fingerprint

from .checkpoint import Checkpoint, HParams, hf_vocabulary, is_hf_folder, read_checkpoint, read_hf_folder
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
    """(GGUF name, array) in llama.cpp order; q/k permuted for llama (qwen2's and gemma3's
    NEOX RoPE take HF's layout as is; qwen2 adds q/k/v biases, gemma3 four more norms)."""
    h, t = ckpt.hparams, ckpt.tensors
    llama, gemma = h.arch == "llama", h.arch == "gemma3"

    def norm(name: str) -> np.ndarray:
        # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's gemma3 multiplies by the stored
        # weight, so the stored weight is 1 + w (as llama.cpp's own converter writes it).
        return t[name] + np.float32(1.0) if gemma else t[name]

    yield "token_embd.weight", t["model.embed_tokens.weight"]
    for i in range(h.layers):
        p = f"model.layers.{i}."
        q, k = t[p + "self_attn.q_proj.weight"], t[p + "self_attn.k_proj.weight"]
        if llama:
            q, k = permute_for_llama_cpp(q, h.heads), permute_for_llama_cpp(k, h.kv_heads)
        yield f"blk.{i}.attn_norm.weight", norm(p + "input_layernorm.weight")
        yield f"blk.{i}.attn_q.weight", q
        yield f"blk.{i}.attn_k.weight", k
        yield f"blk.{i}.attn_v.weight", t[p + "self_attn.v_proj.weight"]
        if h.arch == "qwen2":
            for proj in ("q", "k", "v"):
                yield f"blk.{i}.attn_{proj}.bias", t[p + f"self_attn.{proj}_proj.bias"]
        if gemma:
            yield f"blk.{i}.attn_q_norm.weight", norm(p + "self_attn.q_norm.weight")
            yield f"blk.{i}.attn_k_norm.weight", norm(p + "self_attn.k_norm.weight")
        yield f"blk.{i}.attn_output.weight", t[p + "self_attn.o_proj.weight"]
        if gemma:
            yield f"blk.{i}.post_attention_norm.weight", norm(p + "post_attention_layernorm.weight")
            yield f"blk.{i}.ffn_norm.weight", norm(p + "pre_feedforward_layernorm.weight")
        else:
            yield f"blk.{i}.ffn_norm.weight", t[p + "post_attention_layernorm.weight"]
        yield f"blk.{i}.ffn_gate.weight", t[p + "mlp.gate_proj.weight"]
        yield f"blk.{i}.ffn_up.weight", t[p + "mlp.up_proj.weight"]
        yield f"blk.{i}.ffn_down.weight", t[p + "mlp.down_proj.weight"]
        if gemma:
            yield f"blk.{i}.post_ffw_norm.weight", norm(p + "post_feedforward_layernorm.weight")
    yield "output_norm.weight", norm("model.norm.weight")
    if not h.tied:
        yield "output.weight", t["lm_head.weight"]


def _arch_hparams(w: ValueFileWriter, h: HParams) -> None:
    """The `<arch>.*` keys; llama and qwen2 read the same set, gemma3 adds its window (its
    sliding layers' pattern and RoPE base are llama.cpp constants, checked on reading)."""
    from gguf import GGUFValueType as V

    keys = [
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
    ]
    if h.arch == "gemma3":
        keys.append(("attention.sliding_window", h.sliding_window, V.UINT32))
    for key, value, vtype in keys:
        w.add_metadata(f"{h.arch}.{key}", value, vtype)


def _base_gguf(ckpt: Checkpoint, base_gguf: str | os.PathLike | None) -> Path:
    if base_gguf is not None:
        from ivl_local.models import resolve_model

        path = resolve_model(base_gguf)      # a .gguf path or a known model name
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


def _vocabulary(path: Path):
    """(header, tokens, fingerprint) of a GGUF's tokenizer."""
    header = read_gguf_header(path)
    tokens = header.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelFileError(f"{path}: GGUF has no tokenizer to copy")
    types = header.get("tokenizer.ggml.token_type")
    return header, tokens, vocab_fingerprint(tokens, None if types is None else types.tolist())


def _copy_tokenizer(w: ValueFileWriter, header, path: Path) -> None:
    """Every tokenizer.* key of a GGUF, with its stored type."""
    from gguf import GGUFValueType as V

    for key, value in header.metadata.items():
        if not key.startswith("tokenizer."):
            continue
        vtype, elem = header.value_type(key)
        if elem == V.ARRAY:
            raise ModelFileError(f"{path}: {key} is an array of arrays; cannot copy it")
        if isinstance(value, np.ndarray):
            value = value.tolist()      # the gguf writer takes sequences
        w.add_metadata(key, value, vtype, elem)


def _check_logit_count(ckpt: Checkpoint, tokens: list, path: Path, hint: str = "") -> None:
    if len(tokens) != ckpt.hparams.vocab_size:
        raise VocabMismatchError(f"{path}: {len(tokens)} tokens, but {ckpt.path} has "
                                 f"{ckpt.hparams.vocab_size} logits{hint}")


OTHER_VOCAB_HINT = ("; give the base it was trained with as --base, or --allow-other-vocab with "
                    "--vocab-gguf (a GGUF of its own vocabulary) to steer through a token map")


def _check_hf_vocabulary(ckpt: Checkpoint, tokens: list[bytes], path: Path, hint: str) -> None:
    """The folder's tokenizer.json, id by id, against a GGUF's tokens (a GGUF may pad its
    vocabulary past the tokenizer's, as llama.cpp does for Qwen's 151936 logits)."""
    _check_logit_count(ckpt, tokens, path, hint)
    own = hf_vocabulary(ckpt.path)
    if own is None:
        warnings.warn(f"{ckpt.path} has no tokenizer.json: only its vocabulary size "
                      f"({len(tokens)}) could be checked against {path.name}", UserWarning, stacklevel=3)
        return
    differ = [i for i in sorted(own) if i >= len(tokens) or own[i] != tokens[i].decode("utf-8", "replace")]
    if differ:
        i = differ[0]
        theirs = tokens[i].decode("utf-8", "replace") if i < len(tokens) else None
        raise VocabMismatchError(f"{ckpt.path}: its tokenizer differs from {path.name}'s on {len(differ)} of "
                                 f"{len(own)} tokens (id {i} is {own[i]!r} there, {theirs!r} in "
                                 f"{path.name}){hint}")


def _ivl_keys(w: ValueFileWriter, ckpt: Checkpoint, base: dict) -> None:
    """`base`: the training base's name, vocab fingerprint and size."""
    from gguf import GGUFValueType as V

    import ivl_local

    recipe = ckpt.meta.get("recipe")
    keys = [
        (Keys.FORMAT_VERSION, f"{FORMAT_MAJOR}.{FORMAT_MINOR}", V.STRING),
        (Keys.CONNECTION, (recipe or {}).get("connection", "residual"), V.STRING),
        (Keys.DEFAULT_ALPHA, 1.0, V.FLOAT32),
        (Keys.BASE_NAME, str(base.get("name", "?")), V.STRING),
        (Keys.BASE_VOCAB_FINGERPRINT, base["vocab_fingerprint"], V.STRING),
        (Keys.BASE_VOCAB_SIZE, int(base["vocab_size"]), V.UINT32),
        (Keys.SOURCE, ckpt.meta.get("source", "ivl-train"), V.STRING),
    ]
    detail = ckpt.meta.get("source_detail", f"ivl-train checkpoint {ckpt.path.resolve().name}")
    keys.append((Keys.SOURCE_DETAIL, detail, V.STRING))
    if "init" in ckpt.meta:
        keys.append((Keys.INIT, str(ckpt.meta["init"]), V.STRING))
    if recipe is not None:             # a foreign folder's recipe is unknown: no recipe keys
        keys += [
            (Keys.NORM_WEIGHT, float(recipe.get("norm_weight", 1.0)), V.FLOAT32),
            (Keys.NORM_KIND, recipe.get("norm_kind", "mean_abs"), V.STRING),
            (Keys.STEPS, int(recipe.get("steps", ckpt.meta.get("step", 0))), V.UINT32),
            (Keys.LEARNING_RATE, float(recipe.get("learning_rate", 0.0)), V.FLOAT32),
            (Keys.DATA, str(recipe.get("data", "?")), V.STRING),
        ]
    keys += [(Keys.CREATED, datetime.now(timezone.utc).isoformat(timespec="seconds"), V.STRING),
             (Keys.TOOL, f"ivl-local {ivl_local.__version__}", V.STRING)]
    for key, value, vtype in keys:
        w.add_metadata(key, value, vtype)


def _plan(ckpt_dir, base_gguf, allow_other_vocab: bool, vocab_gguf):
    """-> (checkpoint, tokenizer header, its GGUF path, training base {name, vocab_fingerprint,
    vocab_size}), every check done."""
    from ivl_local.models import resolve_model

    if not is_hf_folder(ckpt_dir):
        if allow_other_vocab or vocab_gguf is not None:
            raise ConfigError("--allow-other-vocab and --vocab-gguf are for Hugging Face folders; an "
                              "ivl-train checkpoint carries its training base's vocabulary")
        ckpt = read_checkpoint(ckpt_dir)
        path = _base_gguf(ckpt, base_gguf)
        header, tokens, fingerprint = _vocabulary(path)
        expected = (ckpt.meta.get("training_base") or {}).get("vocab_fingerprint")
        if expected and expected != fingerprint:
            raise CheckpointError(f"{path}: vocabulary fingerprint {fingerprint} differs from the "
                                  f"one the checkpoint was trained with ({expected})")
        _check_logit_count(ckpt, tokens, path)
        name = (ckpt.meta.get("training_base") or {}).get("name", "?")
        return ckpt, header, path, {"name": name, "vocab_fingerprint": fingerprint, "vocab_size": len(tokens)}
    if base_gguf is None:
        raise ConfigError(f"{ckpt_dir} is a Hugging Face model folder: give the base it steers with "
                          "--base (a .gguf file or a known model name)")
    if vocab_gguf is not None and not allow_other_vocab:
        raise ConfigError("--vocab-gguf needs --allow-other-vocab")
    ckpt = read_hf_folder(ckpt_dir)
    base_path = resolve_model(base_gguf)
    base_header, base_tokens, base_fp = _vocabulary(base_path)
    base = {"name": os.fspath(base_gguf), "vocab_fingerprint": base_fp, "vocab_size": len(base_tokens)}
    if not allow_other_vocab:
        _check_hf_vocabulary(ckpt, base_tokens, base_path, OTHER_VOCAB_HINT)
        return ckpt, base_header, base_path, base
    if vocab_gguf is None:
        raise ConfigError("--allow-other-vocab needs --vocab-gguf: a GGUF with the folder's own "
                          "vocabulary (e.g. its base model), whose tokenizer the value file carries")
    own_path = resolve_model(vocab_gguf)
    own_header, own_tokens, _ = _vocabulary(own_path)
    _check_hf_vocabulary(ckpt, own_tokens, own_path, " (--vocab-gguf must hold the folder's own vocabulary)")
    return ckpt, own_header, own_path, base


def convert_checkpoint(ckpt_dir: str | os.PathLike, out_path: str | os.PathLike,
                       out_type: str = "f16", progress: bool = True,
                       base_gguf: str | os.PathLike | None = None, allow_other_vocab: bool = False,
                       vocab_gguf: str | os.PathLike | None = None) -> Path:
    """Write `out_path` (f32 | f16 | q8_0; norms stay f32) and return it. Nothing is left at
    out_path unless the whole file was written. `base_gguf` (a file or known model name):
    the training base, if it moved since training; required for a Hugging Face folder.
    Raises CheckpointError, ModelFileError, VocabMismatchError, ConfigError."""
    from gguf import GGUFValueType as V

    from ivl_local.progress import byte_progress

    if out_type not in OUT_TYPES:
        raise ConfigError(f"out_type must be one of {', '.join(OUT_TYPES)}, got {out_type!r}")
    out_path = Path(out_path)
    ckpt, tok_header, tok_path, base = _plan(ckpt_dir, base_gguf, allow_other_vocab, vocab_gguf)
    with ValueFileWriter(out_path, arch=ckpt.hparams.arch) as w:
        kind = "value network" if ckpt.is_value_net else "fine-tuned model"
        w.add_metadata("general.name", f"ivl {kind} for {base['name']}", V.STRING)
        w.add_metadata("general.file_type", FILE_TYPE[out_type], V.UINT32)
        if out_type == "q8_0":
            w.add_metadata("general.quantization_version", 2, V.UINT32)
        _arch_hparams(w, ckpt.hparams)
        _copy_tokenizer(w, tok_header, tok_path)
        if ckpt.is_value_net:  # a full fine-tune is an ordinary model, not a value file
            _ivl_keys(w, ckpt, base)
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
