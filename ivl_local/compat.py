"""How well a value model reaches a base model with another vocabulary (`ivl compat`).

    report = compat_report("gemma3-270m", "value.ivl.gguf", data="demos.jsonl", limit=20)
    report.coverage        # exact text matches, base -> value and value -> base
    report.mass            # the value model's probability mass on tokens the base can hear
    report.steps           # per demonstration step: the fused top-1 vs the value's own choice
    report.as_dict()       # what `ivl compat --json` prints

Three measurements, each a place where the token map can lose the value signal:

1. Coverage: the share of normal tokens with an exact counterpart, both ways, and the rule
   (vocab.RULE_NAMES) each base token got its value token by.
2. Mapped mass: on real text (the demonstrations as the value model reads them, else the
   shipped corpus), at every position, the value model's softmax summed over value tokens
   that some base token matches exactly ("exact"), and over those any base token is mapped
   to by any rule ("reached"). Mass outside "reached" cannot move the base at all.
3. Steps: each demonstration's answer, teacher-forced: the base reads the prompt and the
   reference answer's first k tokens, the value model the same text (TextSync, as the
   Engine feeds it). At each step the *wish* is the value's top-1 in its own vocabulary on
   its own training base (argmax of own_base + alpha * value, what it was trained to
   produce; the value's logits alone when the training base is not installed), and the
   *fused* top-1 is the Engine's greedy choice (the same C++ fuse). A step agrees when the
   two tokens' texts are equal (any end-of-generation token counts as the same "stop").
   Where they differ the report names the base token that won, its map rule and the value
   contribution it got, and the base token(s) that carry the wish's text.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, DataError, ModelFileError
from .vocab import (RULE_END_ROLE, RULE_EXACT, RULE_FIRST_PIECE, RULE_NAMES, TYPE_BYTE, TYPE_NORMAL,
                    VocabData, exact_counterparts, map_rules)

DEFAULT_LIMIT = 20            # demonstrations read
MASS_TOKENS = 2048            # positions the mass is averaged over, at most
CORPUS_BYTES = 6000           # of the shipped corpus, when no demonstrations are given
N_CTX = 1024
STOP = "<stop>"               # how any end-of-generation token is shown


@dataclass
class Coverage:
    base_normal: int               # normal + byte tokens of the base
    base_exact: int                # ... with a value token of identical text
    value_normal: int
    value_exact: int               # value normal tokens with a base token of identical text
    rules: dict[str, int]          # base tokens per map rule (all types)
    shared_value_tokens: int       # value tokens that several base tokens are mapped to
    max_fan_in: int                # the most base tokens sharing one value token

    @property
    def base_share(self) -> float:
        return self.base_exact / self.base_normal if self.base_normal else 0.0

    @property
    def value_share(self) -> float:
        return self.value_exact / self.value_normal if self.value_normal else 0.0


@dataclass
class Mass:
    source: str                    # what text it was measured on
    positions: int
    exact: float                   # mean value mass on exact counterparts
    reached: float                 # mean value mass on value tokens any base token maps to
    own_exact: float | None = None     # the same for own_base + alpha * value (when loaded)
    own_reached: float | None = None


@dataclass
class Step:
    demo: int                      # line number in the data file
    step: int                      # answer token index (the last is the end of the answer)
    reference: str                 # the demonstration's base token text (STOP at the end)
    wish: str                      # the value's top-1 text in its own vocabulary
    fused: str                     # the fused top-1 text
    fused_rule: str                # map rule of the fused top-1 base token
    fused_value: float             # alpha * weight * value logit it received
    base_alone: str                # the base's own top-1
    agree: bool                    # fused text == wish text
    wish_base_tokens: list[str] = field(default_factory=list)   # base tokens of the wish's text
    wish_rank: int | None = None   # best fused rank among those (0 = top-1), None: no such token
    # On the own base: the wish's lead over the runner-up of own + alpha * value, split into
    # the value's part alpha * (z[wish] - z[runner-up]) and the own base's part. A value part
    # <= 0 means the value alone does not prefer the wish: its training base carries it, and
    # a base that does not share that prior will not hear it.
    value_margin: float | None = None
    own_margin: float | None = None
    spread_ratio: float | None = None   # std of the base's logits / std of the own base's


@dataclass
class CompatReport:
    base: str
    value: str
    own_base: str | None           # the value's training base, when it was loaded
    alpha: float
    builder: str
    coverage: Coverage
    mass: Mass | None
    steps: list[Step]
    stored_alpha: float | None = None   # --store-alpha: what was stored with the map ...
    stored_map: str | None = None       # ... and where (None: nothing stored or removed)

    def step_summary(self) -> dict:
        n = len(self.steps)
        if not n:
            return {"steps": 0}
        disagree = [s for s in self.steps if not s.agree]
        return {
            "steps": n,
            "agree": sum(s.agree for s in self.steps) / n,
            "fused_is_reference": sum(s.fused == s.reference for s in self.steps) / n,
            "wish_is_reference": sum(s.wish == s.reference for s in self.steps) / n,
            "base_is_reference": sum(s.base_alone == s.reference for s in self.steps) / n,
            "disagreements_by_rule": dict(Counter(s.fused_rule for s in disagree).most_common()),
            "wish_has_no_base_token": sum(s.wish_rank is None for s in disagree),
            **({} if self.steps[0].value_margin is None else {
                # scale calibration: alpha times this gives the value the same weight against
                # this base's logits as against its training base's (median over steps)
                "spread_ratio": float(np.median([s.spread_ratio for s in self.steps])),
                "wish_carried_by_own_base": sum(s.value_margin <= 0 for s in self.steps) / n,
                "disagreements_carried_by_own_base": sum(s.value_margin <= 0 for s in disagree)}),
        }

    def as_dict(self) -> dict:
        out = asdict(self)
        out["coverage"]["base_share"] = self.coverage.base_share
        out["coverage"]["value_share"] = self.coverage.value_share
        out["summary"] = self.step_summary()
        return out


# --- coverage ----------------------------------------------------------------------------

def coverage(base: VocabData, value: VocabData, mapping) -> tuple[Coverage, np.ndarray, np.ndarray]:
    """Coverage numbers, the rule per base token, and the exact counterpart per base token."""
    exact = exact_counterparts(base, value)
    back = exact_counterparts(value, base)
    rules = map_rules(base, value, mapping)
    base_normal = np.isin(base.types, (TYPE_NORMAL, TYPE_BYTE))
    value_normal = np.isin(value.types, (TYPE_NORMAL, TYPE_BYTE))
    token_map = np.arange(len(base), dtype=np.int32) if mapping.identity else mapping.token_map
    fan_in = np.bincount(token_map[token_map >= 0], minlength=len(value))
    cov = Coverage(
        base_normal=int(base_normal.sum()), base_exact=int((base_normal & (exact >= 0)).sum()),
        value_normal=int(value_normal.sum()), value_exact=int((value_normal & (back >= 0)).sum()),
        rules={RULE_NAMES[r]: int(c) for r, c in enumerate(np.bincount(rules, minlength=len(RULE_NAMES)))},
        shared_value_tokens=int((fan_in > 1).sum()), max_fan_in=int(fan_in.max(initial=0)))
    return cov, rules, exact


# --- models --------------------------------------------------------------------------------

class _Side:
    """One loaded model with a context."""

    def __init__(self, path: Path, n_threads: int):
        from .backend import Context, Model
        from .valuefile import read_gguf_header
        from .vocab import read_vocab

        self.path = path
        self.header = read_gguf_header(path)
        self.vocab_data = read_vocab(self.header)
        self.model = Model(path)
        self.vocab = self.model.vocab
        self.ctx = Context(self.model, n_ctx=N_CTX, n_threads=n_threads)
        self.template = self.header.get("tokenizer.chat_template")

    def render(self, record: dict) -> str:
        """The prompt of a demonstration as this model reads it in chat (its own format)."""
        from .chat_template import render_messages

        if "messages" in record:
            messages = record["messages"]
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            return render_messages(messages[:last], self.template, bos_token="",
                                   eos_token=self.vocab.eos_text)
        return record["prompt"]

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


def _answer(record: dict) -> str:
    if "messages" in record:
        messages = record["messages"]
        return messages[max(i for i, m in enumerate(messages) if m["role"] == "assistant")]["content"]
    return record["response"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max())
    return z / z.sum()


# --- mapped mass -----------------------------------------------------------------------------

def value_mass(value: _Side, texts: list[bytes], exact_set: np.ndarray, reached_set: np.ndarray,
               own: _Side | None = None, alpha: float = 1.0, max_positions: int = MASS_TOKENS,
               source: str = "") -> Mass:
    """Mean softmax mass of the value model (and of own_base + alpha * value) on the two sets
    of value tokens, over every position of `texts` (each read from its start), capped."""
    from .sync import KVSequence

    totals = np.zeros(4)
    positions = 0
    for text in texts:
        tokens = value.vocab.tokenize(text, add_special=True, parse_special=True)
        seqs = [KVSequence(value.ctx)] + ([KVSequence(own.ctx)] if own else [])
        for seq in seqs:
            seq.reset()
        for t in tokens[: min(len(tokens), N_CTX - 1)]:
            if positions >= max_positions:
                break
            for seq in seqs:
                seq.append([t])
            z = value.ctx.logits_array()
            p = _softmax(z)
            totals[0] += p[exact_set].sum()
            totals[1] += p[reached_set].sum()
            if own is not None:
                q = _softmax(own.ctx.logits_array() + alpha * z)
                totals[2] += q[exact_set].sum()
                totals[3] += q[reached_set].sum()
            positions += 1
        if positions >= max_positions:
            break
    if not positions:
        raise DataError("no text to measure the mapped mass on")
    mean = totals / positions
    return Mass(source, positions, float(mean[0]), float(mean[1]),
                float(mean[2]) if own else None, float(mean[3]) if own else None)


# --- teacher-forced steps ----------------------------------------------------------------------

def _show(vocab, token: int) -> str:
    if vocab.is_eog(token):
        return STOP
    return vocab.piece(token, special=True).decode("utf-8", "replace")


def demo_steps(lineno: int, record: dict, base: _Side, value: _Side, own: _Side | None,
               mapping, rules: np.ndarray, alpha: float, by_text: dict[str, list[int]]) -> list[Step]:
    """Teacher-force one demonstration's answer; one Step per answer token and one for its end."""
    from . import _core
    from .detok import Detokenizer
    from .sync import KVSequence, TextSync

    prompt_tokens = base.vocab.tokenize(base.render(record), add_special=True, parse_special=True)
    answer_tokens = base.vocab.tokenize(_answer(record), add_special=False, parse_special=False)
    base_seq = KVSequence(base.ctx)
    follower = TextSync(value.vocab, value.ctx)
    own_seq = KVSequence(own.ctx) if own else None
    for seq in (base_seq, follower, own_seq):   # the contexts may hold another text's cache
        if seq is not None:
            seq.reset()
    detok = Detokenizer(base.vocab.piece)
    value_text = value.render(record).encode("utf-8")
    token_map = None if mapping.identity else mapping.token_map
    weights = None if mapping.identity else mapping.token_weights
    steps = []
    for k in range(len(answer_tokens) + 1):
        if len(prompt_tokens) + k >= N_CTX - 1:
            break
        if k == 0:
            base_seq.sync_to(prompt_tokens)
            follower.reset_to(value_text)
        else:
            base_seq.append([answer_tokens[k - 1]])
            follower.append(detok.push(answer_tokens[k - 1]).encode("utf-8"))
        base_logits = np.array(base.ctx.logits_array())
        value_logits = np.array(value.ctx.logits_array())
        margins = (None, None, None)
        if own_seq is not None:
            own_seq.sync_to(follower.tokens)
            own_logits = np.array(own.ctx.logits_array())
            own_fused = own_logits + alpha * value_logits
            runner_up, wish_token = (int(t) for t in np.argpartition(own_fused, -2)[-2:])
            if own_fused[runner_up] > own_fused[wish_token]:
                runner_up, wish_token = wish_token, runner_up
            margins = (round(alpha * float(value_logits[wish_token] - value_logits[runner_up]), 4),
                       round(float(own_logits[wish_token] - own_logits[runner_up]), 4),
                       round(float(_spread(base_logits) / _spread(own_logits)), 4))
        else:
            wish_token = int(np.argmax(value_logits))
        fused = _core.fuse_terms(base_logits, [(value_logits, token_map, weights, alpha, "raw")])
        top = int(np.argmax(fused))
        contribution = 0.0
        if token_map is None:
            contribution = alpha * float(value_logits[top])
        elif token_map[top] >= 0:
            contribution = alpha * float(weights[top]) * float(value_logits[token_map[top]])
        wish = _show(value.vocab, wish_token)
        carriers = by_text.get(wish, [])
        if wish == STOP:
            carriers = list(base.vocab_data.end_ids)
        order = np.argsort(-fused, kind="stable")
        rank = None
        if carriers:
            position = np.empty_like(order)
            position[order] = np.arange(order.size)
            rank = int(position[carriers].min())
        reference = STOP if k == len(answer_tokens) else _show(base.vocab, answer_tokens[k])
        fused_text = _show(base.vocab, top)
        steps.append(Step(lineno, k, reference, wish, fused_text, RULE_NAMES[rules[top]],
                          round(contribution, 4), _show(base.vocab, int(np.argmax(base_logits))),
                          fused_text == wish, [_show(base.vocab, t) for t in carriers[:4]], rank,
                          *margins))
    return steps


def _spread(logits: np.ndarray) -> float:
    """Standard deviation of the finite logits (a base's logit scale)."""
    finite = logits[np.isfinite(logits)].astype(np.float64)
    return float(finite.std()) if finite.size else float("nan")


def _texts_by_piece(side: _Side) -> dict[str, list[int]]:
    """Base token ids by their piece text (several tokens may print the same text)."""
    out: dict[str, list[int]] = {}
    for t in range(side.vocab.n_tokens):
        out.setdefault(side.vocab.piece(t, special=True).decode("utf-8", "replace"), []).append(t)
    return out


# --- the report ----------------------------------------------------------------------------

def read_data(path: str | Path, limit: int) -> list[tuple[int, dict]]:
    """Demonstrations (ivl train's JSONL: 'messages' or 'prompt'/'response'), the first `limit`."""
    from .train.data import read_jsonl

    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    return read_jsonl(Path(path))[:limit]


def check_store_alpha(value) -> float | str | None:
    """--store-alpha: None (store nothing), a number (an alpha), "calibrated" (alpha times the
    measured logit-spread ratio; needs --data and the value's training base) or "none"
    (remove a stored alpha)."""
    from .config import check_alpha

    if value is None or value in ("calibrated", "none"):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--store-alpha must be a number, 'calibrated' or 'none', got {value!r}") from None
    return check_alpha(number, "--store-alpha")


def compat_report(base_ref, value_ref, data=None, *, limit: int = DEFAULT_LIMIT, alpha: float | None = None,
                  own_base=None, token_map=None, n_threads: int = 1, mass_tokens: int = MASS_TOKENS,
                  progress=lambda message: None, store_alpha=None) -> CompatReport:
    """Measure coverage, mapped mass and (with `data`) the per-step agreement.

    own_base: the value's training base (a path or name); None = the one the value file
    names, when it is installed and shares the value's vocabulary; "none" = do not load one.
    alpha None: the one stored with the map, else the value file's.
    store_alpha (check_store_alpha): store this base's alpha with the token map (the given
    map file, else the cached exact-text map), which an Engine then uses when no alpha is
    given; "calibrated" stores the given alpha (else the value file's, never a stored one)
    times the measured logit-spread ratio. The alpha is stored for this base file
    (vocab.base_identity): another base with the same vocabulary does not use it."""
    from .config import check_alpha
    from .models import resolve_model
    from .valuefile import read_gguf_header, value_info_from_header
    from .vocab import base_identity, cached_map_path, resolve_mapping, store_map_alpha, stored_alpha_for

    alpha = None if alpha is None else check_alpha(alpha)     # cheap checks before any file
    store_alpha = check_store_alpha(store_alpha)
    if store_alpha == "calibrated" and (data is None or own_base == "none"):
        raise ConfigError("--store-alpha calibrated needs --data and the value's training base "
                          "(it measures the two bases' logit spreads on the demonstrations)")
    records = read_data(data, limit) if data is not None else []
    base_path, value_path = resolve_model(base_ref), resolve_model(value_ref)
    info = value_info_from_header(read_gguf_header(value_path))
    sides: list[_Side] = []
    try:
        base = _Side(base_path, n_threads)
        sides.append(base)
        value = _Side(value_path, n_threads)
        sides.append(value)
        own = _load_own_base(own_base, info, value, n_threads)
        if own is not None:
            sides.append(own)
        mapping = resolve_mapping(
            base.vocab_data, value.vocab_data,
            lambda text: value.vocab.tokenize(text, add_special=False, parse_special=False),
            map_path=token_map)
        if mapping.identity and store_alpha is not None:
            raise ConfigError("base and value share one vocabulary: there is no token map to store "
                              "an alpha with (give --alpha)")
        given = alpha   # --store-alpha calibrated scales this (never a stored alpha: no compounding)
        if alpha is None:
            stored = stored_alpha_for(mapping, base_path)
            alpha = stored if stored is not None else info.default_alpha
        progress("coverage")
        cov, rules, exact = coverage(base.vocab_data, value.vocab_data, mapping)
        exact_set = np.unique(exact[exact >= 0])
        token_map_arr = np.arange(len(base.vocab_data)) if mapping.identity else mapping.token_map
        reached_set = np.unique(token_map_arr[token_map_arr >= 0])
        if records:
            texts = [(value.render(r) + _answer(r)).encode("utf-8") for _, r in records]
            source = f"{len(records)} demonstrations of {Path(data).name}, as the value model reads them"
        else:
            texts, source = _corpus_texts()
        progress("mapped mass")
        mass = value_mass(value, texts, exact_set, reached_set, own, alpha, mass_tokens, source)
        steps: list[Step] = []
        if records:
            progress("steps")
            by_text = _texts_by_piece(base)
            for lineno, record in records:
                steps += demo_steps(lineno, record, base, value, own, mapping, rules, alpha, by_text)
        report = CompatReport(str(base_path), str(value_path), str(own.path) if own else None, alpha,
                              mapping.builder, cov, mass, steps)
        if store_alpha is not None:
            stored = None if store_alpha == "none" else store_alpha
            if stored == "calibrated":
                summary = report.step_summary()
                if "spread_ratio" not in summary:
                    raise ConfigError("--store-alpha calibrated: no logit spreads were measured (the "
                                      "value's training base was not found; give --own-base)")
                start = info.default_alpha if given is None else given
                stored = check_alpha(round(start * summary["spread_ratio"], 4), "calibrated alpha")
            path = token_map if token_map is not None else cached_map_path(base.vocab_data, value.vocab_data)
            report.stored_map = str(store_map_alpha(path, mapping, stored, base.vocab_data, value.vocab_data,
                                                    alpha_base=base_identity(base_path)))
            report.stored_alpha = stored
        return report
    finally:
        for side in reversed(sides):
            side.close()


def _load_own_base(own_base, info, value: _Side, n_threads: int) -> _Side | None:
    from .errors import ModelNotFoundError
    from .models import resolve_model

    if isinstance(own_base, str) and own_base.lower() == "none":
        return None
    if own_base is None:
        if not info.training_base_name:
            return None
        try:
            path = resolve_model(info.training_base_name)
        except (ModelNotFoundError, ModelFileError):
            return None   # not installed here: the wish is the value's logits alone
    else:
        path = resolve_model(own_base)
    own = _Side(path, n_threads)
    if own.vocab_data.fingerprint != value.vocab_data.fingerprint:
        own.close()
        if own_base is None:
            return None
        raise ConfigError(f"--own-base {path.name} has another vocabulary than the value model")
    return own


def _corpus_texts() -> tuple[list[bytes], str]:
    from .datasets import data_path

    corpus = data_path("corpus", "corpus.txt")
    data = corpus.read_bytes()[:CORPUS_BYTES]
    paragraphs = [p for p in data.split(b"\n\n") if p.strip()]
    return paragraphs, f"the first {len(data)} bytes of the shipped corpus ({corpus.name})"


def fmt_share(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


__all__ = ["compat_report", "CompatReport", "Coverage", "Mass", "Step", "coverage", "value_mass",
           "RULE_EXACT", "RULE_FIRST_PIECE", "RULE_END_ROLE"]
