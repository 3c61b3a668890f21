"""Fast reader of a GGUF file's key/value metadata (no tensors, no torch, no numpy).

gguf.GGUFReader builds a numpy view per array element, ~18 s for a 262k-token vocabulary on
a small machine; parsing the header directly takes well under a second. Used by training
(base vocabulary, chat template) and by ivl_convert (copying the tokenizer keys).

    meta = read_metadata(path)          # {key: MetaValue(value, type, sub_type)}
    meta["tokenizer.ggml.tokens"].value  # list[bytes]  (strings stay raw bytes)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

# GGUF value types (gguf.GGUFValueType numbering).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
           FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


@dataclass(frozen=True)
class MetaValue:
    value: Any                  # int/float/bool, bytes for strings, list for arrays
    type: int                   # GGUF value type
    sub_type: int | None = None  # element type of an array

    @property
    def text(self) -> str:
        assert self.type == STRING
        return self.value.decode("utf-8", errors="replace")


class _Cursor:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> bytes:
        n = self.take("<Q")
        value = self.data[self.pos:self.pos + n]
        self.pos += n
        return value

    def array(self, sub_type: int, count: int) -> list:
        if sub_type == STRING:
            return [self.string() for _ in range(count)]
        if sub_type == ARRAY:
            raise ModelFileError("nested GGUF arrays are not supported")
        fmt = _SCALAR[sub_type]
        size = struct.calcsize(fmt)
        values = list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, self.pos))
        self.pos += size * count
        return values


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # ggml order (fastest-varying first), as stored
    ggml_type: int              # gguf.GGMLQuantizationType value
    offset: int                 # relative to the start of the data section


def read_metadata(path: str | Path) -> dict[str, MetaValue]:
    return read_header(path)[0]


def read_header(path: str | Path) -> tuple[dict[str, MetaValue], list[TensorInfo]]:
    """Key/value metadata and tensor infos (no tensor data is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if len(head) < 24 or head[:4] != b"GGUF":
                raise ModelFileError(f"{path} is not a GGUF file (bad magic)")
            version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:])
            if version < 2:
                raise ModelFileError(f"{path}: GGUF version {version} is too old")
            # Metadata sits at the front; read growing windows until every key parsed.
            size = 1 << 22
            while True:
                f.seek(24)
                data = f.read(size)
                try:
                    return _parse(data, n_kv, n_tensors)
                except (struct.error, IndexError):
                    if len(data) < size:
                        raise ModelFileError(f"{path}: truncated GGUF metadata") from None
                    size *= 4
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from None


def _parse(data: bytes, n_kv: int, n_tensors: int) -> tuple[dict[str, MetaValue], list[TensorInfo]]:
    cur = _Cursor(data)
    out: dict[str, MetaValue] = {}
    for _ in range(n_kv):
        key = cur.string().decode("utf-8")
        vtype = cur.take("<I")
        if vtype == ARRAY:
            sub_type = cur.take("<I")
            count = cur.take("<Q")
            out[key] = MetaValue(cur.array(sub_type, count), ARRAY, sub_type)
        elif vtype == STRING:
            out[key] = MetaValue(cur.string(), STRING)
        elif vtype in _SCALAR:
            out[key] = MetaValue(cur.take(_SCALAR[vtype]), vtype)
        else:
            raise ModelFileError(f"unknown GGUF value type {vtype} for key {key}")
        if cur.pos > len(data):
            raise IndexError
    tensors = []
    for _ in range(n_tensors):
        name = cur.string().decode("utf-8")
        n_dims = cur.take("<I")
        shape = tuple(cur.take("<Q") for _ in range(n_dims))
        tensors.append(TensorInfo(name, shape, cur.take("<I"), cur.take("<Q")))
        if cur.pos > len(data):
            raise IndexError
    return out, tensors
