"""Read and validate a checkpoint folder without torch (json + numpy).

Two kinds of folder:
  * an ivl-train checkpoint (ivl_local.train.checkpoint): model.safetensors (HF names),
    config.json (the HF config), ivl_checkpoint.json (training base, recipe);
  * a Hugging Face causal-LM folder made elsewhere (the paper's official code, any HF
    trainer): config.json, model.safetensors or model.safetensors.index.json + shards
    (f32, f16 or bf16), usually a tokenizer.json -- read by read_hf_folder().
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivl_local.ckpt_layout import CONVERTIBLE_ARCHS, HF_CONFIG, META, WEIGHTS, WEIGHTS_INDEX, read_json
from ivl_local.errors import CheckpointError

from .safetensors_np import read_safetensors


@dataclass(frozen=True)
class HParams:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context_length: int
    rms_eps: float
    rope_theta: float                # gemma3: the full-attention layers' base
    tied: bool
    arch: str = "llama"              # GGUF general.architecture: CONVERTIBLE_ARCHS' values
    sliding_window: int = 0          # gemma3: tokens a sliding-attention layer sees


@dataclass
class Checkpoint:
    path: Path
    meta: dict                       # ivl_checkpoint.json
    hparams: HParams
    tensors: dict[str, np.ndarray]   # HF name -> float32 array, validated

    @property
    def is_value_net(self) -> bool:
        return self.meta.get("kind", "value") == "value"


# llama.cpp's gemma3 hard-codes what HF's config spells out: every 6th layer full attention, the
# others sliding-window with RoPE base 10000, attention scale 1/sqrt(head_dim) (1/sqrt(hidden /
# heads) at 62 layers, Gemma 3 27B), tanh-GELU, no soft-capping. A config it cannot express is
# refused here, not converted into a file that computes something else.
GEMMA3_SWA_PERIOD = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


def gemma3_layer_types(n_layers: int) -> list[str]:
    return ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention"
            for i in range(n_layers)]


def _rope_thetas(config: dict, model_type: str, where: Path) -> tuple[float, float | None]:
    """(theta of full attention, theta of sliding layers or None); only unscaled RoPE."""
    params = config.get("rope_parameters") or {}
    if model_type == "gemma3_text" and isinstance(params.get("full_attention"), dict):
        per_type = params                 # transformers 5: one dict per layer type
    else:
        flat = params or config.get("rope_scaling") or {}
        per_type = {"full_attention": {**flat, "rope_theta": flat.get("rope_theta", config.get(
                        "rope_theta", 1e6 if model_type == "gemma3_text" else 10000.0))},
                    "sliding_attention": {"rope_theta": config.get("rope_local_base_freq",
                                                                   GEMMA3_LOCAL_ROPE_THETA)}}
    for kind, rope in per_type.items():
        if (rope or {}).get("rope_type", "default") not in ("default", None):
            raise CheckpointError(f"{where}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    local = per_type.get("sliding_attention") or {}
    return (float(per_type["full_attention"].get("rope_theta")),
            float(local["rope_theta"]) if model_type == "gemma3_text" else None)


def _check_gemma3(config: dict, h: HParams, local_theta: float | None, where: Path) -> None:
    def refuse(what: str) -> None:
        raise CheckpointError(f"{where}: {what}; llama.cpp's gemma3 cannot express it")

    types = config.get("layer_types") or gemma3_layer_types(h.layers)
    pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", GEMMA3_SWA_PERIOD))
    if list(types) != gemma3_layer_types(h.layers) or pattern != GEMMA3_SWA_PERIOD:
        refuse(f"layer_types {list(types)} are not every {GEMMA3_SWA_PERIOD}th layer full attention")
    if h.sliding_window <= 0:
        refuse(f"sliding_window {config.get('sliding_window')!r}")
    if local_theta != GEMMA3_LOCAL_ROPE_THETA:
        refuse(f"sliding layers' RoPE base {local_theta:g} (not {GEMMA3_LOCAL_ROPE_THETA:g})")
    scalar = config.get("query_pre_attn_scalar", h.head_dim)
    expected = h.hidden // h.heads if h.layers == 62 else h.head_dim
    if scalar != expected:
        refuse(f"query_pre_attn_scalar {scalar} (llama.cpp scales by {expected} at {h.layers} layers)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key):
            refuse(f"{key} {config[key]}")
    if config.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
        refuse(f"hidden_activation {config.get('hidden_activation')!r}")
    if config.get("use_bidirectional_attention") or config.get("attention_bias"):
        refuse("bidirectional attention or attention biases")


def _hparams(config: dict, where: Path) -> HParams:
    model_type = config.get("model_type")
    if model_type not in CONVERTIBLE_ARCHS:
        raise CheckpointError(f"{where}: unsupported architecture {model_type!r} "
                              f"(ivl-convert writes {', '.join(CONVERTIBLE_ARCHS)} networks)")
    if model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        raise CheckpointError(f"{where}: llama with biases is not supported")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise CheckpointError(f"{where}: qwen2 with sliding-window attention is not supported")
    gemma = model_type == "gemma3_text"
    try:
        rope_theta, local_theta = _rope_thetas(config, model_type, where)
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        h = HParams(
            vocab_size=int(config["vocab_size"]), hidden=hidden,
            layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            intermediate=int(config["intermediate_size"]),
            context_length=int(config.get("max_position_embeddings", 2048)),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            tied=bool(config.get("tie_word_embeddings", gemma)),   # Gemma ties by default
            arch=CONVERTIBLE_ARCHS[model_type],
            sliding_window=int(config.get("sliding_window") or 0) if gemma else 0,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: config.json lacks a usable {e}") from None
    if gemma:
        _check_gemma3(config, h, local_theta, where)
    return h


def expected_shapes(h: HParams) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of this arch must hold."""
    shapes = {"model.embed_tokens.weight": (h.vocab_size, h.hidden), "model.norm.weight": (h.hidden,)}
    if not h.tied:
        shapes["lm_head.weight"] = (h.vocab_size, h.hidden)
    q, kv = h.heads * h.head_dim, h.kv_heads * h.head_dim
    for i in range(h.layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h.hidden,),
            p + "self_attn.q_proj.weight": (q, h.hidden),
            p + "self_attn.k_proj.weight": (kv, h.hidden),
            p + "self_attn.v_proj.weight": (kv, h.hidden),
            p + "self_attn.o_proj.weight": (h.hidden, q),
            p + "post_attention_layernorm.weight": (h.hidden,),
            p + "mlp.gate_proj.weight": (h.intermediate, h.hidden),
            p + "mlp.up_proj.weight": (h.intermediate, h.hidden),
            p + "mlp.down_proj.weight": (h.hidden, h.intermediate),
        })
        if h.arch == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if h.arch == "gemma3":
            shapes.update({p + "self_attn.q_norm.weight": (h.head_dim,),
                           p + "self_attn.k_norm.weight": (h.head_dim,),
                           p + "pre_feedforward_layernorm.weight": (h.hidden,),
                           p + "post_feedforward_layernorm.weight": (h.hidden,)})
    return shapes


def load_weights(folder: Path) -> tuple[dict[str, np.ndarray], Path]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json lists;
    -> (tensors, the file named in errors)."""
    single, index = folder / WEIGHTS, folder / WEIGHTS_INDEX
    if single.is_file():
        return read_safetensors(single), single
    if not index.is_file():
        hint = (" (pytorch_model.bin needs torch to read: save the model with "
                "safe_serialization=True)" if (folder / "pytorch_model.bin").is_file() else "")
        raise CheckpointError(f"{folder}: not a complete checkpoint (missing {WEIGHTS} or "
                              f"{WEIGHTS_INDEX}){hint}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: no weight_map of tensor name -> shard file")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:             # a shard is a file of this folder, no path
            raise CheckpointError(f"{index}: shard {shard!r} is not a file name in the folder")
        if not (folder / shard).is_file():
            raise CheckpointError(f"{folder}: missing shard {shard} (listed in {WEIGHTS_INDEX})")
        tensors.update(read_safetensors(folder / shard))
    return tensors, index


def _validated(stored: dict[str, np.ndarray], hparams: HParams, where: Path) -> dict[str, np.ndarray]:
    """Exactly the tensors the config implies, with their shapes, as float32."""
    if hparams.tied:
        stored.pop("lm_head.weight", None)  # a tied head may be saved redundantly
    for name in [n for n in stored if n.endswith("rotary_emb.inv_freq")]:
        del stored[name]                    # older transformers saved RoPE's buffer
    expected = expected_shapes(hparams)
    missing = [name for name in expected if name not in stored]
    if missing:
        raise CheckpointError(f"{where}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = [name for name in stored if name not in expected]
    if unknown:
        raise CheckpointError(f"{where}: unexpected tensor {unknown[0]} for this config")
    for name, shape in expected.items():
        if tuple(stored[name].shape) != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(stored[name].shape)}, "
                                  f"config.json implies {shape}")
    return {name: np.asarray(stored[name], dtype=np.float32) for name in expected}


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder rather than an ivl-train checkpoint."""
    path = Path(path)
    return (path / HF_CONFIG).is_file() and not (path / META).is_file()


def read_hf_folder(folder: str | Path) -> Checkpoint:
    """A causal-LM folder made elsewhere, as a value network. Its meta says where it came
    from; the training base is the caller's to add (ivl-convert's --base)."""
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model folder")
    config = read_json(path / HF_CONFIG)
    hparams = _hparams(config, path / HF_CONFIG)
    stored, where = load_weights(path)
    classes = config.get("architectures") or [hparams.arch]
    meta = {"kind": "value", "source": "foreign",
            "source_detail": f"{classes[0]} folder {path.resolve().name}"}
    return Checkpoint(path, meta, hparams, _validated(stored, hparams, where))


def hf_vocabulary(folder: Path) -> dict[int, str] | None:
    """id -> token text from the folder's tokenizer.json (model vocab + added tokens), or
    None when the folder has none."""
    file = Path(folder) / "tokenizer.json"
    if not file.is_file():
        return None
    data = read_json(file)
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    vocab = model.get("vocab")
    out: dict[int, str] = {}
    if isinstance(vocab, dict):                   # BPE / WordPiece: token -> id
        out.update({i: t for t, i in vocab.items() if type(i) is int})
    elif isinstance(vocab, list):                 # Unigram: [[piece, score], ...]
        out.update({i: e[0] for i, e in enumerate(vocab) if isinstance(e, list) and e})
    else:
        raise CheckpointError(f"{file}: no model vocabulary")
    for added in data.get("added_tokens") or []:
        if isinstance(added, dict) and type(added.get("id")) is int:
            out[added["id"]] = added.get("content")
    return out


def read_checkpoint(ckpt_dir: str | Path) -> Checkpoint:
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    meta = read_json(path / META)
    hparams = _hparams(read_json(path / HF_CONFIG), path / HF_CONFIG)
    stored, where = load_weights(path)
    tensors = _validated(stored, hparams, where)
    if meta.get("kind", "value") == "value":
        base = meta.get("training_base") or {}
        if base.get("vocab_size") not in (None, hparams.vocab_size):
            raise CheckpointError(f"{path}: value vocabulary {hparams.vocab_size} differs from the "
                                  f"training base's {base.get('vocab_size')}")
    return Checkpoint(path, meta, hparams, tensors)
