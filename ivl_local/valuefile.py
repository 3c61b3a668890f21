"""Read and validate GGUF files before llama.cpp sees them; read a value file's `ivl.*` keys.

llama.cpp must never crash or abort on a user's file, so every model path goes through
`check_gguf` first: the file exists, is a regular file, starts with the GGUF magic, has a
supported version, its header parses, and every tensor's data lies inside the file (a
truncated download fails here with one clear line, not in the middle of `mmap`).

The parser is a light one written for this: `gguf.GGUFReader` builds a numpy view per array
element and takes ~15 s on Gemma 3's 262k-token vocabulary; this reads it in well under a
second and keeps token strings as raw bytes (exactly as stored, which is what
`vocab_fingerprint` hashes).

    header = read_gguf_header(path)              # GGUFHeader (metadata, tensors, extents)
    info = read_value_info(path)                 # ValueFileInfo; warns for raw value models
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatVersionError, ModelFileError
from .gguf_keys import FORMAT_MAJOR, Keys, parse_version


GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct format, size); 8 = string and 9 = array are special.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class RawValueModelWarning(UserWarning):
    """A value model without ivl.* metadata is used as a raw value model."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int        # relative to the data section
    n_bytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]        # strings decoded; string arrays as list[bytes]; numeric arrays as numpy
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos, self.end = buf, pos, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.end:
            raise _Truncated
        start = self.pos
        self.pos += n
        return start

    def scalar(self, vtype: int):
        fmt, size = _SCALARS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(size))[0]

    def u32(self) -> int:
        return self.scalar(4)

    def u64(self) -> int:
        return self.scalar(10)

    def raw_string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buf[start:start + n])

    def string(self) -> str:
        return self.raw_string().decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, vtype: int):
    if vtype in _SCALARS:
        return cur.scalar(vtype)
    if vtype == _STRING:
        return cur.string()
    if vtype != _ARRAY:
        raise ModelFileError(f"unknown metadata value type {vtype}")
    elem, count = cur.u32(), cur.u64()
    if elem in _NUMPY:
        size = _SCALARS[elem][1]
        if count > (cur.end - cur.pos) // size:
            raise _Truncated
        start = cur.take(count * size)
        return np.frombuffer(cur.buf, dtype=_NUMPY[elem], count=count, offset=start).copy()
    if elem == _STRING:
        # The hot loop for vocabularies (262k entries): keep it to a few operations.
        buf, pos, end, out = cur.buf, cur.pos, cur.end, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                raise _Truncated
            n = unpack(buf, pos)[0]
            pos += 8
            if n > end - pos:
                raise _Truncated
            out.append(bytes(buf[pos:pos + n]))
            pos += n
        cur.pos = pos
        return out
    # arrays of arrays do not occur in model files we read; walk them generically
    return [_read_value(cur, elem) for _ in range(count)]


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int, name: str) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        raise ModelFileError(f"tensor {name} has an unknown type {ggml_type}") from None
    n = 1
    for d in shape:
        n *= d
    if n % block:
        raise ModelFileError(f"tensor {name} has {n} elements, not a multiple of its block size {block}")
    return n // block * type_size


def check_path(path: str | os.PathLike) -> Path:
    """A readable regular file, or ModelFileError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"no such file: {p}")
    if p.is_dir():
        raise ModelFileError(f"{p} is a folder, expected a .gguf file")
    if not os.access(p, os.R_OK):
        raise ModelFileError(f"cannot read {p} (permission denied)")
    return p


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and validate a GGUF header; raise ModelFileError with one clear line if unusable."""
    p = check_path(path)
    size = p.stat().st_size
    if size < 24:
        raise ModelFileError(f"{p} is not a GGUF file (only {size} bytes)")
    with open(p, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{p} is not a GGUF file (bad magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(p, buf, size)
            except _Truncated:
                raise ModelFileError(f"{p} is truncated or corrupt (its GGUF header runs past the end "
                                     f"of the file); download or convert it again") from None
            except (struct.error, ValueError, OverflowError) as e:
                raise ModelFileError(f"{p} has a corrupt GGUF header ({e})") from None


def _parse(p: Path, buf, size: int) -> GGUFHeader:
    cur = _Cursor(buf, 4)
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian files are not supported)" if version > 0xFFFF else ""
        raise ModelFileError(f"{p} has GGUF version {version}, supported: "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}{hint}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    # every tensor info / key-value pair takes at least 8 bytes: reject absurd counts early
    if n_tensors > size // 8 or n_kv > size // 8:
        raise _Truncated
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = _read_value(cur, cur.u32())
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.u32()
        if n_dims > 8:
            raise ModelFileError(f"{p}: tensor {name} has {n_dims} dimensions (corrupt header)")
        shape = tuple(cur.u64() for _ in range(n_dims))
        ggml_type, offset = cur.u32(), cur.u64()
        tensors.append(TensorInfo(name, shape, ggml_type, offset, _tensor_bytes(shape, ggml_type, name)))
    alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{p}: general.alignment {alignment} is not a power of two")
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    needed = max((data_offset + t.offset + t.n_bytes for t in tensors), default=cur.pos)
    if needed > size:
        raise ModelFileError(f"{p} is truncated: its tensors need {needed:,} bytes, the file has "
                             f"{size:,}; download or convert it again")
    return GGUFHeader(p, version, metadata, tensors, data_offset, size)


@dataclass(frozen=True)
class ValueFileInfo:
    """What a value file says about itself (`ivl.*` keys); `is_raw` when it has none."""

    path: Path
    architecture: str
    name: str
    is_raw: bool
    format_version: str | None = None
    connection: str = "residual"
    default_alpha: float = 1.0
    training_base_name: str | None = None
    training_base_fingerprint: str | None = None
    training_base_vocab_size: int | None = None
    init: str | None = None
    created: str | None = None
    tool: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        if self.is_raw:
            return f"{self.name} (raw value model: no ivl.* metadata)"
        base = f", trained against {self.training_base_name}" if self.training_base_name else ""
        return f"{self.name} (ivl format {self.format_version}, alpha {self.default_alpha:g}{base})"


def value_info_from_header(header: GGUFHeader) -> ValueFileInfo:
    md, p = header.metadata, header.path
    arch = str(md.get("general.architecture", "?"))
    name = str(md.get("general.name", p.name))
    ivl = {k: v for k, v in md.items() if k.startswith("ivl.")}
    if not ivl:
        warnings.warn(f"{p.name} has no ivl.* metadata: using it as a raw value model (alpha 1.0)",
                      RawValueModelWarning, stacklevel=3)
        return ValueFileInfo(p, arch, name, is_raw=True)
    version = ivl.get(Keys.FORMAT_VERSION)
    if not isinstance(version, str):
        raise ModelFileError(f"{p} has ivl.* metadata but no {Keys.FORMAT_VERSION}; convert it again")
    try:
        major, _ = parse_version(version)
    except ValueError:
        raise ModelFileError(f"{p} has an unreadable {Keys.FORMAT_VERSION} {version!r}") from None
    if major > FORMAT_MAJOR:
        raise FormatVersionError(f"{p.name} uses ivl format {version}, this ivl-local reads format "
                                 f"{FORMAT_MAJOR}.x; upgrade ivl-local")
    connection = str(ivl.get(Keys.CONNECTION, "residual"))
    if connection != "residual":
        raise ModelFileError(f"{p.name} uses connection scheme {connection!r}; only 'residual' is supported")
    alpha = float(ivl.get(Keys.DEFAULT_ALPHA, 1.0))
    vocab_size = ivl.get(Keys.BASE_VOCAB_SIZE)
    recipe = {k[len("ivl.recipe."):]: _plain(v) for k, v in ivl.items() if k.startswith("ivl.recipe.")}
    return ValueFileInfo(
        p, arch, name, is_raw=False, format_version=version, connection=connection,
        default_alpha=alpha, training_base_name=_opt_str(ivl.get(Keys.BASE_NAME)),
        training_base_fingerprint=_opt_str(ivl.get(Keys.BASE_VOCAB_FINGERPRINT)),
        training_base_vocab_size=int(vocab_size) if vocab_size is not None else None,
        init=_opt_str(ivl.get(Keys.INIT)), created=_opt_str(ivl.get(Keys.CREATED)),
        tool=_opt_str(ivl.get(Keys.TOOL)), recipe=recipe)


def read_value_info(path: str | os.PathLike) -> ValueFileInfo:
    return value_info_from_header(read_gguf_header(path))


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v
