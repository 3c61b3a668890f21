"""The training checkpoint folder's file names and its JSON reader, without torch.

Shared by the trainer (ivl_local.train.checkpoint, which writes the folder) and ivl-convert
(ivl_convert.checkpoint, which must read it without importing torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError

WEIGHTS = "model.safetensors"      # HF names; a tied lm_head is not stored
WEIGHTS_INDEX = "model.safetensors.index.json"   # a sharded HF folder's tensor -> shard map
HF_CONFIG = "config.json"          # the network's HF config (to_dict())
META = "ivl_checkpoint.json"       # training base, recipe, progress
STATE = "state.pt"                 # optimizer/scheduler/RNG state for --resume (torch)
METRICS = "metrics.jsonl"          # one JSON line per logged step / evaluation

# HF model type -> the llama.cpp architecture ivl-convert writes it as: what a checkpoint or HF
# folder may hold, and so what a pretrained / pruned:K value net may copy. The one list.
# qwen2 is llama plus q/k/v biases and NEOX-style RoPE (llama.cpp takes HF's q/k layout as is);
# gemma3 adds q/k norms, post-attention/FFN norms stored as (1 + w), a sqrt(hidden) embedding
# scale and every 6th layer full attention (ivl_convert.checkpoint checks the rest).
CONVERTIBLE_ARCHS = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}


def read_json(path: Path) -> dict:
    """A checkpoint JSON file as a dict; a missing or malformed file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: not a complete checkpoint (missing {path.name})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
