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

and, for speculative decoding (ivl_local/speculative.py), the verification of a batch of
base tokens (the sampled token, then drafts) whose released texts are `texts`:

    n = follower.plan(texts)             # how many leading positions it can give exact logits for
    follower.verify(tokens[:n], texts[:n])   # one llama_decode, logits at every position
    follower.logits_at(j)                # address of the logits after batch position j
    follower.keep(m)                     # positions 0..m-1 were accepted: roll back the rest

Exact logits means the very logits one `feed` per token would have left: for the same
vocabulary the batch's own outputs; across vocabularies the value tokens of the text up to
position j must be a prefix of the decoded ones (a draft that ends inside a value token, which
the next draft would re-tokenize, ends the verifiable run there).
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
        self._verify_start = 0     # len(tokens) before the last verify()

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

    def append(self, tokens: list[int], logits_all: bool = False) -> None:
        """Decode tokens after the current ones (chunked: `tokens` grows chunk by chunk, so an
        interruption leaves the bookkeeping a prefix of the cache; `repair` trims the rest).
        `logits_all`: one chunk with logits at every token (`ctx.logits_ptr(i)`)."""
        self.decoded = len(tokens)
        step = self.ctx.n_batch
        for lo in range(0, len(tokens), step):
            if lo and self.checkpoint is not None:
                self.checkpoint()
            chunk = tokens[lo:lo + step]
            self.logits_valid = False
            self.ctx.decode(chunk, len(self.tokens), logits_last=lo + step >= len(tokens),
                            logits_all=logits_all)
            self.tokens.extend(chunk)
        self.logits_valid = bool(tokens) or self.logits_valid

    # --- follower interface: the same vocabulary as the base reads the base's tokens ---------

    def start(self, prompt_tokens: list[int], text: bytes) -> int:
        return self.sync_to(prompt_tokens)

    def feed(self, token: int, text: bytes) -> None:
        self.append([token])

    def room(self) -> int:
        """Positions left in the context window."""
        return self.ctx.n_ctx - len(self.tokens)

    def plan(self, texts: list[bytes]) -> int:
        return max(1, min(len(texts), self.room(), self.ctx.n_batch))

    def verify(self, tokens: list[int], texts: list[bytes]) -> None:
        self._verify_start = len(self.tokens)
        self.append(tokens, logits_all=True)

    def logits_at(self, j: int) -> int:
        return self.ctx.logits_ptr(j)

    def keep(self, n: int) -> None:
        self._truncate(self._verify_start + n)


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
        self._plan: tuple[list[bytes], list[list[int]]] | None = None   # texts, tokens per position

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
        new_tokens = self._retokenized(self.text + delta)
        self.text += delta
        return self._apply(new_tokens)

    def _retokenized(self, text: bytes) -> list[int]:
        """tokenize(text) for `text` = self.text + more, re-tokenizing only an unstable tail
        of the current tokens (changes nothing)."""
        if len(text) == len(self.text):
            return list(self.tokens)
        if not self._offsets_exact_before(len(self.text)):
            return self._full(text)
        n = len(self.tokens)
        first_fixed = 1 if (n and self.vocab.add_bos and self.tokens[0] == self.vocab.bos) else 0
        k = self.window
        while True:
            start = max(first_fixed, n - k)
            if start <= first_fixed:
                return self._full(text)
            offset = self._ends[start - 1]
            tail = self.vocab.tokenize(text[offset:], add_special=False, parse_special=True)
            changed = common_prefix(self.tokens[start:], tail)
            if changed > 0:
                return self.tokens[:start] + tail
            k *= 2  # the window's first token changed: the change may reach further back

    def _offsets_exact_before(self, old_len: int) -> bool:
        return bool(self._ends) and self._ends[-1] == old_len

    def _full(self, text: bytes) -> list[int]:
        self.full_retokenizations += 1
        return self.tokenize(text)

    def _apply(self, new_tokens: list[int]) -> int:
        old_ends = self._ends
        start = self.seq.sync_to(new_tokens)
        self._recount(old_ends, start, new_tokens)
        return self.seq.decoded

    def _recount(self, old_ends: list[int], start: int, new_tokens: list[int]) -> None:
        """Byte offsets for `new_tokens`, whose first `start` equal those `old_ends` were
        counted for: those offsets are kept, the rest recomputed from pieces (all of them if an
        interruption left the offsets shorter than the tokens)."""
        start = start if start <= len(old_ends) else 0
        base = old_ends[start - 1] if start else 0
        ends = old_ends[:start]
        for length in self._lengths(new_tokens[start:], at_start=start == 0):
            base += length
            ends.append(base)
        self._ends = ends

    # --- speculative verification (see the module docstring) --------------------------------

    def plan(self, texts: list[bytes]) -> int:
        """Value tokens of the text after each position, each a prefix of the next's: as
        many positions as keep that chain (and fit the window and one batch)."""
        seq, text = self.seq, self.text
        chain: list[list[int]] = []
        for piece in texts:
            text += piece
            tokens = self._retokenized(text)
            if chain and tokens[:len(chain[-1])] != chain[-1]:
                break
            if chain and (len(tokens) > seq.ctx.n_ctx or
                          len(tokens) - self._first_decoded(chain[0], tokens) > seq.ctx.n_batch):
                break
            chain.append(tokens)
        self._plan = (list(texts[:len(chain)]), chain)
        return len(chain)

    def _first_decoded(self, first: list[int], last: list[int]) -> int:
        """Where a verify batch ending in `last` starts: after the common prefix with the
        cache, but at the latest at the first position's last token (its logits are needed)."""
        return max(0, min(common_prefix(self.tokens, last), len(first) - 1))

    def verify(self, tokens: list[int], texts: list[bytes]) -> None:
        planned, chain = self._plan
        assert planned[:len(texts)] == list(texts), "verify() needs the texts plan() saw"
        chain = chain[:len(texts)]
        self._plan = (planned[:len(texts)], chain)
        last = chain[-1]
        start = self._first_decoded(chain[0], last)
        self._old_ends = self._ends
        self.seq._truncate(start)
        start = len(self.seq.tokens)       # 0 if the truncation had to reset
        self.seq._verify_start = start
        self.seq.append(last[start:], logits_all=True)

    def logits_at(self, j: int) -> int:
        chain = self._plan[1]
        return self.seq.ctx.logits_ptr(len(chain[j]) - 1 - self.seq._verify_start)

    def keep(self, n: int) -> None:
        texts, chain = self._plan
        kept = chain[n - 1]
        start = self.seq._verify_start
        self.seq._truncate(len(kept))
        self.text += b"".join(texts[:n])
        self._recount(self._old_ends, start, kept)
        self._plan = None


class FixedPrompt(KVSequence):
    """A context that reads its own fixed prompt, then the base's answer tokens (the
    unconditional side of classifier-free guidance: a negative prompt, or nothing)."""

    def __init__(self, ctx: Context, prompt_tokens: list[int], checkpoint: Callable[[], None] | None = None):
        super().__init__(ctx, checkpoint)
        self.prompt_tokens = list(prompt_tokens)

    def start(self, prompt_tokens: list[int], text: bytes) -> int:
        return self.sync_to(self.prompt_tokens)
