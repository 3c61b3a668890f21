"""The one GGUF reader: parse and validate a file before llama.cpp sees it; read `ivl.*` keys.

llama.cpp must never crash or abort on a user's file, so every model path goes through
`read_gguf_header` first: the file exists, is a regular little-endian GGUF of version 2 or 3,
its header parses within bounds, every tensor's data lies inside the file, and the
hyperparameters llama.cpp would GGML_ASSERT on (or divide by) are in range
(`check_hparams`). A bad file fails here with one `ModelFileError` that names the key.

Runtime, `ivl inspect`, `ivl-convert` and training all read through this module. It is
written for speed as well as safety: `gguf.GGUFReader` builds a numpy view per array element
and takes ~15 s on Gemma 3's 262k-token vocabulary; this reads it in well under a second and
keeps token strings as raw bytes (exactly as stored, which is what `vocab_fingerprint` hashes).

    header = read_gguf_header(path)              # GGUFHeader (metadata, value types, tensors)
    header.get("tokenizer.ggml.tokens")          # list[bytes]; numeric arrays are numpy
    header.value_type("tokenizer.ggml.scores")   # (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
    info = read_value_info(path)                 # ValueFileInfo; warns for raw value models
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as VT, TokenType

from .config import check_alpha
from .errors import ConfigError, FormatVersionError, ModelFileError
from .gguf_keys import FORMAT_MAJOR, Keys, parse_version

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 8        # arrays of arrays; llama.cpp itself reads none
MAX_DIMS = 4               # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63       # GGML_MAX_NAME - 1 (names are NUL-terminated char[64])

_SCALAR_FORMAT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h",
                  VT.UINT32: "<I", VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?",
                  VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_SCALAR = {vtype: struct.Struct(fmt) for vtype, fmt in _SCALAR_FORMAT.items()}
_NUMPY = {vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMAT.items()}
_U32, _U64 = _SCALAR[VT.UINT32], _SCALAR[VT.UINT64]
_MIN_KV_BYTES = 8 + 1 + 4 + 1            # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 4 + 8    # name length, a 1-byte name, n_dims, type, offset


class _Truncated(Exception):
    pass


class RawValueModelWarning(UserWarning):
    """A value model without ivl.* metadata is used as a raw value model."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]     # ggml order (fastest-varying first), as stored
    ggml_type: int             # a GGMLQuantizationType value
    offset: int                # relative to the data section
    n_bytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]   # strings decoded; string arrays as list[bytes]; numeric arrays as numpy
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    types: dict[str, tuple[VT, VT | None]] = field(default_factory=dict)  # key -> (type, element type)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def value_type(self, key: str) -> tuple[VT, VT | None]:
        """(GGUF value type, element type of an array or None), e.g. to copy a key as stored."""
        return self.types[key]


# --- parsing --------------------------------------------------------------------------------

class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos, self.end = buf, pos, len(buf)

    def take(self, n: int) -> int:
        if n < 0 or n > self.end - self.pos:
            raise _Truncated
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: struct.Struct):
        return fmt.unpack_from(self.buf, self.take(fmt.size))[0]

    def u32(self) -> int:
        return self.unpack(_U32)

    def u64(self) -> int:
        return self.unpack(_U64)

    def raw_string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return self.buf[start:start + n]

    def left(self) -> int:
        return self.end - self.pos


def _value_type(code: int, what: str) -> VT:
    try:
        return VT(code)
    except ValueError:
        raise ModelFileError(f"{what} has an unknown GGUF value type {code}") from None


def _read_value(cur: _Cursor, vtype: VT, key: str) -> tuple[Any, VT | None]:
    """(value, element type if an array)."""
    if vtype == VT.STRING:
        return cur.raw_string().decode("utf-8", errors="replace"), None
    if vtype != VT.ARRAY:
        return cur.unpack(_SCALAR[vtype]), None
    elem, count = _array_head(cur, key)
    if elem != VT.ARRAY:
        return _read_flat_array(cur, elem, count), elem
    # Arrays of arrays: walked with an explicit stack, never recursion, and at most
    # MAX_ARRAY_DEPTH deep (a hostile file may nest them thousands of levels).
    root: list = []
    stack = [(root, count)]                  # (list being filled, how many arrays it holds)
    while stack:
        out, n = stack[-1]
        if len(out) == n:
            stack.pop()
            continue
        sub, sub_count = _array_head(cur, key)
        if sub != VT.ARRAY:
            out.append(_read_flat_array(cur, sub, sub_count))
        elif len(stack) + 2 > MAX_ARRAY_DEPTH:    # this child and its own arrays: two levels more
            raise ModelFileError(f"metadata key {key} nests arrays more than {MAX_ARRAY_DEPTH} levels deep")
        else:
            child: list = []
            out.append(child)
            stack.append((child, sub_count))
    return root, VT.ARRAY


def _array_head(cur: _Cursor, key: str) -> tuple[VT, int]:
    elem = _value_type(cur.u32(), f"the array of metadata key {key}")
    count = cur.u64()
    smallest = 12 if elem == VT.ARRAY else 8 if elem == VT.STRING else _SCALAR[elem].size
    if count > cur.left() // smallest:
        raise _Truncated
    return elem, count


def _read_flat_array(cur: _Cursor, elem: VT, count: int):
    if elem != VT.STRING:
        start = cur.take(count * _SCALAR[elem].size)
        return np.frombuffer(cur.buf, dtype=_NUMPY[elem], count=count, offset=start).copy()
    # The hot loop for vocabularies (262k entries): keep it to a few operations.
    buf, pos, end, out = cur.buf, cur.pos, cur.end, []
    unpack = _U64.unpack_from
    for _ in range(count):
        if pos + 8 > end:
            raise _Truncated
        n = unpack(buf, pos)[0]
        pos += 8
        if n > end - pos:
            raise _Truncated
        out.append(buf[pos:pos + n])       # an mmap slice is already a bytes copy
        pos += n
    cur.pos = pos
    return out


def _utf8_name(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelFileError(f"{what} {raw[:40]!r} is not valid UTF-8") from None


def _tensor_bytes(shape: tuple[int, ...], ggml_type: int, name: str) -> int:
    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (KeyError, ValueError):
        raise ModelFileError(f"tensor {name} has an unknown tensor type {ggml_type}") from None
    n = math.prod(shape)
    if n >= 2**63:
        raise ModelFileError(f"tensor {name} has an impossible shape {shape}")
    if shape and shape[0] % block:
        raise ModelFileError(f"tensor {name} of type {GGMLQuantizationType(ggml_type).name} has rows of "
                             f"{shape[0]} elements, not a multiple of its block size {block}")
    return n // block * type_size


def check_path(path: str | os.PathLike) -> Path:
    """A readable regular file, or ModelFileError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"no such file: {p}")
    if p.is_dir():
        raise ModelFileError(f"{p} is a folder, expected a .gguf file")
    if not p.is_file():
        raise ModelFileError(f"{p} is not a regular file, expected a .gguf file")
    if not os.access(p, os.R_OK):
        raise ModelFileError(f"cannot read {p} (permission denied)")
    return p


def read_gguf_header(path: str | os.PathLike, check: bool = True) -> GGUFHeader:
    """Parse and validate a GGUF header (and, with `check`, its hyperparameters: `check_hparams`);
    raise ModelFileError with one clear line if the file is unusable."""
    p = check_path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ModelFileError(f"{p} is not a GGUF file (only {size} bytes)")
            if f.read(4) != GGUF_MAGIC:
                raise ModelFileError(f"{p} is not a GGUF file (bad magic)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                try:
                    header = _parse(p, buf, size)
                except _Truncated:
                    raise ModelFileError(f"{p} is truncated or corrupt (its GGUF header runs past the end "
                                         f"of the file); download or convert it again") from None
                except ModelFileError as e:
                    raise ModelFileError(f"{p}: {e}") from None
    except OSError as e:
        raise ModelFileError(f"cannot read {p}: {e.strerror or e}") from None
    if check:
        try:
            check_hparams(header)
        except ModelFileError as e:
            raise ModelFileError(f"{p}: {e}") from None
    return header


def _parse(p: Path, buf, size: int) -> GGUFHeader:
    cur = _Cursor(buf, 4)
    version = cur.u32()
    if version & 0xFFFF == 0:
        raise ModelFileError(f"GGUF version field {version:#x} looks byte-swapped: big-endian GGUF "
                             f"files are not supported, convert the model on a little-endian machine")
    if version not in SUPPORTED_VERSIONS:
        raise ModelFileError(f"GGUF version {version} is not supported (supported: "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_kv > cur.left() // _MIN_KV_BYTES or n_tensors > cur.left() // _MIN_TENSOR_BYTES:
        raise _Truncated
    metadata: dict[str, Any] = {}
    types: dict[str, tuple[VT, VT | None]] = {}
    for i in range(n_kv):
        key = _utf8_name(cur.raw_string(), f"metadata key #{i}")
        if not key:
            raise ModelFileError(f"metadata key #{i} is empty")
        if key in metadata:
            raise ModelFileError(f"metadata key {key} appears twice")
        vtype = _value_type(cur.u32(), f"metadata key {key}")
        metadata[key], elem = _read_value(cur, vtype, key)
        types[key] = (vtype, elem)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in types and types["general.alignment"][0] != VT.UINT32:
        raise ModelFileError(f"general.alignment must be a uint32, found {types['general.alignment'][0].name}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelFileError(f"general.alignment {alignment} is not a power of two")

    tensors, names, expected_offset = [], set(), 0
    for _ in range(n_tensors):
        name = _utf8_name(cur.raw_string(), "tensor name")
        if not name or len(name.encode()) > MAX_TENSOR_NAME:
            raise ModelFileError(f"tensor name {name[:80]!r} is empty or longer than {MAX_TENSOR_NAME} bytes")
        if name in names:
            raise ModelFileError(f"tensor {name} appears twice")
        names.add(name)
        n_dims = cur.u32()
        if n_dims > MAX_DIMS:
            raise ModelFileError(f"tensor {name} has {n_dims} dimensions (at most {MAX_DIMS})")
        shape = tuple(cur.u64() for _ in range(n_dims))
        if any(d >= 2**63 for d in shape):
            raise ModelFileError(f"tensor {name} has an impossible shape {shape}")
        ggml_type, offset = cur.u32(), cur.u64()
        info = TensorInfo(name, shape, ggml_type, offset, _tensor_bytes(shape, ggml_type, name))
        # llama.cpp requires the tensors to lie back to back, each padded to the alignment
        if offset != expected_offset:
            raise ModelFileError(f"tensor {name} has data offset {offset}, expected {expected_offset}")
        expected_offset += -(-info.n_bytes // alignment) * alignment
        tensors.append(info)
    data_offset = -(-cur.pos // alignment) * alignment
    needed = max((data_offset + t.offset + t.n_bytes for t in tensors), default=cur.pos)
    if needed > size:
        raise ModelFileError(f"the file is truncated: its tensors need {needed:,} bytes, it has {size:,}; "
                             f"download or convert it again")
    return GGUFHeader(p, version, metadata, tensors, data_offset, size, types)


# --- hyperparameters ------------------------------------------------------------------------
# What llama.cpp's loader reads and would GGML_ASSERT on, abort, divide by or index with
# (llama-model.cpp load_hparams, llama-vocab.cpp load, ggml's rms_norm/rope/mul_mat asserts).
# Keys are checked when present; a missing required key is llama.cpp's own clean error,
# except where its default would crash (head counts of an attention model with blocks).

LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
MAX_CONTEXT = 1 << 26            # far above any released model (10M tokens)
MAX_EMBEDDING = 1 << 20
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
ATTENTION_ARCHS = ("llama", "qwen2", "gemma3")   # head and RoPE geometry checked in full
# Counts llama.cpp reads as uint32 (suffix of "{arch}."): (smallest, largest) allowed.
_COUNTS = {"block_count": (1, LLAMA_MAX_LAYERS), "context_length": (1, MAX_CONTEXT),
           "embedding_length": (1, MAX_EMBEDDING), "expert_count": (0, LLAMA_MAX_EXPERTS),
           "expert_group_count": (0, LLAMA_MAX_EXPERTS), "expert_group_used_count": (0, LLAMA_MAX_EXPERTS),
           "nextn_predict_layers": (0, LLAMA_MAX_LAYERS), "attention.key_length": (1, MAX_EMBEDDING),
           "attention.value_length": (1, MAX_EMBEDDING), "rope.dimension_count": (0, MAX_EMBEDDING)}
# Per-layer values: one uint32 for every layer, or an array of block_count integers.
_PER_LAYER = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")
_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")
_TOKEN_IDS = tuple(f"tokenizer.ggml.{name}_token_id" for name in (
    "bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask", "fim_pre", "fim_suf",
    "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle"))   # llama.cpp spells "seperator"
_BLOCK = re.compile(r"blk\.(\d+)\.")
_BYTE_TOKENS = [f"<0x{b:02X}>".encode() for b in range(256)]
_BYTE_TOKEN = re.compile(rb"<0x[0-9A-Fa-f]{2}>")
TOKEN_TYPE_BYTE = TokenType.BYTE


def _typed(header: GGUFHeader, key: str, want: tuple[VT, ...], elem: tuple[VT, ...] = ()) -> Any:
    """The value of `key` if present and of an allowed type, else ModelFileError naming it."""
    if key not in header.types:
        return None
    vtype, etype = header.types[key]
    if vtype not in want or (vtype == VT.ARRAY and etype not in elem):
        found = vtype.name + (f" of {etype.name}" if vtype == VT.ARRAY else "")
        wanted = " or ".join(w.name if w != VT.ARRAY else "ARRAY of " + "/".join(e.name for e in elem)
                             for w in want)
        raise ModelFileError(f"{key} must be {wanted}, found {found}")
    return header.metadata[key]


def _count(header: GGUFHeader, key: str, low: int, high: int) -> int | None:
    value = _typed(header, key, (VT.UINT32,))
    if value is not None and not low <= value <= high:
        raise ModelFileError(f"{key} = {value} is out of range (expected {low}..{high})")
    return value


def _per_layer(header: GGUFHeader, key: str, n_layer: int | None) -> list[int] | None:
    value = _typed(header, key, (VT.UINT32, VT.ARRAY), (VT.UINT32, VT.INT32))
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        if n_layer is not None and len(value) != n_layer:
            raise ModelFileError(f"{key} has {len(value)} entries, expected one per layer ({n_layer})")
        if (value < 0).any() or (value > MAX_EMBEDDING * 64).any():
            raise ModelFileError(f"{key} has an entry out of range")
        return [int(v) for v in value]
    return [value] * (n_layer or 1)


def check_hparams(header: GGUFHeader) -> None:
    """Refuse, naming the key, what llama.cpp would crash on; checks only keys that are present."""
    md = header.metadata
    arch = _typed(header, "general.architecture", (VT.STRING,))
    _check_tokenizer(header)
    if arch is None:
        return
    a = f"{arch}."
    counts = {suffix: _count(header, a + suffix, *limits) for suffix, limits in _COUNTS.items()}
    n_layer, n_embd = counts["block_count"], counts["embedding_length"]
    blocks = {int(m.group(1)) for t in header.tensors if (m := _BLOCK.match(t.name))}
    if blocks and n_layer is not None and max(blocks) + 1 != n_layer:
        raise ModelFileError(f"{a}block_count = {n_layer}, but the file has tensors for {max(blocks) + 1} blocks")
    if counts["nextn_predict_layers"] and n_layer is not None and counts["nextn_predict_layers"] > n_layer:
        raise ModelFileError(f"{a}nextn_predict_layers = {counts['nextn_predict_layers']} exceeds "
                             f"{a}block_count = {n_layer}")
    layers = {suffix: _per_layer(header, a + suffix, n_layer) for suffix in _PER_LAYER}
    _check_experts(a, counts, layers["expert_used_count"])
    for suffix in _EPSILONS:
        eps = _typed(header, a + suffix, (VT.FLOAT32,))
        if eps is not None and not (math.isfinite(eps) and eps > 0):
            raise ModelFileError(f"{a}{suffix} = {eps:g} must be a finite number > 0")
    for suffix in ("rope.freq_base", "rope.scaling.factor"):
        value = _typed(header, a + suffix, (VT.FLOAT32,))
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ModelFileError(f"{a}{suffix} = {value:g} must be a finite number >= 0")
    scaling = _typed(header, a + "rope.scaling.type", (VT.STRING,))
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise ModelFileError(f"{a}rope.scaling.type {scaling!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    tokens = md.get("tokenizer.ggml.tokens")
    for tensor in ("token_embd.weight", "output.weight"):
        t = next((t for t in header.tensors if t.name == tensor), None)
        if t is None or len(t.shape) != 2:
            continue
        if n_embd is not None and t.shape[0] != n_embd:
            raise ModelFileError(f"{a}embedding_length = {n_embd}, but {tensor} has rows of {t.shape[0]}")
        if isinstance(tokens, list) and t.shape[1] != len(tokens):
            raise ModelFileError(f"tokenizer.ggml.tokens has {len(tokens)} tokens, but {tensor} "
                                 f"has {t.shape[1]} rows")
    if arch in ATTENTION_ARCHS:
        _check_attention(header, arch, n_embd, counts, layers, has_blocks=bool(blocks))


def _check_experts(a: str, counts: dict, used: list[int] | None) -> None:
    n_expert, groups = counts["expert_count"] or 0, counts["expert_group_count"] or 0
    used_max = max(used) if used else 0
    if used_max > n_expert:
        raise ModelFileError(f"{a}expert_used_count = {used_max} exceeds {a}expert_count = {n_expert}")
    if n_expert == 0:
        if groups:
            raise ModelFileError(f"{a}expert_group_count = {groups} without {a}expert_count")
        return
    if used_max == 0:
        raise ModelFileError(f"{a}expert_count = {n_expert} needs {a}expert_used_count >= 1")
    if groups >= n_expert:
        raise ModelFileError(f"{a}expert_group_count = {groups} must be below {a}expert_count = {n_expert}")
    if groups > 1:
        group_used = counts["expert_group_used_count"] or 0
        if n_expert % groups:
            raise ModelFileError(f"{a}expert_count = {n_expert} is not a multiple of "
                                 f"{a}expert_group_count = {groups}")
        if not 0 < group_used < groups:
            raise ModelFileError(f"{a}expert_group_used_count = {group_used} must be in 1..{groups - 1}")


def _check_attention(header: GGUFHeader, arch: str, n_embd: int | None, counts: dict, layers: dict,
                     has_blocks: bool) -> None:
    """Head geometry of llama / qwen2 / gemma3: every dimension llama.cpp derives must be >= 1."""
    a = f"{arch}."
    heads, heads_kv, ff = (layers["attention.head_count"], layers["attention.head_count_kv"],
                           layers["feed_forward_length"])
    if has_blocks:
        for suffix in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length",
                       "attention.layer_norm_rms_epsilon"):
            if a + suffix not in header.metadata:
                raise ModelFileError(f"{a}{suffix} is missing")
    if heads is None:
        return
    if heads_kv is None:
        heads_kv = heads
    for i, (n_head, n_head_kv) in enumerate(zip(heads, heads_kv)):
        where = f" (layer {i})" if len(set(heads)) > 1 or len(set(heads_kv)) > 1 else ""
        if n_head == 0:
            raise ModelFileError(f"{a}attention.head_count is 0{where}")
        if n_head_kv == 0 or n_head % n_head_kv:
            raise ModelFileError(f"{a}attention.head_count_kv = {n_head_kv} must divide "
                                 f"{a}attention.head_count = {n_head}{where}")
    if ff is not None and 0 in ff:
        raise ModelFileError(f"{a}feed_forward_length is 0")
    n_head, head_k, head_v = heads[0], counts["attention.key_length"], counts["attention.value_length"]
    # without explicit head sizes llama.cpp takes n_embd / n_head
    if n_embd is not None and (head_k is None or head_v is None):
        if n_embd % n_head:
            raise ModelFileError(f"{a}attention.head_count = {n_head} does not divide "
                                 f"{a}embedding_length = {n_embd}")
        head_k, head_v = head_k or n_embd // n_head, head_v or n_embd // n_head
    if head_k is None or head_v is None:
        return
    # per-layer head counts must agree with the projections (the graph asserts otherwise)
    shapes = {t.name: t.shape for t in header.tensors}
    for i, (n_head_i, n_head_kv) in enumerate(zip(heads, heads_kv)):
        for proj, rows, key in (("q", head_k * n_head_i, "attention.head_count"),
                                ("k", head_k * n_head_kv, "attention.head_count_kv"),
                                ("v", head_v * n_head_kv, "attention.head_count_kv")):
            shape = shapes.get(f"blk.{i}.attn_{proj}.weight")
            if shape is not None and len(shape) == 2 and shape[1] != rows:
                raise ModelFileError(f"blk.{i}.attn_{proj}.weight has {shape[1]} rows, but {a}{key} "
                                     f"and the head size give {rows}")
    n_rot = counts["rope.dimension_count"]
    if n_rot is not None and (n_rot % 2 or not 0 < n_rot <= head_k or (arch == "llama" and n_rot != head_k)):
        rule = f"= {head_k}" if arch == "llama" else f"even and in 2..{head_k}"
        raise ModelFileError(f"{a}rope.dimension_count = {n_rot} must be {rule} (the head size)")


def _check_tokenizer(header: GGUFHeader) -> None:
    tokens = _typed(header, "tokenizer.ggml.tokens", (VT.ARRAY,), (VT.STRING,))
    n = len(tokens) if tokens is not None else None
    if n == 0:
        raise ModelFileError("tokenizer.ggml.tokens is empty")
    _typed(header, "tokenizer.ggml.model", (VT.STRING,))
    for key, elem in (("tokenizer.ggml.token_type", (VT.INT32,)),
                      ("tokenizer.ggml.scores", (VT.FLOAT32, VT.INT32))):
        values = _typed(header, key, (VT.ARRAY,), elem)
        if values is not None and n is not None and len(values) != n:
            raise ModelFileError(f"{key} has {len(values)} entries for {n} tokens")
    types = header.get("tokenizer.ggml.token_type")
    if n is not None and types is not None:
        _check_byte_tokens(tokens, types, header.get("tokenizer.ggml.model"))
    known = set(tokens) if tokens is not None else set()
    if n is not None and len(known) != n:
        # llama.cpp asserts one id per token text (an empty token becomes "[EMPTY_<id>]")
        texts = [t or f"[EMPTY_{i}]".encode() for i, t in enumerate(tokens)]
        seen: dict[bytes, int] = {}
        for i, t in enumerate(texts):
            if t in seen:
                raise ModelFileError(f"tokenizer.ggml.tokens has token {t[:40]!r} twice (ids {seen[t]} and {i})")
            seen[t] = i
    if n is not None and header.get("tokenizer.ggml.model") == "llama":
        # SentencePiece falls back to byte tokens for text it has no piece for; llama.cpp
        # throws out of llama_tokenize (and the process aborts) when one is missing.
        missing = next((b for b in range(256) if _BYTE_TOKENS[b] not in known
                        and not (b and bytes([b]) in known)), None)
        if missing is not None:
            raise ModelFileError(f"tokenizer.ggml.tokens has no byte token <0x{missing:02X}> "
                                 f"(a SentencePiece vocabulary needs all 256)")
    for key in _TOKEN_IDS:
        tid = _typed(header, key, (VT.UINT32,))
        if tid is not None and n is not None and tid >= n:
            raise ModelFileError(f"{key} = {tid} is outside the vocabulary of {n} tokens")
    for name in ("bos", "eos"):
        add = _typed(header, f"tokenizer.ggml.add_{name}_token", (VT.BOOL,))
        if add and f"tokenizer.ggml.{name}_token_id" not in header.types and n is not None:
            raise ModelFileError(f"tokenizer.ggml.add_{name}_token is set but tokenizer.ggml.{name}_token_id is missing")



def _check_byte_tokens(tokens: list[bytes], types: np.ndarray, model: Any) -> None:
    """llama.cpp decodes a byte token (type 6) by parsing its text as <0xXX>; a WordPiece
    ('bert') vocabulary has no byte tokens and aborts on one."""
    for i in np.flatnonzero(types == TOKEN_TYPE_BYTE).tolist():
        if model == "bert":
            raise ModelFileError(f"tokenizer.ggml.token_type marks token {i} as a byte token, which a "
                                 f"WordPiece ('bert') vocabulary cannot have")
        if not _BYTE_TOKEN.fullmatch(tokens[i]):
            raise ModelFileError(f"tokenizer.ggml.token_type marks token {i} {tokens[i][:40]!r} as a byte "
                                 f"token, but it is not spelled <0xXX>")


# --- value files ----------------------------------------------------------------------------

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
    source: str | None = None        # ivl-train | foreign (format 1.1; None in 1.0 files)
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
        raise ModelFileError(f"{p} has ivl.* metadata but no {Keys.FORMAT_VERSION} string; convert it again")
    try:
        major, _ = parse_version(version)
    except ValueError:
        raise ModelFileError(f"{p} has an unreadable {Keys.FORMAT_VERSION} {version!r}") from None
    if major > FORMAT_MAJOR:
        raise FormatVersionError(f"{p.name} uses ivl format {version}, this ivl-local reads format "
                                 f"{FORMAT_MAJOR}.x; upgrade ivl-local")
    connection = _opt_str(p, ivl, Keys.CONNECTION) or "residual"
    if connection != "residual":
        raise ModelFileError(f"{p.name} uses connection scheme {connection!r}; only 'residual' is supported")
    try:
        alpha = check_alpha(ivl.get(Keys.DEFAULT_ALPHA, 1.0), Keys.DEFAULT_ALPHA)
    except ConfigError as e:
        raise ModelFileError(f"{p}: {e}") from None
    vocab_size = ivl.get(Keys.BASE_VOCAB_SIZE)
    if vocab_size is not None and (type(vocab_size) is not int or not 0 < vocab_size < 2**31):
        raise ModelFileError(f"{p}: {Keys.BASE_VOCAB_SIZE} must be a positive integer, got {vocab_size!r}")
    recipe = {k[len("ivl.recipe."):]: _plain(v) for k, v in ivl.items() if k.startswith("ivl.recipe.")}
    return ValueFileInfo(
        p, arch, name, is_raw=False, format_version=version, connection=connection,
        default_alpha=alpha, training_base_name=_opt_str(p, ivl, Keys.BASE_NAME),
        training_base_fingerprint=_opt_str(p, ivl, Keys.BASE_VOCAB_FINGERPRINT),
        training_base_vocab_size=None if vocab_size is None else int(vocab_size),
        init=_opt_str(p, ivl, Keys.INIT), source=_opt_str(p, ivl, Keys.SOURCE),
        created=_opt_str(p, ivl, Keys.CREATED),
        tool=_opt_str(p, ivl, Keys.TOOL), recipe=recipe)


def read_value_info(path: str | os.PathLike) -> ValueFileInfo:
    return value_info_from_header(read_gguf_header(path))


def _opt_str(p: Path, ivl: dict, key: str) -> str | None:
    v = ivl.get(key)
    if v is not None and not isinstance(v, str):
        raise ModelFileError(f"{p}: {key} must be a string, got {_plain(v)!r:.60}")
    return v


def _plain(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v
