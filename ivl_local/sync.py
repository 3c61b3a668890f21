"""Keeping a model's KV cache equal to a token list, and the value model's context equal to
the value tokenization of the text so far (cross-vocabulary).

`KVSequence` is the bookkeeping of one llama context: the tokens its cache holds, in order.
`sync_to(tokens)` reuses the longest common prefix (multi-turn chat re-decodes only the new
turn) and rolls the rest back with `llama_memory_seq_rm`.

`TextSync` drives the value model when its vocabulary differs from the base's. The value
model reads the same *text*: after each base token the new text is appended, only an
unstable tail is re-tokenized (the last few value tokens' text plus the new text), and the
cache is rolled back to the first value token that changed:

    text so far  "The answer is 4"      value tokens  [The][ answer][ is][ 4]
    base token   "2"                    re-tokenize   " 42" from the tail [ is][ 4] + "2"
                                        -> [ is][ 42]: roll back 1 position, decode [ 42]

Invariant (tested on real models): `tokens == tokenize(text)` after every call. When the
first token of the window changes, the window doubles (the change may reach further back),
up to a full re-tokenization.

Both are *followers*: a model context that follows the base's text, with one interface the
engine drives without knowing which kind it holds:

    follower.repair()                    # after an interruption: trim unrecorded positions
    follower.start(prompt_tokens, text)  # prefill (reusing the cached prefix)
    follower.feed(token, released_text)  # the base sampled `token`, releasing this text
    follower.reset()                     # forget the cache
"""

from __future__ import annotations

from typing import Callable

from .backend import Context, Vocab
from .errors import ContextOverflowError


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KVSequence:
    """The tokens held by one context's KV cache, kept in step with the C state.

    `checkpoint` runs between the chunks of a long decode and may raise to stop it (the
    engine's close() from another thread stops a prefill there, not after all of it)."""

    def __init__(self, ctx: Context, checkpoint: Callable[[], None] | None = None):
        self.ctx = ctx
        self.checkpoint = checkpoint
        self.tokens: list[int] = []
        self.logits_valid = False  # logits of the last decode belong to tokens[-1]
        self.decoded = 0           # tokens decoded by the last sync_to/append (stats)

    def __len__(self) -> int:
        return len(self.tokens)

    def repair(self) -> None:
        """After an interruption: drop cache entries beyond `tokens` (a decode that finished
        in C while Python was unwinding leaves some)."""
        if self.ctx.pos_max() >= len(self.tokens) and not self.ctx.truncate(len(self.tokens)):
            self.reset()

    def reset(self) -> None:
        self.ctx.clear()
        self.tokens.clear()
        self.logits_valid = False

    def _truncate(self, n_keep: int) -> None:
        if n_keep < len(self.tokens):
            if self.ctx.truncate(n_keep):
                del self.tokens[n_keep:]
            else:  # the cache cannot drop a partial range: start over
                self.reset()
            self.logits_valid = False

    def sync_to(self, tokens: list[int]) -> int:
        """Make the cache hold exactly `tokens`, with logits for the last; returns the index
        from which tokens were (re)decoded."""
        assert tokens, "nothing to decode"
        if len(tokens) > self.ctx.n_ctx:
            raise ContextOverflowError(f"{len(tokens)} tokens do not fit in the context window "
                                       f"of {self.ctx.n_ctx}")
        keep = common_prefix(self.tokens, tokens)
        if keep == len(tokens) == len(self.tokens) and self.logits_valid:
            self.decoded = 0
            return keep
        keep = min(keep, len(tokens) - 1)  # re-decode at least the last token for its logits
        self._truncate(keep)
        keep = len(self.tokens)            # 0 if the truncation had to reset
        self.append(tokens[keep:])
        return keep

    def append(self, tokens: list[int]) -> None:
        """Decode tokens after the current ones (chunked: `tokens` grows chunk by chunk, so an
        interruption leaves the bookkeeping a prefix of the cache; `repair` trims the rest)."""
        self.decoded = len(tokens)
        step = self.ctx.n_batch
        for lo in range(0, len(tokens), step):
            if lo and self.checkpoint is not None:
                self.checkpoint()
            chunk = tokens[lo:lo + step]
            self.logits_valid = False
            self.ctx.decode(chunk, len(self.tokens), logits_last=lo + step >= len(tokens))
            self.tokens.extend(chunk)
        self.logits_valid = bool(tokens) or self.logits_valid

    # --- follower interface: the same vocabulary as the base reads the base's tokens ---------

    def start(self, prompt_tokens: list[int], text: bytes) -> int:
        return self.sync_to(prompt_tokens)

    def feed(self, token: int, text: bytes) -> None:
        self.append([token])


class TextSync:
    """The value model's context, fed the base model's text (cross-vocabulary)."""

    def __init__(self, vocab: Vocab, ctx: Context, window: int = 4,
                 checkpoint: Callable[[], None] | None = None):
        self.vocab = vocab
        self.seq = KVSequence(ctx, checkpoint)
        self.window = window
        self.text = b""
        self._ends: list[int] = []  # byte offset in `text` where each token's text ends
        self.full_retokenizations = 0

    @property
    def tokens(self) -> list[int]:
        return self.seq.tokens

    # --- follower interface: another vocabulary reads the base's text ------------------------

    def repair(self) -> None:
        self.seq.repair()

    def reset(self) -> None:
        self.seq.reset()

    def start(self, prompt_tokens: list[int], text: bytes) -> int:
        return self.reset_to(text)

    def feed(self, token: int, text: bytes) -> None:
        self.append(text)

    def tokenize(self, text: bytes) -> list[int]:
        """The reference tokenization the invariant is stated against."""
        return self.vocab.tokenize(text, add_special=True, parse_special=True)

    def _lengths(self, tokens: list[int], at_start: bool) -> list[int]:
        lengths = [len(self.vocab.piece(t, special=True)) for t in tokens]
        if at_start and tokens and self.vocab.add_bos and tokens[0] == self.vocab.bos:
            lengths[0] = 0  # added by the tokenizer, not in the text
        return lengths

    def reset_to(self, text: bytes) -> int:
        """Point the context at `text` (a new prompt), reusing the common token prefix."""
        self.text = bytes(text)
        return self._apply(self.tokenize(self.text))

    def append(self, delta: bytes) -> int:
        """Extend the text; returns how many value tokens were decoded."""
        if not delta:
            self.seq.decoded = 0
            return 0
        old_len = len(self.text)
        self.text += delta
        if not self._offsets_exact_before(old_len):
            return self._full()
        n = len(self.tokens)
        first_fixed = 1 if (n and self.vocab.add_bos and self.tokens[0] == self.vocab.bos) else 0
        k = self.window
        while True:
            start = max(first_fixed, n - k)
            if start <= first_fixed:
                return self._full()
            offset = self._ends[start - 1]
            tail = self.vocab.tokenize(self.text[offset:], add_special=False, parse_special=True)
            changed = common_prefix(self.tokens[start:], tail)
            if changed > 0:
                new_tokens = self.tokens[:start] + tail
                return self._apply(new_tokens)
            k *= 2  # the window's first token changed: the change may reach further back

    def _offsets_exact_before(self, old_len: int) -> bool:
        return bool(self._ends) and self._ends[-1] == old_len

    def _full(self) -> int:
        self.full_retokenizations += 1
        return self._apply(self.tokenize(self.text))

    def _apply(self, new_tokens: list[int]) -> int:
        old_ends = self._ends
        start = self.seq.sync_to(new_tokens)
        # Offsets of the kept prefix are unchanged; recompute the rest from pieces (all of
        # them if an interruption left the offsets shorter than the tokens).
        start = start if start <= len(old_ends) else 0
        base = old_ends[start - 1] if start else 0
        ends = old_ends[:start]
        for length in self._lengths(new_tokens[start:], at_start=start == 0):
            base += length
            ends.append(base)
        self._ends = ends
        return self.seq.decoded


class FixedPrompt(KVSequence):
    """A context that reads its own fixed prompt, then the base's answer tokens (the
    unconditional side of classifier-free guidance: a negative prompt, or nothing)."""

    def __init__(self, ctx: Context, prompt_tokens: list[int], checkpoint: Callable[[], None] | None = None):
        super().__init__(ctx, checkpoint)
        self.prompt_tokens = list(prompt_tokens)

    def start(self, prompt_tokens: list[int], text: bytes) -> int:
        return self.sync_to(self.prompt_tokens)
