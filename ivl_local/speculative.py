"""Speculative fused decoding: draft a few tokens cheaply, verify them in one batch.

    drafter = NgramDrafter()                      # or ModelDrafter(seq): a GGUF with the base's vocabulary
    drafter.start(prompt_tokens)
    drafts = drafter.propose(history, k)          # history = prompt + answer so far (pending included)
    # the engine decodes [pending] + drafts in ONE llama_decode per context (base and every
    # term), fuses the logits at each position and walks them:
    token = accept_or_resample(ids, probs, draft, rng)   # sampling; greedy: argmax == draft

Exactness. Position j's fused logits are those plain decoding would have seen after the same
tokens (ivl_local/sync.py: same-vocabulary followers decode the drafts; cross-vocabulary ones
the value tokens of the drafted text). The walk stops at the first token that differs from
its draft, so every emitted token is drawn from the distribution plain decoding draws from:
- greedy: the argmax (the same C++ call as plain decoding) — the same tokens;
- sampling: the drafts are deterministic (a point mass q), so the speculative rule reduces to:
  accept the draft x with probability p(x), where p is the distribution after the whole sampler
  chain (`Sampler.probs`: penalties, top-k, temperature, top-p, min-p); otherwise draw from p
  with x removed, renormalised. P(x) = p(x) and P(y) = (1 - p(x)) p(y) / (1 - p(x)) = p(y).
- penalties (repeat/presence/frequency): the sampler accepts each emitted token before the next
  position is judged, so every position sees the history plain decoding would.
Seeds: these draws use a numpy Generator seeded from the sampling seed; a seed reproduces a
speculative run with the same drafter and draft lengths, not a plain run's tokens (the same
distribution, other draws). Greedy output does not depend on the seed or the draft length.

Draft length (`DraftLength`): from the acceptance rate a (per drafted token, recent steps
weigh more) it picks the k that maximises the expected tokens per unit of time,
(1 - a^(k+1)) / (1 - a) / (1 + k * cost), where `cost` is a verified position's price relative
to a plain step (logits at every position, plus a draft model's own decode). k = 0 (no
drafting) wins when drafts are mostly rejected; a 1-token probe after a few steps notices
when they are accepted again (each probe that fails doubles the wait, up to 64 steps). Where a
drafted position costs a whole plain step (cost >= 1: a draft model nearly as slow as the
models it drafts for) drafting cannot pay and only `k_min` tokens are drafted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .config import check_draft_max
from .errors import ConfigError

NGRAM = "ngram"
# A verified position's price relative to a plain decode step, in CPU time on one thread of a
# shared 2-core x86 machine (benchmarks/bench_spec.py prints it): 0.5-0.6 for Gemma 3 270M and
# SmolLM2 135M (Gemma's 262k-entry output layer runs once per position), 0.7-1.0 for the Qwen
# 2.5 Q4_K_M models: small batches are compute-bound there. Deterministic on purpose: seeded
# runs must not depend on timings.
VERIFY_COST = 0.6
# A draft model's price per step relative to its size ratio to the verifying models: besides
# its k - 1 one-token drafting decodes it syncs the accepted drafts and the new token.
DRAFT_MODEL_OVERHEAD = 1.5
PROBE_EVERY = 8       # steps without drafting before a 1-token probe (doubled per failed probe)
PROBE_MAX = 64
MEMORY = 0.8          # weight of the acceptance counts so far at each step (recent steps count more)


def check_draft(value):
    """--draft: None (off), "ngram", or a model (path or known name: its file is checked later)."""
    if value is None:
        return None
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"draft must be 'ngram' or a model file with the base's vocabulary, got {value!r}")
    return NGRAM if value.strip().lower() == NGRAM else value


class DraftLength:
    """How many tokens to draft at the next step (see the module docstring)."""

    def __init__(self, k_max: int, k_min: int = 0, cost: float = VERIFY_COST):
        self.k_max = check_draft_max(k_max)
        self.k_min = min(k_min, self.k_max)
        self.cost = cost
        self._accepted, self._trials = 1.0, 2.0   # prior: half of the drafts accepted
        self._idle = 0
        self._probe_every = PROBE_EVERY
        self._probing = False

    @property
    def rate(self) -> float:
        """Estimated probability that a drafted token is accepted."""
        return self._accepted / self._trials

    def next(self) -> int:
        if self.cost >= 1.0:   # a position costs a plain step: even all-accepted drafts never pay
            return self.k_min
        a, best, best_gain = min(self.rate, 0.999), 0, 1.0
        for k in range(1, self.k_max + 1):
            gain = (1 - a ** (k + 1)) / (1 - a) / (1 + k * self.cost)
            if gain > best_gain:
                best, best_gain = k, gain
        self._probing = best == 0 and self._idle >= self._probe_every
        return max(1 if self._probing else best, self.k_min)

    def update(self, drafted: int, accepted: int) -> None:
        """After a verification: `accepted` of `drafted` tokens (the run up to the first miss)."""
        if drafted == 0:
            self._idle += 1
            return
        if self._probing:   # a failed probe waits twice as long for the next one
            self._probe_every = PROBE_EVERY if accepted else min(2 * self._probe_every, PROBE_MAX)
        self._idle = 0
        trials = accepted + (1 if accepted < drafted else 0)   # draws up to the first rejection
        self._accepted = MEMORY * self._accepted + accepted
        self._trials = MEMORY * self._trials + trials


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the last n
    tokens (n from `ngram_max` down to `ngram_min`). No model; strong where the answer copies
    (code, quotes, structured output). Index: n-gram -> index after its latest occurrence."""

    cost = 0.0   # relative to a plain step

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2):
        self.sizes = range(ngram_max, ngram_min - 1, -1)
        self._index: dict[tuple[int, ...], int] = {}
        self._history: list[int] = []

    def start(self, prompt_tokens: list[int]) -> None:
        self._index.clear()
        self._history = []
        self._extend(prompt_tokens)

    def _extend(self, tokens: list[int]) -> None:
        history = self._history
        for token in tokens:
            end = len(history)        # the n-grams ending at end - 1 are now followed by `token`
            for n in self.sizes:
                if end >= n:
                    self._index[tuple(history[end - n:end])] = end
            history.append(token)

    def propose(self, history: list[int], k: int) -> list[int]:
        if history[:len(self._history)] != self._history:
            self.start(history)
        else:
            self._extend(history[len(self._history):])
        if k <= 0:
            return []
        for n in self.sizes:
            if len(history) >= n:
                at = self._index.get(tuple(history[-n:]))
                if at is not None:
                    return history[at:at + k]
        return []


class ModelDrafter:
    """A small model with the base's vocabulary drafts greedily, one token at a time, in its
    own context (a KVSequence following the answer; rejected drafts roll back at the next
    proposal's sync)."""

    def __init__(self, seq, sampler, cost: float):
        self.seq = seq              # sync.KVSequence on the draft model's context
        self.sampler = sampler      # a greedy _core.Sampler (argmax)
        self.cost = cost            # its decode relative to a plain step of the engine

    def start(self, prompt_tokens: list[int]) -> None:
        pass   # the first proposal syncs the context (reusing its cached prefix)

    def propose(self, history: list[int], k: int) -> list[int]:
        k = min(k, self.seq.ctx.n_ctx - len(history))
        if k <= 0:
            return []
        self.seq.sync_to(history)
        drafts: list[int] = []
        ctx, n_vocab = self.seq.ctx, self.seq.ctx.n_vocab
        while True:
            drafts.append(self.sampler._sample_ptr(ctx.logits_ptr(), n_vocab))
            if len(drafts) == k:
                return drafts
            self.seq.append(drafts[-1:])


def accept_or_resample(ids: np.ndarray, probs: np.ndarray, draft: int | None,
                       rng: np.random.Generator) -> int:
    """A token from the distribution (ids, probs) — the sampler chain's output — given a
    deterministic draft: the draft with probability p(draft), else a draw from the rest."""
    p = probs.astype(np.float64)
    if draft is not None:
        hit = np.flatnonzero(ids == draft)
        if hit.size:
            if rng.random() < p[hit[0]]:
                return int(draft)
            p[hit[0]] = 0.0
    total = p.sum()
    if total <= 0.0:          # the draft had all the mass (and lost to rounding): keep it
        return int(draft)
    i = int(np.searchsorted(np.cumsum(p), rng.random() * total, side="right"))
    return int(ids[min(i, len(ids) - 1)])
