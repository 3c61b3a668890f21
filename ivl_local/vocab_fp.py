"""Vocabulary fingerprints: a short, stable hash of a tokenizer's token list.

Computed on the token strings exactly as a GGUF stores them (`tokenizer.ggml.tokens`) and
their types, so the training side (which writes the value file's tokenizer) and the runtime
(which reads the base GGUF) agree without sharing a tokenizer library.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def vocab_fingerprint(tokens: Iterable[bytes | str], token_types: Sequence[int] | None = None) -> str:
    """sha256 over (length-prefixed token bytes, type) pairs; first 16 hex digits."""
    h = hashlib.sha256()
    types = list(token_types) if token_types is not None else None
    n = 0
    for i, tok in enumerate(tokens):
        data = tok.encode("utf-8") if isinstance(tok, str) else bytes(tok)
        h.update(len(data).to_bytes(4, "little"))
        h.update(data)
        h.update((types[i] if types is not None else 1).to_bytes(1, "little", signed=True))
        n += 1
    h.update(n.to_bytes(8, "little"))
    return h.hexdigest()[:16]
