"""The training base as a GGUF file: metadata, vocabulary fingerprint and its own tokenizer.

No torch here. The tokenizer is llama.cpp's (the GGUF loaded vocab-only), i.e. exactly the
tokenizer the runtime uses, so training and inference agree token for token.

    base = BaseGGUF.open("smollm2-135m")
    base.arch, base.fingerprint, base.tokenize("Hello", add_bos=True)
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from ..errors import ModelFileError
from ..models import resolve_model
from ..valuefile import read_gguf_header
from ..vocab_fp import vocab_fingerprint


class BaseGGUF:
    def __init__(self, name: str, path: Path):
        self.name = name                 # as the user gave it (known name or file)
        self.path = Path(path)
        header = read_gguf_header(self.path)
        self.arch: str = header.get("general.architecture", "?")
        tokens = header.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelFileError(f"{self.path}: GGUF has no tokenizer (tokenizer.ggml.tokens)")
        eos_id = header.get("tokenizer.ggml.eos_token_id")
        if eos_id is None:
            raise ModelFileError(f"{self.path}: GGUF has no tokenizer.ggml.eos_token_id")
        # Raw bytes, as stored (the fingerprint is defined on them, not on decoded text).
        self.tokens: list[bytes] = tokens
        types = header.get("tokenizer.ggml.token_type")
        self.token_types: list[int] = [1] * len(tokens) if types is None else types.tolist()
        self.bos_id: int | None = header.get("tokenizer.ggml.bos_token_id")
        self.eos_id: int = eos_id
        self.chat_template: str | None = header.get("tokenizer.chat_template")
        self.hidden_size: int | None = header.get(f"{self.arch}.embedding_length")
        self.fingerprint = vocab_fingerprint(self.tokens, self.token_types)

    @classmethod
    def open(cls, name_or_path: str) -> "BaseGGUF":
        path = resolve_model(name_or_path)
        return cls(str(name_or_path), path)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def eos_text(self) -> str:
        """EOS as text, so templates can write it; tokenize() parses it back to the id."""
        return self.tokens[self.eos_id].decode("utf-8", errors="replace")

    @cached_property
    def _vocab(self):
        """llama.cpp's tokenizer of the file (a vocabulary-only load: no weights, no context)."""
        from ..backend import Model

        return Model(self.path, vocab_only=True).vocab

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        """llama.cpp tokenization; special-token text (e.g. '<eos>') becomes its id."""
        if not text and not add_bos:
            return []
        return list(self._vocab.tokenize(text, add_special=add_bos, parse_special=True))
