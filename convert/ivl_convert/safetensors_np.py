"""Read a .safetensors file into float32 numpy arrays, bfloat16 included, without torch.

safetensors' own numpy loader refuses bfloat16 (numpy has no such type), and bfloat16 is
how most Hugging Face checkpoints are saved. The format is small: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}}, then the
raw little-endian data. Every field is checked against the file, so a truncated or forged
file is one CheckpointError naming it, never a crash or a huge allocation.

    tensors = read_safetensors(Path("model.safetensors"))   # {name: float32 ndarray}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ivl_local.errors import CheckpointError

MAX_HEADER_BYTES = 100 << 20          # safetensors' own limit on the JSON header
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
                "BF16": np.dtype("<u2")}   # bf16: the top 16 bits of a float32


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except ValueError:                               # an empty file cannot be mapped
        raise CheckpointError(f"{path}: unreadable safetensors file (empty)") from None
    size = data.shape[0]

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: unreadable safetensors file ({why})")

    if size < 8:
        raise bad("shorter than its header")
    n = int(np.frombuffer(data[:8].tobytes(), "<u8")[0])
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise bad(f"header of {n} bytes in a {size}-byte file")
    try:
        header = json.loads(data[8:8 + n].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    start = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
            ok = all(type(d) is int and d >= 0 for d in shape) and type(begin) is int and type(end) is int
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise bad(f"malformed entry for tensor {name}")
        if dtype not in FLOAT_DTYPES:
            raise bad(f"tensor {name} is {dtype}; expected float weights (F32, F16, BF16)")
        item = FLOAT_DTYPES[dtype].itemsize
        count = int(np.prod(shape, dtype=object))
        if not 0 <= begin <= end <= size - start or end - begin != count * item:
            raise bad(f"tensor {name}'s data [{begin}, {end}) does not fit its shape {shape} "
                      "or the file")
        raw = data[start + begin:start + end].view(FLOAT_DTYPES[dtype]).reshape(shape)
        out[name] = _to_float32(raw, dtype)
    return out
