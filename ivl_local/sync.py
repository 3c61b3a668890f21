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

import numpy as np

from .backend import Context, Vocab, logits_view
from .errors import ContextOverflowError, IVLError


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
            if not self.seq.logits_valid and self.tokens:
                # the logits were overwritten (CandidateScorer's decode): decode the last again
                return self._apply(list(self.tokens))
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


# --- map_mode "logprob" / "shared" (ivl_local/terms.py) -------------------------------------------

class LogProbProjection:
    """The value's log-probabilities through the token map (map_mode "logprob" and "shared").

    The fuse reads (Engine._sample):
        part A: (value logits, n_value, token_map, weights, w, log_softmax)
        part U: (neutral, 1, map_u, None, w, raw)     a base token the map leaves out: the
                value's mean log-probability at this step (no opinion; 0 on this scale would
                be certainty, above every mapped token)
        part S: (share, n_base, None, None, w, raw)   "shared" only, see below

    For mapped tokens "logprob" is the raw map shifted by one number per step (the value's
    log-sum-exp), so on its own it changes only how the unmapped tokens stand against the
    rest.

    "shared" is the many-to-one rule. Base tokens that map to one value token v (Gemma words
    whose first SmolLM2 piece is the same; SmolLM2's 73 newline-and-space tokens that all
    begin with Gemma's "\n") form a group, and they share v's probability instead of each
    receiving all of it, split as the base splits its own probability inside the group:

        share[i] = z_base[i] - log Σ_{j in group(i)} exp(z_base[j])     (0 outside groups)

    so log p_value(v) + share[i] is the log of p_value(v) · p_base(i | group), and the
    projected probabilities sum to at most 1 over the base's vocabulary. An equal split
    (-log n) was tried first: it pushed SmolLM2's "\n" (a group of 73) below its end token,
    and SmolLM2 + the Gemma model answered nothing; the base's own split leaves the token it
    prefers in a group almost all of the group's mass."""

    def __init__(self, token_map: np.ndarray, n_value: int, shared: bool):
        token_map = np.asarray(token_map)
        mapped = token_map >= 0
        self.n_value = n_value
        self.map_u = np.where(mapped, -1, 0).astype(np.int32) if not mapped.all() else None
        self.neutral = np.zeros(1, dtype=np.float32)   # this step's mean value log-probability
        self.share = None
        if shared:
            counts = np.bincount(token_map[mapped], minlength=n_value)
            grouped = mapped & (counts[np.maximum(token_map, 0)] >= 2)
            if grouped.any():   # one-to-one: nothing to share
                self._members = np.flatnonzero(grouped)
                _, self._group = np.unique(token_map[self._members], return_inverse=True)
                self._n_groups = int(self._group.max()) + 1
                self.share = np.zeros(len(token_map), dtype=np.float32)
        self.n_extra = (self.map_u is not None) + (self.share is not None)   # parts besides A

    def neutral_value(self, row: np.ndarray, lse: float | None = None) -> float:
        """Mean log-probability of `row` (value logits) over its finite entries (a -inf logit,
        a banned token, would make the mean -inf and ban every unmapped token with it); `lse`
        its log-sum-exp when known. NaN and +inf are the fuse's to report."""
        mean = float(row.mean(dtype=np.float64))
        if not np.isfinite(mean):
            finite = row[np.isfinite(row)]
            mean = float(finite.mean(dtype=np.float64)) if finite.size else 0.0
        return mean - (_logsumexp(row) if lse is None else lse)

    def shares(self, base: np.ndarray) -> np.ndarray:
        """share[] for these base logits (written in place and returned)."""
        z = base[self._members].astype(np.float64)
        # a group that underflows entirely, or NaN / inf base logits: share 0 below (the fuse
        # reports a NaN or +inf base logit itself)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            top = z.max()
            sums = np.bincount(self._group, weights=np.exp(z - top), minlength=self._n_groups)
            group_lse = top + np.log(sums)
        # <= 0 by construction; fmin() also turns NaN (a NaN base logit) into 0 here, and the
        # fuse reports the base's NaN itself
        with np.errstate(invalid="ignore"):
            self.share[self._members] = np.fmin(z - group_lse[self._group], 0.0)
        return self.share

    def extra_parts(self, logits_ptr: int, weight: float, lse: float | None = None,
                    base_ptr: int | None = None) -> list[tuple]:
        """Parts U and S for the value logits at `logits_ptr` and (S) the base logits at
        `base_ptr` (fused at once: `neutral` and `share` are rewritten at the next call)."""
        parts = []
        if self.map_u is not None:
            self.neutral[0] = self.neutral_value(logits_view(logits_ptr, self.n_value), lse)
            parts.append((self.neutral.ctypes.data, 1, self.map_u, None, weight, "raw"))
        if self.share is not None:
            self.shares(logits_view(base_ptr, len(self.share)))
            parts.append((self.share.ctypes.data, len(self.share), None, None, weight, "raw"))
        return parts


# --- map_mode "candidates" (ivl_local/terms.py) --------------------------------------------------

_UNSET = object()
_SCORED_TYPES = (1, 4, 6)   # normal, user-defined, byte: the token map builder's text tokens


class CandidateScorer:
    """Scores the base's best tokens by the value model's log-probability of their whole text.

    At each step (before fusing), for the base's `k` best tokens by the base's logits alone:
    a token whose text (normalised as the token map normalises it: '▁'/'Ġ' spaces, byte
    tokens) is one value token keeps the map; one whose text has no exact value token and is
    n >= 2 value tokens v_1..v_n (the value tokenizer's encoding of the text alone, as the
    map's first-piece rule encodes it) gets

        score = Σ_j log p_value(v_j | value tokens so far, v_1..v_{j-1})

    log p(v_1 | ...) from the current logits (copied first: a decode overwrites llama.cpp's
    buffer), the others from decoding v_1..v_{n-1} after the value context's tokens with
    logits at every position, after which the cache is truncated back: the value context
    then holds exactly the tokens it held before (`logits_valid` is cleared, so the next
    read of its logits re-decodes the last token if nothing else is decoded first).

    Decodes: candidates whose inputs v_1..v_{n-1} are a prefix of another's share its decode
    (two-token candidates with the same first piece: one one-token decode); each remaining
    path is one decode of its tokens, one sequence at a time (the context has one sequence:
    backend.Context is built with n_seq_max = 1).

    A base token the map gives no value token (control and unused tokens) would get 0 from
    part A, which on the log-probability scale is certainty: every mapped token scores below
    it. It gets the value's mean log-probability at this step instead (no opinion, as 0 is for
    raw logits near 0). Without that, Gemma 3 + the SmolLM2 spell_backward value net emitted
    unused tokens (empty answers) on 2 of 6 validation prompts.

    The fuse then uses (Engine._sample):
        part A: (logits_ptr(), n_value, map_a, weights, w, log_softmax)   map_a: scored ids -1
        part B: (scores_ptr, n, map_b, None, w, raw)                     map_b: scored id -> slot
        part U: neutral_parts(w), LogProbProjection's: unmapped tokens -> the mean log p
    and `restore()` puts the maps back.
    """

    def __init__(self, follower: TextSync, k: int, base_vocab, value_vocab, token_map: np.ndarray):
        from . import _core

        self.follower = follower
        self.k = k
        self._base = base_vocab        # vocab.VocabData of the base
        self._value = value_vocab      # vocab.VocabData of the value model
        self._token_map = token_map
        self.map_a = np.array(token_map, dtype=np.int32)          # writable copy
        self.map_b = np.full(len(token_map), -1, dtype=np.int32)
        self.scores = np.zeros(k, dtype=np.float32)
        self.ids: list[int] = []
        self.n_value = follower.seq.ctx.n_vocab
        self._current = np.empty(self.n_value, dtype=np.float32)
        self._top = _core.Sampler(1.0, k, 1.0, 0.0, 1.0, 0, 0.0, 0.0, 0)   # top-k only
        self._texts: dict[int, tuple[int, ...] | None] = {}
        self.decodes = 0               # value decodes made for scoring (stats, tests)
        self._copied = False           # _current holds this step's value logits
        self._current_lse: float | None = None   # their log-sum-exp, once score() needed it
        self._projection = LogProbProjection(token_map, self.n_value, shared=False)   # part U

    def logits_ptr(self) -> int:
        """The value logits of the current position: the copy made before scoring's decodes
        overwrote llama.cpp's buffer, else the context's own."""
        return self._current.ctypes.data if self._copied else self.follower.seq.ctx.logits_ptr()

    @property
    def scores_ptr(self) -> int:
        return self.scores.ctypes.data

    def neutral_parts(self, weight: float) -> list[tuple]:
        """Part U (the value's mean log-probability for the tokens the map leaves out) of this
        step's value logits, reusing the log-sum-exp score() took; [] when the map leaves none out."""
        return self._projection.extra_parts(self.logits_ptr(), weight, self._current_lse if self._copied else None)

    def value_tokens(self, token: int) -> tuple[int, ...] | None:
        """The value tokens of base token `token`'s text when that text is several value
        tokens and no single one; None otherwise (cached)."""
        got = self._texts.get(token, _UNSET)
        if got is _UNSET:
            got = self._texts[token] = self._split(token)
        return got

    def _split(self, token: int) -> tuple[int, ...] | None:
        from . import _core

        base, value = self._base, self._value
        ttype = int(base.types[token])
        if ttype not in _SCORED_TYPES:
            return None
        text = _core.normalize_token(base.tokens[token], base.kind, ttype)
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return None   # a lone byte: no text of its own
        if not text:
            return None
        mapped = int(self._token_map[token])
        if mapped >= 0 and _core.normalize_token(value.tokens[mapped], value.kind,
                                                 int(value.types[mapped])) == text:
            return None   # an exact counterpart: one value token
        ids = self.follower.vocab.tokenize(text, add_special=False, parse_special=False)
        return tuple(ids) if len(ids) >= 2 else None

    def score(self, base_logits: np.ndarray) -> int:
        """Score this step's candidates; returns how many (their base ids in `ids`, their
        log-probabilities in `scores[:n]`, `map_a`/`map_b` set until `restore()`)."""
        top, _ = self._top.probs(base_logits)
        candidates = []
        for token in top.tolist():
            pieces = self.value_tokens(token)
            if pieces is not None:
                candidates.append((token, pieces))
        self.ids = []
        self._copied = False
        self._current_lse = None
        if not candidates:
            return 0
        seq = self.follower.seq
        ctx = seq.ctx
        if not seq.logits_valid:   # not expected (feed/start leave them valid): decode the last again
            seq.sync_to(list(seq.tokens))
        np.copyto(self._current, logits_view(ctx.logits_ptr(), self.n_value))
        self._copied = True
        start = len(seq.tokens)
        room = min(ctx.n_ctx - start, ctx.n_batch)
        candidates = [(t, p) for t, p in candidates if len(p) - 1 <= room]
        if not candidates:
            return 0
        self._current_lse = _logsumexp(self._current)
        first = _log_softmax_at(self._current, self._current_lse)
        totals = [first(p[0]) for _, p in candidates]
        # each decode path: the longest inputs v_1..v_{n-1}; shorter ones that are a prefix share it
        inputs = [p[:-1] for _, p in candidates]
        paths: list[tuple[int, ...]] = []
        for path in sorted(set(inputs), key=len, reverse=True):
            if not any(other[:len(path)] == path for other in paths):
                paths.append(path)
        done = [False] * len(candidates)
        try:
            for path in paths:
                ctx.decode(list(path), start, logits_all=True)
                self.decodes += 1
                rows: dict[int, Callable[[int], float]] = {}
                for c, (_, pieces) in enumerate(candidates):
                    if done[c] or path[:len(inputs[c])] != inputs[c]:
                        continue
                    for j in range(1, len(pieces)):   # p(v_j) from the output after v_{j-1}
                        row = rows.get(j - 1)
                        if row is None:
                            row = rows[j - 1] = _log_softmax_at(logits_view(ctx.logits_ptr(j - 1), self.n_value))
                        totals[c] += row(pieces[j])
                    done[c] = True
                if not ctx.truncate(start):
                    raise IVLError("the value model's cache cannot drop positions (a recurrent model?): "
                                   "map_mode 'candidates' needs a model whose cache rolls back")
        finally:
            seq.logits_valid = False
            if ctx.pos_max() >= start and not ctx.truncate(start):
                seq.reset()
        for slot, ((token, _), total) in enumerate(zip(candidates, totals)):
            self.scores[slot] = total
            self.map_a[token] = -1
            self.map_b[token] = slot
            self.ids.append(token)
        return len(self.ids)

    def restore(self) -> None:
        """Put the maps back as they were before `score()`."""
        for token in self.ids:
            self.map_a[token] = self._token_map[token]
            self.map_b[token] = -1
        self.ids = []


def _logsumexp(row: np.ndarray) -> float:
    """log Σ exp(row), summed in double after the max is taken out (as _core's log_softmax)."""
    top = float(row.max())
    return top + float(np.log(np.exp(row - np.float32(top)).sum(dtype=np.float64)))


def _log_softmax_at(row: np.ndarray, shift: float | None = None) -> Callable[[int], float]:
    """i -> log_softmax(row)[i], the normaliser (`shift`, row's log-sum-exp) computed once."""
    shift = _logsumexp(row) if shift is None else shift
    return lambda i: float(row[i]) - shift
