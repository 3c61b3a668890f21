"""UTF-8-safe incremental detokenization: token ids in, complete text out.

A token's piece may end in the middle of a multi-byte UTF-8 character (byte-fallback
tokens `<0xE2>` `<0x9C>` `<0x93>`, or byte-level BPE pieces). Text is only emitted once
its characters are complete; bytes that can never form a character become U+FFFD, so the
stream never stalls.

    detok = Detokenizer(vocab.piece, bos=vocab.bos)
    for token in tokens:
        print(detok.push(token), end="")
    print(detok.flush())

The concatenated output equals llama-cpp-python's `Llama.detokenize(tokens).decode()`
(including its rule: a sequence that starts with BOS loses one leading space).
"""

from __future__ import annotations

import codecs
import copy
from typing import Callable


class Detokenizer:
    def __init__(self, piece: Callable[[int], bytes], bos: int | None = None):
        self._piece = piece
        self._bos = bos
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True        # no token seen yet
        self._strip_space = False  # sequence started with BOS and no byte emitted yet
        self.n_bytes = 0          # bytes pushed so far (after the BOS-space rule)

    def push(self, token: int) -> str:
        """Text completed by this token (may be "" while a character is incomplete)."""
        if self._first:
            self._first = False
            self._strip_space = token == self._bos
        return self.push_bytes(self._piece(token))

    def push_bytes(self, data: bytes) -> str:
        if self._strip_space and data:
            self._strip_space = False
            if data[:1] == b" ":
                data = data[1:]
        self.n_bytes += len(data)
        return self._decoder.decode(data)

    def fork(self) -> "Detokenizer":
        """An independent copy in this state: what further tokens would release, without
        advancing this one (speculative drafts)."""
        other = copy.copy(self)
        other._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        other._decoder.setstate(self._decoder.getstate())
        return other

    @property
    def pending(self) -> bool:
        """True while bytes of an incomplete character are held back."""
        return bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        """Whatever is held back, incomplete characters as U+FFFD; the detokenizer resets."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
