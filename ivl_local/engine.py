"""The Engine: a base model and a value model decoding in lockstep, fused in C++.

    with Engine("gemma3-270m", "my-value.ivl.gguf") as engine:
        for delta in engine.generate("The capital of France is", max_tokens=32):
            print(delta, end="", flush=True)
        print(engine.stats)

One step of `generate`:

    base logits (float*, zero-copy) ─┐
                                     ├─ _core.fuse_and_sample ─► token ─► text delta (UTF-8 safe)
    value logits (float*, zero-copy) ┘      base + alpha*w*value[map]        │
                                                                             ▼
    decode the token in the base; the value reads the same text (same token, or TextSync)

`value=None` (or alpha 0) runs the very same path with a zero contribution. Both KV caches
persist between calls: a new prompt that extends the previous one (multi-turn chat) only
decodes its new suffix. An interruption (Ctrl-C) anywhere leaves the caches consistent.

Threads (ivl_local/guard.py): one generation at a time per Engine — another thread starting
one meanwhile gets EngineBusyError; `close()` from any thread stops a generation at its next
token (or prefill chunk) before anything is freed; every call after `close()` raises
EngineClosedError. `cancel()` from any thread stops the generation in progress at its next
token and leaves the engine open.

Engines given one `ModelRegistry` (ivl_local/registry.py, `models=`) share each file's loaded
weights, each with its own contexts (the server's generation slots).
"""

from __future__ import annotations

import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .backend import Context, Model, logits_view
from . import chat
from .chat import chat_stops
from .chat_template import render_messages
from .config import (VALUE_PROMPTS, EngineConfig, SamplingConfig, check_alpha, check_flag,
                     check_max_tokens, default_threads)
from .detok import Detokenizer
from .errors import (ConfigError, ContextOverflowError, EmptyPromptError, EngineClosedError,
                     GenerationCancelled, GenerationSuperseded, InvalidLogitsError,
                     VocabMismatchError)
from .guard import Guard
from .models import resolve_model
from .registry import ModelRegistry
from .speculative import (DRAFT_MODEL_OVERHEAD, NGRAM, VERIFY_COST, DraftLength, ModelDrafter,
                          NgramDrafter, accept_or_resample, check_draft)
from .sync import CandidateScorer, FixedPrompt, KVSequence, LogProbProjection, TextSync
from .terms import (BASE, CFG, DEFAULT_CANDIDATES_K, LOG_SOFTMAX, MAX_PARTS, PROJECTION_MODES, RAW, SPECS,
                    Contrastive, Proxy, Source, Term, ValueNet, check_candidates_k, check_map_mode,
                    refuse_candidates_with_draft)
from .valuefile import ValueFileInfo, read_gguf_header, value_info_from_header
from .vocab import TokenMapping, read_vocab, resolve_mapping, stored_alpha_for

log = logging.getLogger(__name__)

NO_VALUE = ("none", "off", "")


def _wants_value(value) -> bool:
    """A value network was asked for (None, "none", "off" and "" mean the base alone)."""
    return value is not None and str(value).lower() not in NO_VALUE


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0          # decoding the (new part of the) prompt, both models
    decode_s: float = 0.0           # the token loop (after prefill)
    base_decode_s: float = 0.0      # all llama_decode time in the base (prefill included)
    value_decode_s: float = 0.0     # same for the value model (text sync included)
    fuse_sample_s: float = 0.0      # _core.fuse_and_sample calls
    tokens_per_s: float = 0.0       # completion_tokens / decode_s
    time_to_first_token_s: float = 0.0
    context_used: int = 0
    n_ctx: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "interrupted" (Ctrl-C, closed, superseded)
    reused_prompt_tokens: int = 0   # prompt tokens already in the base cache
    drafted: int = 0                # speculative decoding: drafted tokens verified
    accepted: int = 0               # ... of which accepted
    acceptance_rate: float = 0.0    # accepted / drafted

    def as_dict(self) -> dict:
        return asdict(self)


class _StopStrings:
    """Withholds text that may be the start of a stop string; cuts at the first match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class Engine:
    """Base model + optional value model; see the module docstring and docs/ARCHITECTURE.md."""

    def __init__(self, base, value=None, alpha: float | None = None, *, terms=(), n_ctx: int = 2048,
                 n_threads: int | None = None, n_batch: int = 512, seed: int = 0,
                 token_map=None, concurrent: bool | None = None, verbose: bool = False,
                 value_prompt: str = "own", models: ModelRegistry | None = None,
                 draft=None, draft_max: int = 8, draft_min: int = 0, map_mode: str = "raw",
                 candidates_k: int = DEFAULT_CANDIDATES_K):
        if models is not None and not isinstance(models, ModelRegistry):
            raise ConfigError(f"models must be a ModelRegistry, got {type(models).__name__}")
        self._registry = models if models is not None else ModelRegistry()  # private: freed at close
        if value_prompt not in VALUE_PROMPTS:
            raise ConfigError(f"value_prompt must be one of {', '.join(VALUE_PROMPTS)}, got {value_prompt!r}")
        terms = list(terms)
        bad = [t for t in terms if not isinstance(t, SPECS)]
        if bad:
            raise ConfigError(f"terms must be ValueNet, Proxy, CFG or Contrastive specs, got {bad[0]!r}")
        self.value_prompt = value_prompt
        map_mode = check_map_mode(map_mode)
        candidates_k = check_candidates_k(candidates_k)
        for mode in [map_mode] * _wants_value(value) + [t.map_mode for t in terms if isinstance(t, ValueNet)]:
            refuse_candidates_with_draft(mode, draft)
        config = EngineConfig(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads or default_threads(),
                              alpha=1.0 if alpha is None else alpha, seed=seed,
                              draft_max=draft_max, draft_min=draft_min)
        draft = check_draft(draft)
        self._config = config
        self._seed = seed
        self._calls = 0
        self._guard = Guard("this Engine")
        self._pool: ThreadPoolExecutor | None = None
        self._models: dict[Path, Model] = {}     # one llama.cpp model per file, held in _registry
        self._contexts: list[Context] = []
        self._terms: list[Term] = []
        self._value_term: Term | None = None      # the `value` argument (alpha is its weight)
        self._alpha = config.alpha
        self._base_model = self._value_model = None
        self._base_ctx = self._value_ctx = None
        self._last_completion_tokens: list[int] = []
        self.stats = GenerationStats(n_ctx=n_ctx)
        self._drafter = None   # speculative decoding: NgramDrafter | ModelDrafter

        try:
            self._load(base, value, alpha, terms, config, token_map, concurrent, verbose,
                       map_mode, candidates_k)
            if draft is not None:
                self._drafter = self._load_drafter(draft)
        except BaseException:
            self.close()  # free whatever was loaded before the failure, now
            raise

    def _load(self, base, value, alpha, terms, config: EngineConfig, token_map, concurrent, verbose,
              map_mode: str = "raw", candidates_k: int = DEFAULT_CANDIDATES_K) -> None:
        self._verbose = verbose
        self.base_path = resolve_model(base)
        base_header = read_gguf_header(self.base_path)
        self._base_vocab_data = read_vocab(base_header)
        self._base_model = self._model(self.base_path)
        self._base_vocab = self._base_model.vocab
        self._base_ctx = self._context(self._base_model, config.n_ctx)
        # llama.cpp rounds the window up (to 256); the engine keeps to the one asked for
        self._n_ctx = min(config.n_ctx, self._base_ctx.n_ctx)
        self.stats.n_ctx = self._n_ctx
        self._base = KVSequence(self._base_ctx, checkpoint=self._guard.check)
        self._chat_template = base_header.get("tokenizer.chat_template")
        self._eos_text = self._base_vocab.eos_text

        self.value_path: Path | None = None
        self.value_info: ValueFileInfo | None = None
        self.mapping: TokenMapping | None = None
        self._value = None
        if _wants_value(value):
            self._value_term = self._load_value(ValueNet(value, alpha, token_map, map_mode, candidates_k),
                                                primary=True)
            self._terms.append(self._value_term)
        for spec in terms:
            self._terms.append(self._load_term(spec))
        n_parts = sum(len(term.parts) + sum(s.extra_parts for s in term.sources) for term in self._terms)
        if n_parts > MAX_PARTS:
            raise ConfigError(f"these terms add {n_parts} logit vectors per step, at most {MAX_PARTS} "
                              f"can be fused (a value net counts 1; across vocabularies up to 3 in "
                              f"map_mode 'candidates' or 'shared', 2 in 'logprob'; proxy-tuning, CFG "
                              f"and contrastive 2)")
        self.value_enabled = self.has_value
        self._scratch = np.empty(self._base_vocab.n_tokens, dtype=np.float32)
        self.concurrent = bool(concurrent) and bool(self._sources())
        if self.concurrent:
            self._setup_concurrency(config.n_threads)

    # --- loading ----------------------------------------------------------------------------

    def _model(self, path: Path) -> Model:
        key = self._registry.key(path)   # one llama.cpp model per file, however it is spelled
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = self._registry.acquire(path, verbose=self._verbose)
        return model

    def _context(self, model: Model, n_ctx: int) -> Context:
        config = self._config
        ctx = Context(model, n_ctx=n_ctx, n_batch=config.n_batch, n_threads=config.n_threads)
        self._contexts.append(ctx)
        return ctx

    def _source(self, name: str, model_ref, token_map=None, *, header=None) -> Source:
        """A context on `model_ref` that follows the base's text: the same tokens when it
        shares the base's vocabulary, else text sync through a token map."""
        path = resolve_model(model_ref)
        header = header or read_gguf_header(path)
        model = self._model(path)
        vocab = model.vocab
        mapping = resolve_mapping(
            self._base_vocab_data, read_vocab(header),
            lambda text: vocab.tokenize(text, add_special=False, parse_special=False), map_path=token_map)
        n_ctx = self._config.n_ctx
        if mapping.identity:
            ctx = self._context(model, n_ctx)
            return Source(name, ctx, KVSequence(ctx, checkpoint=self._guard.check), mapping=mapping)
        # The other vocabulary's tokenization of the same text may be longer than the base's.
        ctx = self._context(model, min(2 * n_ctx, max(n_ctx, model.n_ctx_train)))
        return Source(name, ctx, TextSync(vocab, ctx, checkpoint=self._guard.check), mapping=mapping,
                      template=header.get("tokenizer.chat_template"), eos_text=vocab.eos_text)

    def _load_value(self, spec: ValueNet, primary: bool = False) -> Term:
        path = resolve_model(spec.model)
        header = read_gguf_header(path)
        info = value_info_from_header(header)
        if info.training_base_fingerprint and info.training_base_fingerprint != self._base_vocab_data.fingerprint:
            log.info("value network %s was trained against %s (another vocabulary): transferring "
                     "across vocabularies", path.name, info.training_base_name)
        source = self._source(path.name, path, spec.token_map, header=header)
        source.reads_own_chat = not source.mapping.identity
        transform = RAW
        if spec.map_mode == "candidates" and not source.mapping.identity:
            # normalised contributions, whole-text scores for the base's best tokens (sync.py)
            source.scorer = CandidateScorer(source.follower, spec.candidates_k, self._base_vocab_data,
                                            read_vocab(header), source.mapping.token_map)
            transform = LOG_SOFTMAX
        elif spec.map_mode in PROJECTION_MODES and not source.mapping.identity:
            source.projection = LogProbProjection(source.mapping.token_map, source.ctx.n_vocab,
                                                  shared=spec.map_mode == "shared")
            transform = LOG_SOFTMAX
        term = Term("value", path.name, [(source, 1.0, transform)], spec=spec)
        # alpha: the caller's, else this base's stored with the token map (ivl compat
        # --store-alpha: chosen for this base), else the value file's default
        if spec.weight is not None:
            term.weight = spec.weight   # checked as alpha
        elif (stored := stored_alpha_for(source.mapping, self.base_path)) is not None:
            term.weight = stored
            log.info("value network %s: alpha %g, stored with the token map for this base", path.name, stored)
        else:
            term.weight = info.default_alpha
        if primary:
            self.value_path, self.value_info, self.mapping = path, info, source.mapping
            self._value, self._value_ctx, self._value_model = source.follower, source.ctx, source.ctx.model
        return term

    def _load_term(self, spec) -> Term:
        if isinstance(spec, ValueNet):
            return self._load_value(spec)
        if isinstance(spec, Proxy):
            expert = self._source("expert", spec.expert, spec.token_map)
            anti = self._source("anti-expert", spec.anti_expert, spec.token_map)
            if expert.mapping.value_fingerprint != anti.mapping.value_fingerprint:
                raise VocabMismatchError("proxy-tuning's expert and anti-expert must share one vocabulary "
                                         "(the expert is a tuned copy of the anti-expert)")
            return Term("proxy", "proxy", [(expert, 1.0, LOG_SOFTMAX), (anti, -1.0, LOG_SOFTMAX)],
                        _weight=spec.weight, spec=spec)
        if isinstance(spec, CFG):
            vocab = self._base_vocab
            negative = vocab.tokenize(spec.negative_prompt, add_special=True, parse_special=False)
            if not negative:   # no BOS added and no text: start after an end of text
                start = vocab.eos if vocab.eos >= 0 else vocab.bos
                if start < 0:
                    raise ConfigError("this base model has no BOS or EOS token; give CFG a negative prompt")
                negative = [start]
            if len(negative) >= self._n_ctx:
                raise ContextOverflowError(f"CFG's negative prompt is {len(negative)} tokens; the context "
                                           f"window is {self._n_ctx}: shorten it")
            # the negative prompt, then as long an answer as the base's window allows
            # (the prompt is at least one token, so the answer is at most n_ctx - 1)
            ctx = self._context(self._base_model, self._config.n_ctx - 1 + len(negative))  # same weights
            uncond = Source("cfg-negative", ctx, FixedPrompt(ctx, negative, checkpoint=self._guard.check))
            return Term("cfg", "cfg", [(BASE, 1.0, RAW), (uncond, -1.0, RAW)], _weight=spec.scale, spec=spec)
        amateur = self._source("amateur", spec.amateur, spec.token_map)
        return Term("contrastive", "contrastive", [(BASE, 1.0, LOG_SOFTMAX), (amateur, -1.0, LOG_SOFTMAX)],
                    _weight=spec.beta, mask_alpha=float(spec.alpha), spec=spec)

    def _load_drafter(self, draft):
        """Prompt lookup, or a draft model that must share the base's vocabulary (its drafts
        are base token ids)."""
        if self._config.draft_max >= self._base_ctx.n_batch:
            raise ConfigError(f"draft_max ({self._config.draft_max}) must be below n_batch "
                              f"({self._base_ctx.n_batch}): the drafts are verified in one batch")
        if draft == NGRAM:
            return NgramDrafter()
        from . import _core

        path = resolve_model(draft)
        header = read_gguf_header(path)
        if read_vocab(header).fingerprint != self._base_vocab_data.fingerprint:
            raise VocabMismatchError(f"the draft model {path.name} has another vocabulary than the base "
                                     f"{self.base_path.name}: a draft model must share the base's tokenizer")
        model = self._model(path)
        seq = KVSequence(self._context(model, self._config.n_ctx), checkpoint=self._guard.check)
        greedy = _core.Sampler(0.0, 0, 1.0, 0.0, 1.0, 0, 0.0, 0.0, 0)
        return ModelDrafter(seq, greedy, cost=0.0)   # its cost is set per generation (_draft_length)

    def _draft_length(self, sources: list[Source]) -> DraftLength:
        """The adaptive draft length for one generation; a draft model's decode is priced by
        its size against the models a plain step decodes (decode is memory-bound)."""
        drafter, config = self._drafter, self._config
        if isinstance(drafter, ModelDrafter):
            step_bytes = self._base_model.size_bytes + sum(s.ctx.model.size_bytes for s in sources)
            drafter.cost = DRAFT_MODEL_OVERHEAD * drafter.seq.ctx.model.size_bytes / step_bytes
        return DraftLength(config.draft_max, config.draft_min, VERIFY_COST + drafter.cost)

    @property
    def draft(self) -> str | None:
        """Speculative decoding's drafter: "ngram", the draft model's file name, or None."""
        if isinstance(self._drafter, ModelDrafter):
            return self._drafter.seq.ctx.model.path.name
        return NGRAM if self._drafter is not None else None

    def _sources(self, terms=None) -> list[Source]:
        seen: dict[int, Source] = {}
        for term in self._terms if terms is None else terms:
            for source in term.sources:
                seen.setdefault(id(source), source)
        return list(seen.values())

    def _setup_concurrency(self, n_threads: int) -> None:
        """Split the cores between the decodes, roughly by model size (decode cost); each
        term's context decodes on its own worker thread while the base decodes."""
        contexts = [self._base_ctx] + [s.ctx for s in self._sources()]
        sizes = [c.model.size_bytes for c in contexts]
        for ctx, size in zip(contexts, sizes):
            ctx.set_threads(max(1, min(n_threads - 1, round(n_threads * size / sum(sizes)))))
        self._pool = ThreadPoolExecutor(max_workers=len(contexts) - 1, thread_name_prefix="ivl-term")

    # --- public properties ------------------------------------------------------------------

    @property
    def has_value(self) -> bool:
        return any(term.kind == "value" for term in self._terms)

    @property
    def terms(self) -> list[Term]:
        """The loaded terms in order; each has a live, validated `.weight`."""
        return list(self._terms)

    @property
    def identity_vocab(self) -> bool:
        return self.mapping is None or self.mapping.identity

    @property
    def n_ctx(self) -> int:
        """The context window in tokens (a number: still readable after close())."""
        return self._n_ctx

    @property
    def alpha(self) -> float:
        """The value network's scale, in [0, ALPHA_MAX]; read at every token, so it can be
        changed live (from any thread)."""
        return self._value_term.weight if self._value_term is not None else self._alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._guard.check()
        self._alpha = check_alpha(value)
        if self._value_term is not None:
            self._value_term.weight = self._alpha

    @property
    def value_enabled(self) -> bool:
        """False runs the base alone (the value model's cache catches up when re-enabled)."""
        return self._value_enabled

    @value_enabled.setter
    def value_enabled(self, value) -> None:
        self._guard.check()
        self._value_enabled = check_flag(value, "value_enabled")

    @property
    def closed(self) -> bool:
        return self._guard.closed

    def tokenize(self, text: str) -> list[int]:
        with self._guard.work():
            return self._base_vocab.tokenize(text, add_special=True, parse_special=True)

    def render_chat(self, messages: list[dict]) -> str:
        self._guard.check()
        return render_messages(messages, self._chat_template, bos_token="", eos_token=self._eos_text)

    # --- generation -------------------------------------------------------------------------

    def generate(self, prompt: str, max_tokens: int | None = 256, sampling: SamplingConfig | None = None,
                 stop: list[str] | str | None = None, *, value_prompt: str | None = None) -> Iterator[str]:
        """Text deltas. Arguments are checked now; decoding starts at the first next().
        `value_prompt`: the text a cross-vocabulary value model reads instead of `prompt`
        (chat passes the conversation in the value's own format); the answer is appended to both.
        Raises EngineClosedError after close(), EngineBusyError while another thread's
        generation is in progress (checked again when decoding starts)."""
        self._guard.check_available()
        if not isinstance(prompt, str) or not prompt.strip():
            raise EmptyPromptError("the prompt is empty")
        max_tokens = check_max_tokens(max_tokens)
        if sampling is not None and not isinstance(sampling, SamplingConfig):
            raise ConfigError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        tokens = self.tokenize(prompt)
        limit = self.n_ctx if max_tokens is None else len(tokens) + max_tokens
        if len(tokens) >= self.n_ctx or limit > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens; with max_tokens={max_tokens} it needs {limit} "
                f"but the context window is {self.n_ctx}: shorten the prompt or the conversation, "
                f"lower max_tokens, or raise n_ctx")
        stops = _stop_list(stop)
        if value_prompt is not None and not isinstance(value_prompt, (str, dict)):
            raise ConfigError(f"value_prompt must be text, got {type(value_prompt).__name__}")
        # What each context with another vocabulary reads: a value net its `value_prompt`
        # (chat: the conversation in its own format), anything else the prompt's text. A
        # context sharing the base's vocabulary reads the base's tokens.
        texts = {}
        for source in self._sources():
            own = value_prompt.get(id(source)) if isinstance(value_prompt, dict) else value_prompt
            texts[id(source)] = own if (own is not None and source.reads_own_chat) else prompt
        return self._run(texts, tokens, max_tokens, sampling or SamplingConfig(), stops)

    def complete(self, prompt: str, max_tokens: int | None = 256, sampling: SamplingConfig | None = None,
                 stop: list[str] | str | None = None) -> str:
        return "".join(self.generate(prompt, max_tokens, sampling, stop))

    def _sampling_seed(self, sampling: SamplingConfig) -> int:
        return sampling.seed if sampling.seed is not None else (self._seed + self._calls) & 0xFFFFFFFF

    def _make_sampler(self, sampling: SamplingConfig):
        from . import _core

        seed = self._sampling_seed(sampling)
        return _core.Sampler(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                             sampling.repeat_penalty, sampling.repeat_last_n,
                             sampling.presence_penalty, sampling.frequency_penalty, seed)

    def _run(self, texts: dict[int, str], prompt_tokens: list[int], max_tokens: int | None,
             sampling: SamplingConfig, stops: list[str]) -> Iterator[str]:
        ticket = self._guard.claim()   # at the first next(): EngineBusyError / EngineClosedError
        try:
            yield from self._decode_loop(ticket, texts, prompt_tokens, max_tokens, sampling, stops)
        finally:
            self._guard.release(ticket)

    def _decode_loop(self, ticket: int, texts: dict[int, str], prompt_tokens: list[int],
                     max_tokens: int | None, sampling: SamplingConfig, stops: list[str]) -> Iterator[str]:
        """The token loop. llama.cpp runs only inside `work(ticket)` blocks; text is yielded
        outside them, so close() from another thread never waits on a slow consumer."""
        work = self._guard.work
        self._calls += 1
        stats = GenerationStats(prompt_tokens=len(prompt_tokens), n_ctx=self.n_ctx)
        self.stats = stats
        # A term at weight 0 at the start is not run (its caches catch up at the next call);
        # value_enabled False leaves out the value networks.
        active = [t for t in self._terms if t.weight != 0.0 and (t.kind != "value" or self.value_enabled)]
        sources = self._sources(active)
        sampler = self._make_sampler(sampling)
        for t in prompt_tokens[-sampling.repeat_last_n:] if sampling.repeat_last_n else []:
            sampler.accept(t)
        vocab = self._base_vocab
        detok = Detokenizer(vocab.piece)  # the prompt precedes: no leading-space rule
        stopper = _StopStrings(stops)
        completion: list[int] = []
        self._last_completion_tokens = completion
        spec = None
        if self._drafter is not None:
            spec = _Speculation(self._drafter, self._draft_length(sources),
                                np.random.default_rng(self._sampling_seed(sampling)), detok)
            self._drafter.start(prompt_tokens)
        t_start = time.perf_counter()
        try:
            with work(ticket):
                # Interrupted calls may leave decoded-but-unrecorded positions: trim them first.
                self._base.repair()
                for source in sources:
                    source.follower.repair()
                if isinstance(self._drafter, ModelDrafter):
                    self._drafter.seq.repair()
                stats.reused_prompt_tokens = self._prefill(texts, prompt_tokens, sources, stats)
            t_loop = time.perf_counter()
            stats.prefill_s = t_loop - t_start
            stopped, finished = False, False
            token, released = None, ""
            while not finished:
                with work(ticket):
                    if token is None:
                        new = [self._sample(sampler, active, 0, stats)]
                        stats.time_to_first_token_s = time.perf_counter() - t_start
                    else:
                        # Feed the last token to every model and sample the next: with drafts,
                        # several positions verified in one batch give one token or more.
                        try:
                            new = self._step(token, released, sources, active, sampler, stats, spec,
                                             prompt_tokens, completion, max_tokens)
                        except ContextOverflowError:  # a term's context filled its window first
                            stats.finish_reason = "length"
                            break
                    out = []   # (token, released text): the detokenizer reads the vocabulary
                    for new_token in new:
                        if vocab.is_eog(new_token):
                            stats.finish_reason = "stop"
                            finished = True
                            break
                        out.append((new_token, detok.push(new_token)))
                for token, released in out:
                    completion.append(token)
                    stats.completion_tokens = len(completion)
                    text, stopped = stopper.feed(released)
                    if text:
                        yield text
                    if stopped:
                        stats.finish_reason = "stop"
                        break
                    if max_tokens is not None and len(completion) >= max_tokens:
                        stats.finish_reason = "length"
                        break
                    if len(prompt_tokens) + len(completion) > self.n_ctx:  # no room to feed it
                        stats.finish_reason = "length"
                        break
                else:
                    continue
                break
            stats.decode_s = time.perf_counter() - t_loop
            if not stopped:  # EOG or length: release what the stop check held back
                tail, _ = stopper.feed(detok.flush())
                tail += stopper.flush()
                if tail:
                    yield tail
        except (KeyboardInterrupt, GeneratorExit, EngineClosedError, GenerationSuperseded,
                GenerationCancelled):
            stats.finish_reason = stats.finish_reason or "interrupted"
            raise
        finally:
            stats.context_used = len(self._base)
            if stats.decode_s == 0.0 and stats.prefill_s:
                stats.decode_s = time.perf_counter() - t_start - stats.prefill_s
            if stats.decode_s > 0:
                stats.tokens_per_s = stats.completion_tokens / stats.decode_s
            if stats.drafted:
                stats.acceptance_rate = stats.accepted / stats.drafted

    def _step(self, token: int, released: str, sources: list[Source], active: list[Term], sampler,
              stats: GenerationStats, spec: "_Speculation | None", prompt_tokens: list[int],
              completion: list[int], max_tokens: int | None) -> list[int]:
        """Feed `token` (the last one sampled) to every model, then sample: one token, or with
        drafts the run of positions up to the first that differs from its draft, plus the
        token sampled there (ivl_local/speculative.py)."""
        drafts = []
        if spec is not None:
            # room: the answer's remaining tokens, and positions left in the base's window
            left = self.n_ctx - len(prompt_tokens) - len(completion)
            if max_tokens is not None:
                left = min(left, max_tokens - len(completion))
            k = min(spec.length.next(), left - 1)
            if k > 0:
                drafts = spec.drafter.propose(prompt_tokens + completion, k)[:k]
                for i, draft in enumerate(drafts):   # nothing is verified past an end of text
                    if self._base_vocab.is_eog(draft):
                        del drafts[i + 1:]
                        break
        if not drafts:
            if spec is not None:
                spec.length.update(0, 0)
            self._advance(token, sources, released, stats)
            return [self._sample(sampler, active, len(completion), stats)]

        texts = [released.encode("utf-8")] + spec.texts(drafts)
        n = len(drafts) + 1
        for source in sources:
            n = min(n, source.follower.plan(texts[:n]))
        batch = [token] + drafts[:n - 1]
        jobs = [lambda s=s: s.follower.verify(batch, texts[:n]) for s in sources]
        self._lockstep(lambda: self._base.verify(batch, texts[:n]), jobs, stats)
        out: list[int] = []
        for j in range(n):
            draft = drafts[j] if j < len(drafts) else None
            out.append(self._sample(sampler, active, len(completion) + j, stats, position=j,
                                    draft=draft, rng=spec.rng))
            if out[-1] != draft:
                break
        drafted = min(len(drafts), n)
        accepted = sum(1 for got, want in zip(out, drafts) if got == want)
        stats.drafted += drafted
        stats.accepted += accepted
        spec.length.update(drafted, accepted)
        self._base.keep(len(out))   # the inputs of the positions used; the rest roll back
        for source in sources:
            source.follower.keep(len(out))
        return out

    def _sample(self, sampler, active: list[Term], step: int, stats: GenerationStats,
                position: int | None = None, draft: int | None = None, rng=None) -> int:
        """Fuse the base's logits with every active term's (weights read now, so they can
        change live) and draw a token, accepted into the sampler's penalty history.
        `position`: of a verification batch (else the last decode's logits); `draft`: the
        drafted token there, judged by the speculative rule when sampling (greedy: argmax).
        A value net in map_mode "candidates" first scores the base's best tokens
        (sync.CandidateScorer): its part reads the value's log-softmax, and a second part adds
        the whole-text log-probability of each scored token (whose map entry is off meanwhile)."""
        t0 = time.perf_counter()
        at = (lambda follower: follower.logits_at(position)) if position is not None else None
        base_ptr, n_base = (self._base_ctx.logits_ptr() if at is None else at(self._base)), self._base_vocab.n_tokens
        parts, mask, scorers, scoring_s = [], 0.0, [], 0.0
        try:
            for term in active:
                weight = term.weight
                if weight == 0.0:
                    continue
                for source, sign, transform in term.parts:
                    if source is BASE:
                        parts.append((base_ptr, n_base, None, None, sign * weight, transform))
                    elif source.scorer is not None:   # map_mode "candidates" (no drafts: refused)
                        assert at is None, "candidate scoring does not run on verification batches"
                        scorer = source.scorer
                        t1 = time.perf_counter()
                        scorers.append(scorer)
                        n = scorer.score(logits_view(base_ptr, n_base))
                        scoring_s += time.perf_counter() - t1
                        parts.append((scorer.logits_ptr(), scorer.n_value, scorer.map_a,
                                      source.token_weights, sign * weight, transform))
                        if n:
                            parts.append((scorer.scores_ptr, n, scorer.map_b, None, sign * weight, RAW))
                        parts += scorer.neutral_parts(sign * weight)
                    else:
                        ptr = source.ctx.logits_ptr() if at is None else at(source.follower)
                        parts.append((ptr, source.ctx.n_vocab, source.token_map,
                                      source.token_weights, sign * weight, transform))
                        if source.projection is not None:   # map_mode "logprob" / "shared"
                            parts += source.projection.extra_parts(ptr, sign * weight, base_ptr=base_ptr)
                mask = max(mask, term.mask_alpha)
            token = self._fuse_and_sample(sampler, base_ptr, n_base, parts, mask, step, draft, rng)
        finally:
            for scorer in scorers:
                scorer.restore()
        sampler.accept(token)
        stats.value_decode_s += scoring_s    # the value model's scoring decodes
        stats.fuse_sample_s += time.perf_counter() - t0 - scoring_s
        return token

    def _fuse_and_sample(self, sampler, base_ptr: int, n_base: int, parts: list, mask: float, step: int,
                         draft: int | None, rng) -> int:
        from . import _core

        try:
            if draft is None or sampler.greedy:
                token = _core._fuse_terms_and_sample(sampler, base_ptr, n_base, parts, mask, self._scratch)
            else:
                fused = _core.fuse_terms(logits_view(base_ptr, n_base),
                                         [(logits_view(ptr, n), *rest) for ptr, n, *rest in parts], mask)
                ids, probs = sampler.probs(fused)
                token = accept_or_resample(ids, probs, draft, rng)
        except ValueError as e:
            raise InvalidLogitsError(f"cannot sample: {e} (step {step}); the model file may "
                                     f"be corrupt or a weight too large") from None
        return token

    def _prefill(self, texts: dict[int, str], prompt_tokens: list[int], sources: list[Source],
                 stats: GenerationStats) -> int:
        """Bring every cache to the prompt, reusing common prefixes; returns base tokens reused."""
        jobs = [lambda s=s: s.follower.start(prompt_tokens, texts[id(s)].encode("utf-8")) for s in sources]
        return self._lockstep(lambda: self._base.sync_to(prompt_tokens), jobs, stats)

    def _advance(self, token: int, sources: list[Source], released: str, stats: GenerationStats) -> None:
        """Feed the sampled token to every model (one with another vocabulary reads the text
        the detokenizer released: complete characters only)."""
        text = released.encode("utf-8")
        jobs = [lambda s=s: s.follower.feed(token, text) for s in sources]
        self._lockstep(lambda: self._base.append([token]), jobs, stats)

    def _lockstep(self, base_job, jobs: list, stats: GenerationStats):
        """Run the base's decode and the terms' (one after the other, or the terms' on worker
        threads while the base decodes); returns the base job's result."""
        futures = []
        if self._pool is not None and jobs:
            try:
                futures = [self._pool.submit(_timed, job) for job in jobs]
            except RuntimeError:   # the interpreter is exiting: its pools take no more work
                futures = []
        t0 = time.perf_counter()
        if futures:
            try:
                result = base_job()
            finally:
                stats.base_decode_s += time.perf_counter() - t0
                results = _join_all(futures)  # never leave a decode running
            stats.value_decode_s += sum(seconds for _, seconds in results)
            return result
        result = base_job()
        t1 = time.perf_counter()
        for job in jobs:
            job()
        stats.base_decode_s += t1 - t0
        stats.value_decode_s += time.perf_counter() - t1
        return result

    # --- chat (the format lives in ivl_local/chat.py) ---------------------------------------

    def render_value_chat(self, messages: list[dict]) -> str | None:
        """The conversation as a cross-vocabulary value model reads it: in its own chat format
        (the template its value file carries, else the fallback), the format it was trained on.
        None when the value model shares the base's vocabulary (it reads the base's tokens) or
        value_prompt is "base"."""
        self._guard.check()
        if self._value_term is None or self.identity_vocab or self.value_prompt != "own":
            return None
        return self._render_own(self._value_term.sources[0], messages)

    def _render_own(self, source: Source, messages: list[dict]) -> str:
        return render_messages(messages, source.template, bos_token="", eos_token=source.eos_text)

    def generate_chat(self, messages: list[dict], max_tokens: int | None = 256,
                      sampling: SamplingConfig | None = None, stop=None) -> Iterator[str]:
        """generate() on the rendered conversation (each model in its format), with the stop
        strings the format needs; the raw deltas, leading whitespace included."""
        own = {}
        if self.value_prompt == "own":
            own = {id(s): self._render_own(s, messages) for s in self._sources() if s.reads_own_chat}
        return self.generate(self.render_chat(messages), max_tokens, sampling,
                             chat_stops(self._chat_template, _stop_list(stop)), value_prompt=own)

    def chat_deltas(self, messages: list[dict], max_tokens: int | None = 256,
                    sampling: SamplingConfig | None = None, stop=None) -> Iterator[str]:
        """The assistant's answer as text deltas (what the CLI streams)."""
        return chat.chat_deltas(self, messages, max_tokens, sampling, stop)

    def chat(self, messages: list[dict], stream: bool = False, max_tokens: int | None = 256,
             sampling: SamplingConfig | None = None, stop=None):
        """OpenAI-style chat.completion dict, or an iterator of chat.completion.chunk dicts."""
        if stream:
            return chat.chat_chunks(self, messages, max_tokens, sampling, stop)
        return chat.chat_completion(self, messages, max_tokens, sampling, stop)

    @property
    def model_name(self) -> str:
        name = self.base_path.name
        return f"{name}+{self.value_path.name}" if self.value_path else name

    def clear_cache(self) -> None:
        """Forget both KV caches (the next call decodes its whole prompt).

        Logits of a prompt decoded in one batch and of the same prompt decoded in pieces
        (prefix reuse) can differ in the last bits (llama.cpp's batched kernels), which may
        flip a greedy near-tie; clear the cache for bit-reproducible runs."""
        self._guard.check_available()      # at once, not after another thread's prefill
        with self._guard.work():
            self._guard.check_not_owned_elsewhere()  # none claimed since the check above
            self._base.reset()
            for source in self._sources():
                source.follower.reset()
            if isinstance(self._drafter, ModelDrafter):
                self._drafter.seq.reset()

    # --- lifetime ---------------------------------------------------------------------------

    def cancel(self) -> bool:
        """Stop the generation in progress (from any thread) at its next token or prefill
        chunk: its next() raises GenerationCancelled; the engine stays open and its caches
        consistent. False when no generation is in progress (nothing to cancel)."""
        return self._guard.cancel()

    def close(self) -> None:
        """Free both models. Safe from any thread and more than once: a generation running
        on another thread stops at its next token (its next() raises EngineClosedError)
        before anything is freed; every later call raises EngineClosedError."""
        guard = getattr(self, "_guard", None)
        if guard is not None:
            guard.close(self._free)

    def _free(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for ctx in reversed(self._contexts):   # contexts first: they use the models
            ctx.close()
        for model in self._models.values():    # freed by their last user
            self._registry.release(model)
        self._contexts, self._models = [], {}
        self._base_ctx = self._value_ctx = self._base_model = self._value_model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self, _finalizing=sys.is_finalizing):
        if _finalizing():   # llama_cpp may be gone: the process is ending (backend._Owned)
            return
        try:
            self.close()
        except Exception:
            pass


class _Speculation:
    """One generation's speculative state: drafter, adaptive length, the draws' RNG."""

    def __init__(self, drafter, length: DraftLength, rng: np.random.Generator, detok: Detokenizer):
        self.drafter, self.length, self.rng, self._detok = drafter, length, rng, detok

    def texts(self, drafts: list[int]) -> list[bytes]:
        """What each draft would release after the tokens emitted so far."""
        detok = self._detok.fork()
        return [detok.push(t).encode("utf-8") for t in drafts]


def _stop_list(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}")
    return list(stops)


def _join_all(futures) -> list:
    """Every future's result, each awaited even when another raised (a context must not be
    touched, or freed, while its decode runs on a worker); then the first error is raised."""
    results, error = [], None
    for future in futures:
        try:
            results.append(_join(future))
        except BaseException as e:
            error = error or e
    if error is not None:
        raise error
    return results


def _join(future):
    """future.result(), riding out Ctrl-C: the value context must not be touched (or freed)
    while its decode still runs on the worker thread."""
    interrupted = None
    while True:
        try:
            result = future.result()
            break
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted
    return result


def _timed(job):
    t0 = time.perf_counter()
    result = job()
    return result, time.perf_counter() - t0
