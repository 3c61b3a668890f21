"""Writing GGUF files for tests, including hostile ones the `gguf` writer would refuse.

    tiny_llama(path)                               # a ~10 KB llama model llama.cpp loads and runs
    rewrite(src, dst, set={"llama.block_count": (0, VT.UINT32)}, drop=["llama.vocab_size"])
    write_raw(dst, kvs, tensors, data, version=4)  # any bytes a header may hold

A key/value is (key, value type, value, element type); a tensor is (name, shape, ggml type,
offset). Keys and names may be bytes (to write invalid UTF-8).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType as VT

from ivl_local.valuefile import read_gguf_header

_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I",
        VT.INT32: "<i", VT.FLOAT32: "<f", VT.BOOL: "<?", VT.UINT64: "<Q", VT.INT64: "<q",
        VT.FLOAT64: "<d"}

# A tiny SentencePiece vocabulary: specials, the 256 byte-fallback tokens, a few pieces.
TINY_TOKENS = (["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
               + ["\u2581" + w for w in ("a", "hi", "the", "is", "it", "User", "Assistant", ":")]
               + ["\u2581", ".", "e", "t", "h", "i"])
TINY_TYPES = [2, 3, 3] + [6] * 256 + [1] * 14
TINY = dict(n_embd=8, n_head=2, n_head_kv=1, n_ff=16, n_layer=2, n_ctx=64)


def tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """A complete, loadable llama GGUF (2 blocks, 8 wide, 273 tokens, f16 embeddings): the smallest real model."""
    import gguf

    rng = np.random.default_rng(seed)
    h = TINY
    n_vocab, head = len(TINY_TOKENS), h["n_embd"] // h["n_head"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(h["n_ctx"])
    w.add_embedding_length(h["n_embd"])
    w.add_block_count(h["n_layer"])
    w.add_feed_forward_length(h["n_ff"])
    w.add_head_count(h["n_head"])
    w.add_head_count_kv(h["n_head_kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head)
    w.add_tokenizer_model("llama")
    w.add_token_list(TINY_TOKENS)
    w.add_token_scores([-float(i) for i in range(n_vocab)])
    w.add_token_types(TINY_TYPES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def tensor(name, *shape):   # numpy order (rows, cols); GGUF stores it reversed
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    e, kv = h["n_embd"], head * h["n_head_kv"]
    w.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, e)) * 0.2).astype(np.float16))
    for i in range(h["n_layer"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(e, np.float32))
        tensor(f"blk.{i}.attn_q.weight", e, e)
        tensor(f"blk.{i}.attn_k.weight", kv, e)
        tensor(f"blk.{i}.attn_v.weight", kv, e)
        tensor(f"blk.{i}.attn_output.weight", e, e)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(e, np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", h["n_ff"], e)
        tensor(f"blk.{i}.ffn_up.weight", h["n_ff"], e)
        tensor(f"blk.{i}.ffn_down.weight", e, h["n_ff"])
    w.add_tensor("output_norm.weight", np.ones(e, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def rewrite(src: str | Path, dst: str | Path, set: dict | None = None, drop=(), extra=(),
            tensors=None, **raw) -> Path:
    """`src` with keys replaced or added (`set`: key -> (value, type[, element type])), keys
    dropped, raw (key, type, value, element type) entries appended (`extra`: duplicates, byte
    keys), the tensor list passed through `tensors(list) -> list`; `raw` goes to write_raw
    (version, n_kv, n_tensors). Tensor data is copied as is."""
    header = read_gguf_header(src, check=False)
    kvs = []
    for key, value in header.metadata.items():
        vtype, elem = header.value_type(key)
        if key not in drop:
            kvs.append((key, vtype, value, elem))
    for key, spec in (set or {}).items():
        value, vtype, *elem = spec
        entry = (key, vtype, value, elem[0] if elem else None)
        index = next((i for i, kv in enumerate(kvs) if kv[0] == key), None)
        if index is None:
            kvs.append(entry)
        else:
            kvs[index] = entry
    kvs += list(extra)
    infos = [(t.name, t.shape, t.ggml_type, t.offset) for t in header.tensors]
    if tensors is not None:
        infos = tensors(infos)
    with open(src, "rb") as f:
        f.seek(header.data_offset)
        write_raw(dst, kvs, infos, f, **raw)
    return Path(dst)


def write_raw(dst: str | Path, kvs, tensors, data, *, version: int = 3, alignment: int = 32,
              n_kv: int | None = None, n_tensors: int | None = None) -> Path:
    """A GGUF with exactly these parts; `data` is bytes or a file object positioned at the data."""
    out = bytearray(b"GGUF")
    out += struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                       len(kvs) if n_kv is None else n_kv)
    for key, vtype, value, elem in kvs:
        packed = value if isinstance(value, Raw) else pack_value(value, vtype, elem)
        out += pack_string(key) + struct.pack("<I", vtype) + packed
    for name, shape, ggml_type, offset in tensors:
        out += pack_string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<IQ", ggml_type, offset)
    out += b"\0" * (-len(out) % alignment)
    with open(dst, "wb") as f:
        f.write(out)
        if isinstance(data, (bytes, bytearray)):
            f.write(data)
        else:
            shutil.copyfileobj(data, f)
    return Path(dst)


class Raw(bytes):
    """A value given as its encoded bytes (written after the value type as is)."""


def pack_string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return struct.pack("<Q", len(raw)) + raw


def pack_value(value, vtype, elem=None) -> bytes:
    vtype = VT(vtype)
    if vtype == VT.STRING:
        return pack_string(value)
    if vtype != VT.ARRAY:
        return struct.pack(_FMT[vtype], value)
    elem = VT(elem)
    items = list(value)
    head = struct.pack("<IQ", elem, len(items))
    if elem == VT.ARRAY:   # each item: (element type, items)
        return head + b"".join(pack_value(sub, VT.ARRAY, sub_elem) for sub_elem, sub in items)
    return head + b"".join(pack_value(item, elem) for item in items)


def nested_array(depth: int) -> Raw:
    """An ARRAY value nesting `depth` arrays, the innermost an empty uint8 array."""
    head = struct.pack("<IQ", VT.ARRAY, 1) * (depth - 1)
    return Raw(head + struct.pack("<IQ", VT.UINT8, 0))


def write_fuzz_seeds(folder: str | Path) -> list[Path]:
    """The fuzz corpus (tests/data/fuzz_seed_*.gguf, each < 20 KB): the tiny llama; the same
    as a value file (`ivl.*` keys); a metadata-rich GGUF v2 (every value type, arrays of
    arrays, alignment 64, f16 and q8_0 tensors)."""
    import gguf

    from ivl_local.gguf_keys import FORMAT_MAJOR, Keys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    llama = tiny_llama(folder / "fuzz_seed_llama.gguf")
    value = rewrite(llama, folder / "fuzz_seed_value.gguf", set={
        Keys.FORMAT_VERSION: (f"{FORMAT_MAJOR}.0", VT.STRING), Keys.CONNECTION: ("residual", VT.STRING),
        Keys.DEFAULT_ALPHA: (0.75, VT.FLOAT32), Keys.BASE_NAME: ("tiny", VT.STRING),
        Keys.BASE_VOCAB_FINGERPRINT: ("0123456789abcdef", VT.STRING),
        Keys.BASE_VOCAB_SIZE: (len(TINY_TOKENS), VT.UINT32), Keys.STEPS: (3, VT.UINT32)})
    meta_v3 = folder / "meta-v3.tmp"
    w = gguf.GGUFWriter(str(meta_v3), "llama")
    w.add_custom_alignment(64)
    for i, (vtype, value_) in enumerate([(VT.UINT8, 200), (VT.INT8, -5), (VT.UINT16, 60_000), (VT.INT16, -300),
                                         (VT.UINT32, 7), (VT.INT32, -7), (VT.FLOAT32, 0.5), (VT.BOOL, True),
                                         (VT.UINT64, 2**40), (VT.INT64, -2**40), (VT.FLOAT64, 1e-300)]):
        w.add_key_value(f"fuzz.scalar{i}", value_, vtype)
    w.add_string("fuzz.text", "héllo")
    w.add_array("fuzz.strings", ["a", "bc", ""])
    w.add_key_value("fuzz.bools", [True, False, True], VT.ARRAY, VT.BOOL)
    w.add_key_value("fuzz.floats", [0.25, -1.5], VT.ARRAY, VT.FLOAT64)
    w.add_token_list(["x", "y", "z"])
    w.add_tensor("half", np.arange(32, dtype=np.float16))
    w.add_tensor("quant", np.ones((2, 34), np.uint8),   # 2 rows of one q8_0 block (32 values)
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    nested = Raw(struct.pack("<IQ", VT.ARRAY, 2) + pack_value([1, 2], VT.ARRAY, VT.INT32)
                 + pack_value([], VT.ARRAY, VT.UINT8))
    meta = rewrite(meta_v3, folder / "fuzz_seed_meta.gguf", set={"fuzz.nested": (nested, VT.ARRAY)},
                   version=2, alignment=64)
    meta_v3.unlink()
    return [llama, value, meta]
