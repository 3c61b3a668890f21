"""Vocabularies and token maps: which value token speaks for each base token.

    base = read_vocab(base_header)        # tokens as stored, types, kind, fingerprint
    value = read_vocab(value_header)
    mapping = resolve_mapping(base, value, value_tokenize)   # identity, cached or built
    mapping.token_map   # int32[n_base]: value token id per base token, -1 = none (None: identity)
    mapping.token_weights  # float32[n_base] in [0, 1]

The exact-text builder runs in C++ (`_core.build_token_map`): a base token maps to the value
token with the same normalised text ('▁'/'Ġ' spaces, '<0xNN>' bytes), a control token to the
value's control token of identical text (ChatML's <|im_end|> in SmolLM2 and Qwen). Normal base
tokens with no exact match get the first token of the value tokenizer's encoding of their text.
The base's end tokens (eos/eot/eom) that no text matched map to the value's turn end by role
(`map_end_tokens`): that is how "the answer is done" crosses vocabularies. Built maps are
cached under cache_dir()/token-maps, keyed by both vocabulary fingerprints.
A map file is an `.npz` with token_map, token_weights, base_fingerprint, value_fingerprint
and builder (and optionally n_exact); loading one for other vocabularies raises
VocabMismatchError.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import TokenType

from .config import ALPHA_MAX
from .errors import VocabMismatchError
from .valuefile import GGUFHeader
from .vocab_fp import vocab_fingerprint

log = logging.getLogger(__name__)

# tokenizer.ggml.model -> the normalisation the map builder applies
KINDS = {"llama": "spm", "gpt2": "bpe"}
TYPE_NORMAL, TYPE_BYTE = TokenType.NORMAL, TokenType.BYTE
# /2: control tokens of identical text match; /3: end tokens by role. Older cached maps are rebuilt.
EXACT_BUILDER = "exact-text/3"
END_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eom_token_id")


@dataclass(frozen=True)
class VocabData:
    tokens: list[bytes]       # raw stored text, '▁'/'Ġ' markers kept
    types: np.ndarray         # int32[n], GGUF token types (1 normal, 3 control, 6 byte, ...)
    tokenizer_model: str      # tokenizer.ggml.model: "llama", "gpt2", ...
    fingerprint: str
    end_ids: tuple[int, ...] = ()   # tokenizer.ggml.{eot,eos,eom}_token_id present, eot first

    @property
    def turn_end(self) -> int | None:
        """The token that ends a turn: end-of-turn if the file names one, else end-of-sequence."""
        return self.end_ids[0] if self.end_ids else None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def kind(self) -> str:
        """"spm" or "bpe" for the map builder; VocabMismatchError for other tokenizers."""
        try:
            return KINDS[self.tokenizer_model]
        except KeyError:
            raise VocabMismatchError(f"no token map builder for the '{self.tokenizer_model}' "
                                     f"tokenizer (supported: SentencePiece and byte-level BPE)") from None


def read_vocab(header: GGUFHeader) -> VocabData:
    """The vocabulary as the GGUF stores it (what vocab fingerprints are computed on)."""
    tokens = header.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise VocabMismatchError(f"{header.path.name} has no tokenizer.ggml.tokens")
    types = header.get("tokenizer.ggml.token_type")
    types = (np.ones(len(tokens), np.int32) if types is None
             else np.ascontiguousarray(types, dtype=np.int32))
    if len(types) != len(tokens):
        raise VocabMismatchError(f"{header.path.name}: {len(tokens)} tokens but {len(types)} token types")
    fp = vocab_fingerprint(tokens, types.tolist())
    ends = []
    for key in END_KEYS:
        tid = header.get(key)
        if isinstance(tid, int) and 0 <= tid < len(tokens) and tid not in ends:
            ends.append(tid)
    return VocabData(tokens, types, str(header.get("tokenizer.ggml.model", "?")), fp, tuple(ends))


@dataclass(frozen=True)
class TokenMapping:
    token_map: np.ndarray | None      # int32[n_base]; None = identity (same vocabulary)
    token_weights: np.ndarray | None  # float32[n_base]; None = all 1
    base_fingerprint: str
    value_fingerprint: str
    builder: str
    n_exact: int | None = None        # entries from exact text matches (known when built here)
    alpha: float | None = None        # a base's alpha for value nets of this vocabulary (stored) ...
    alpha_base: str | None = None     # ... and which base file it is for (base_identity; None: any)
    provenance: dict = field(default_factory=dict)   # an aligned map's PROVENANCE members, as read

    @property
    def identity(self) -> bool:
        return self.token_map is None

    def coverage(self, base: VocabData | None = None) -> float:
        """Share of (normal, when `base` is given) base tokens that map to a value token."""
        if self.token_map is None:
            return 1.0
        mapped = self.token_map >= 0
        if base is not None:
            normal = np.isin(base.types, (TYPE_NORMAL, TYPE_BYTE))
            return float(mapped[normal].mean()) if normal.any() else 0.0
        return float(mapped.mean())


def identity_mapping(fingerprint: str) -> TokenMapping:
    return TokenMapping(None, None, fingerprint, fingerprint, "identity")


def save_map(path: str | os.PathLike, mapping: TokenMapping, extra: dict | None = None) -> None:
    """Write a map file atomically; `extra` adds arrays (an aligned map's corpus digest)."""
    from .atomic import atomic_temp

    assert mapping.token_map is not None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = dict(token_map=mapping.token_map, token_weights=mapping.token_weights,
                  base_fingerprint=np.str_(mapping.base_fingerprint),
                  value_fingerprint=np.str_(mapping.value_fingerprint),
                  builder=np.str_(mapping.builder), **mapping.provenance, **(extra or {}))
    if mapping.n_exact is not None:
        arrays["n_exact"] = np.int64(mapping.n_exact)
    if mapping.alpha is not None:
        arrays["alpha"] = np.float64(mapping.alpha)
        if mapping.alpha_base is not None:
            arrays["alpha_base"] = np.str_(mapping.alpha_base)
    with atomic_temp(path) as tmp, open(tmp, "wb") as f:   # a file object: no '.npz' appended
        np.savez(f, **arrays)


# What a map file may hold: member -> (dtype kinds accepted, shape; "n" = the base's size).
# Everything is checked from the member's .npy header before a byte of data is read, so a
# hostile file cannot make us allocate what its header declares.
MAP_MEMBERS = {
    "base_fingerprint": ("U", ()),
    "value_fingerprint": ("U", ()),
    "builder": ("U", ()),
    "n_exact": ("iu", ()),
    "alpha": ("f", ()),
    "alpha_base": ("U", ()),
    # an aligned map's provenance (align.build_aligned_map), kept when an alpha is stored
    "corpus_sha256": ("U", ()),
    "corpus_bytes": ("iu", ()),
    "aligned_pairs": ("iu", ()),
    "token_map": ("iu", ("n",)),
    "token_weights": ("f", ("n",)),
}
PROVENANCE = ("corpus_sha256", "corpus_bytes", "aligned_pairs")
MAP_REQUIRED = ("token_map", "token_weights", "base_fingerprint", "value_fingerprint")
MAX_MAP_STRING = 1024    # characters of a fingerprint or builder name (they are ~20)


def _read_member(zf, member: str, name: str, kinds: str, shape: tuple) -> np.ndarray:
    """One .npy member of the zip, after its header passed the checks."""
    fmt = np.lib.format
    with zf.open(member) as f:
        version = fmt.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"'{name}' has .npy format version {version}")
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        try:
            found_shape, fortran, dtype = read_header(f)
        except (ValueError, EOFError):
            raise
        except Exception as e:   # numpy parses header text with tokenize/ast: TokenError, ...
            raise ValueError(f"'{name}' has an unreadable .npy header ({type(e).__name__})") from None
        if dtype.kind not in kinds or dtype.hasobject or dtype.fields is not None:
            raise ValueError(f"'{name}' has dtype {dtype}, expected "
                             + {"iu": "integers", "f": "floats", "U": "text"}[kinds])
        if found_shape != shape:
            expected = "a scalar" if shape == () else f"a 1-D array of {shape[0]} entries"
            raise ValueError(f"'{name}' has shape {found_shape}, expected {expected}")
        if dtype.kind == "U" and dtype.itemsize > 4 * MAX_MAP_STRING:
            raise ValueError(f"'{name}' is longer than {MAX_MAP_STRING} characters")
        n_bytes = dtype.itemsize * (shape[0] if shape else 1)
        data = f.read(n_bytes)
        if len(data) != n_bytes:
            raise ValueError(f"'{name}' is truncated")
        return np.frombuffer(data, dtype=dtype).reshape(shape)


def _read_map_file(path: Path, base: VocabData, value: VocabData) -> dict[str, np.ndarray]:
    """The members of a map file, checked from their headers; the fingerprints are compared
    before the arrays are read (VocabMismatchError names both pairs)."""
    import zipfile

    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise ValueError("it is a single .npy array; a map is an .npz with token_map, "
                         "token_weights and the two vocabulary fingerprints")
    if not magic.startswith(b"PK"):
        raise ValueError("empty file" if not magic else "not an .npz (zip) file")
    with zipfile.ZipFile(path) as zf:
        members = {name[:-4]: name for name in zf.namelist() if name.endswith(".npy")}
        missing = [name for name in MAP_REQUIRED if name not in members]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        arrays = {}
        for name, (kinds, shape) in MAP_MEMBERS.items():   # scalars first, then the arrays
            if name not in members:
                continue
            if name == "token_map":
                found = str(arrays["base_fingerprint"]), str(arrays["value_fingerprint"])
                if found != (base.fingerprint, value.fingerprint):
                    raise VocabMismatchError(
                        f"token map {path.name} is for vocabularies {found[0]} -> {found[1]}, these "
                        f"models have {base.fingerprint} -> {value.fingerprint}; rebuild it (or omit "
                        "token_map)")
            shape = tuple(len(base) if n == "n" else n for n in shape)
            arrays[name] = _read_member(zf, members[name], name, kinds, shape)
    return arrays


def load_map(path: str | os.PathLike, base: VocabData, value: VocabData) -> TokenMapping:
    """Read a `.npz` map and check it is for these two vocabularies: VocabMismatchError for
    anything else (a missing, empty, truncated or foreign file, a wrong dtype or shape)."""
    import zipfile
    import zlib

    path = Path(path)
    try:
        z = _read_map_file(path, base, value)
    except FileNotFoundError:
        raise VocabMismatchError(f"no such token map file: {path}") from None
    except (ValueError, KeyError, EOFError, OSError, RecursionError, zipfile.BadZipFile, zlib.error,
            NotImplementedError) as e:   # NotImplementedError: a zip compression we lack
        raise VocabMismatchError(f"{path} is not a token map file ({e})") from None
    base_fp, value_fp = str(z["base_fingerprint"]), str(z["value_fingerprint"])
    raw_map, raw_weights = z["token_map"], z["token_weights"]
    # Checked in the file's own dtypes, so no value changes when cast (int64 2^32 + 5 is not 5).
    if raw_map.size and (raw_map.min() < -1 or raw_map.max() >= len(value)):
        raise VocabMismatchError(f"token map {path.name} points outside the value vocabulary "
                                 f"(entries must be -1 or in [0, {len(value)}))")
    if not np.all(np.isfinite(raw_weights)):
        raise VocabMismatchError(f"token map {path.name} has NaN or infinite weights")
    if raw_weights.size and (raw_weights.min() < 0 or raw_weights.max() > 1):
        raise VocabMismatchError(f"token map {path.name} has weights outside [0, 1]")
    weights = np.ascontiguousarray(raw_weights, dtype=np.float32)
    if not np.array_equal(weights, raw_weights):
        raise VocabMismatchError(f"token map {path.name} has weights that float32 cannot hold "
                                 "exactly (store them as float32)")
    token_map = np.ascontiguousarray(raw_map, dtype=np.int32)
    builder = str(z["builder"]) if "builder" in z else "?"
    n_exact = int(z["n_exact"]) if "n_exact" in z else None
    alpha = None
    if "alpha" in z:
        alpha = float(z["alpha"])
        if not (np.isfinite(alpha) and 0.0 <= alpha <= ALPHA_MAX):
            raise VocabMismatchError(f"token map {path.name} stores alpha {alpha}, outside [0, {ALPHA_MAX:g}]")
    alpha_base = str(z["alpha_base"]) if alpha is not None and "alpha_base" in z else None
    provenance = {k: z[k] for k in PROVENANCE if k in z}
    return TokenMapping(token_map, weights, base_fp, value_fp, builder, n_exact, alpha, alpha_base, provenance)


def build_exact_map(base: VocabData, value: VocabData,
                    value_tokenize: Callable[[bytes], list[int]]) -> TokenMapping:
    """Exact-text map (C++), unmatched normal tokens filled via the value tokenizer."""
    from . import _core

    token_map, weights, unmatched = _core.build_token_map(
        base.tokens, base.types, base.kind, value.tokens, value.types, value.kind)
    token_map = np.array(token_map, dtype=np.int32)
    weights = np.array(weights, dtype=np.float32)
    filled = 0
    for i in np.asarray(unmatched).tolist():
        text = _core.normalize_token(base.tokens[i], base.kind)
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a lone byte: nothing the value tokenizer can say about it
        ids = value_tokenize(text) if text else []
        if ids:
            token_map[i], weights[i] = ids[0], 1.0
            filled += 1
    n_exact = int((token_map >= 0).sum()) - filled
    ends = map_end_tokens(base, value, token_map, weights)
    log.info("token map: %d exact, %d via the value tokenizer, %d end tokens by role, %d unmapped",
             n_exact, filled, ends, int((token_map < 0).sum()))
    return TokenMapping(token_map, weights, base.fingerprint, value.fingerprint, EXACT_BUILDER, n_exact)


def map_end_tokens(base: VocabData, value: VocabData, token_map: np.ndarray, weights: np.ndarray) -> int:
    """Map the base's end tokens (eos/eot/eom) that text did not match onto the value's
    turn end, in place; returns how many.

    A value net learns "the answer is done" on its own end-of-turn token. When the base's end
    token has other text (Gemma's <eos> vs SmolLM2's <|im_end|>), a text map leaves it at
    value contribution 0 and the base never hears it: measured on 30 validation items, Gemma +
    SmolLM2 value net ran on ('67-52-31-36-45-') and scored 0.031; with this, it stopped
    ('67-52-31', '100') and scored 0.122."""
    target = value.turn_end
    if target is None:
        return 0
    n = 0
    for i in base.end_ids:
        if token_map[i] < 0:
            token_map[i], weights[i] = target, 1.0
            n += 1
    return n


# Why a base token has the value token it has (`map_rules`), as codes and names.
RULE_NONE, RULE_EXACT, RULE_CONTROL, RULE_FIRST_PIECE, RULE_END_ROLE, RULE_OTHER = range(6)
RULE_NAMES = ("unmapped", "exact", "control-text", "first-piece", "end-by-role", "other")


def exact_counterparts(base: VocabData, value: VocabData) -> np.ndarray:
    """int32[n_base]: the value token of identical normalised text (control tokens: identical
    stored text), -1 where there is none. No fill and no end-token rule: exact matches only."""
    from . import _core

    token_map, _, unmatched = _core.build_token_map(
        base.tokens, base.types, base.kind, value.tokens, value.types, value.kind)
    exact = np.array(token_map, dtype=np.int32)
    exact[np.asarray(unmatched, dtype=np.int64)] = -1
    return exact


def map_rules(base: VocabData, value: VocabData, mapping: TokenMapping) -> np.ndarray:
    """int8[n_base]: which rule gave each base token its value token (RULE_NAMES), judged
    against the exact matches, so it also describes a map file (an aligned map's choices
    that no exact match explains are "other")."""
    n = len(base)
    if mapping.identity:
        return np.full(n, RULE_EXACT, dtype=np.int8)
    token_map = mapping.token_map
    exact = exact_counterparts(base, value)
    rules = np.full(n, RULE_OTHER, dtype=np.int8)
    rules[token_map < 0] = RULE_NONE
    same = (token_map >= 0) & (token_map == exact)
    control = base.types == TokenType.CONTROL
    rules[same & ~control] = RULE_EXACT
    rules[same & control] = RULE_CONTROL
    for i in base.end_ids:
        if token_map[i] >= 0 and not same[i] and token_map[i] == value.turn_end:
            rules[i] = RULE_END_ROLE
    if mapping.builder.startswith("exact-text"):
        # the builder's fill: a normal token without an exact match took its text's first piece
        rules[(rules == RULE_OTHER) & (exact < 0)] = RULE_FIRST_PIECE
    return rules


def cached_map_path(base: VocabData, value: VocabData) -> Path:
    from .models import cache_dir

    return cache_dir() / "token-maps" / f"{base.fingerprint}-{value.fingerprint}.npz"


def resolve_mapping(base: VocabData, value: VocabData, value_tokenize: Callable[[bytes], list[int]],
                    map_path: str | os.PathLike | None = None, use_cache: bool = True) -> TokenMapping:
    """Identity for equal vocabularies; else the given map file, the cached map, or a new one."""
    if map_path is not None:
        return load_map(map_path, base, value)
    if base.fingerprint == value.fingerprint:
        return identity_mapping(base.fingerprint)
    base.kind, value.kind  # raise early for tokenizers the builder does not know
    cached = cached_map_path(base, value)
    old = None
    if use_cache and cached.exists():
        try:
            old = load_map(cached, base, value)
            if old.builder == EXACT_BUILDER:
                return old
        except VocabMismatchError:
            log.warning("ignoring unreadable cached token map %s", cached)
    mapping = build_exact_map(base, value, value_tokenize)
    if old is not None and old.alpha is not None:   # an older builder's map: keep its stored alpha
        import dataclasses

        mapping = dataclasses.replace(mapping, alpha=old.alpha, alpha_base=old.alpha_base)
    if use_cache:
        try:
            save_map(cached, mapping)
        except OSError as e:  # a read-only cache must not stop generation
            log.warning("could not cache the token map at %s: %s", cached, e)
    return mapping


def base_identity(path: str | os.PathLike) -> str:
    """Which base file a stored alpha is for: its name and size (another quantization or
    another model with the same tokenizer is another base)."""
    path = Path(path)
    return f"{path.name[:500]} ({path.stat().st_size} bytes)"


def stored_alpha_for(mapping: TokenMapping, base_path: str | os.PathLike) -> float | None:
    """The map's stored alpha when it is for this base file (or for any base); else None."""
    if mapping.alpha is None:
        return None
    if mapping.alpha_base is not None and mapping.alpha_base != base_identity(base_path):
        log.info("the token map's stored alpha %g is for %s, not this base: not used",
                 mapping.alpha, mapping.alpha_base)
        return None
    return mapping.alpha


def store_map_alpha(path: str | os.PathLike, mapping: TokenMapping, alpha: float | None,
                    base: VocabData, value: VocabData, alpha_base: str | None = None) -> Path:
    """Write `mapping` with a base's alpha (None: none) to `path`; of a map file already there
    (which must be a map of these two vocabularies) only an aligned map's provenance members
    (PROVENANCE) are kept."""
    import dataclasses

    if mapping.identity:
        raise VocabMismatchError("one vocabulary: there is no token map to store an alpha with "
                                 "(give --alpha)")
    path = Path(path)
    provenance = load_map(path, base, value).provenance if path.exists() else {}
    updated = dataclasses.replace(mapping, alpha=None if alpha is None else float(alpha) + 0.0,
                                  alpha_base=None if alpha is None else alpha_base, provenance=provenance)
    try:
        save_map(path, updated)
    except OSError as e:
        raise VocabMismatchError(f"cannot write token map {path}: {e.strerror or e}") from None
    return path
