"""Checkpoint folder layout (read by ivl_convert without torch):

    model.safetensors    value network weights, HF llama names; a tied lm_head is not stored
    config.json          the value network's HF config (LlamaConfig.to_dict())
    ivl_checkpoint.json  what it was trained against and how (see CHECKPOINT_FORMAT below)
    state.pt             optimizer/scheduler/RNG state for --resume (torch; not needed to convert)
    metrics.jsonl        one JSON line per logged step / evaluation

Every file is written to a temporary name in the folder, then moved into place, so an
interrupted save never leaves a half-written checkpoint (ivl_local.atomic; the next save
removes what a killed one left).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write
from ..ckpt_layout import HF_CONFIG, META, METRICS, STATE, WEIGHTS, read_json
from ..errors import CheckpointError

CHECKPOINT_FORMAT = 1


def _write_json(path: Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, write)


def weights_for_saving(model: nn.Module, state: dict | None = None) -> dict[str, torch.Tensor]:
    """State dict (`state`, or the model's own) with shared tensors stored once (a tied
    lm_head is dropped)."""
    state = model.state_dict() if state is None else state
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        out[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def save_model(out_dir: Path, model: nn.Module, meta: dict, state: dict | None = None) -> None:
    """`state`: the weights to write when the model's own are shards (FSDP gathers them)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_for_saving(model, state)
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    _write_json(out_dir / HF_CONFIG, config)
    _write_json(out_dir / META, {"checkpoint_format": CHECKPOINT_FORMAT, **meta})


def save_state(out_dir: Path, state: dict) -> None:
    atomic_write(out_dir / STATE, lambda tmp: torch.save(state, tmp))


def load_meta(ckpt_dir: Path) -> dict:
    return read_json(Path(ckpt_dir) / META)


def load_weights_into(model: nn.Module, ckpt_dir: Path) -> None:
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: missing {WEIGHTS}")
    weights = load_file(str(path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_state(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: nothing to resume (no {STATE})")
    return torch.load(path, map_location="cpu", weights_only=False)


def append_metrics(out_dir: Path, record: dict) -> None:
    with open(out_dir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
