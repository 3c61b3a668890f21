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
EngineClosedError.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .backend import Context, Model
from . import chat
from .chat import chat_stops
from .chat_template import render_messages
from .config import (VALUE_PROMPTS, EngineConfig, SamplingConfig, check_alpha, check_flag,
                     check_max_tokens, default_threads)
from .detok import Detokenizer
from .errors import (ConfigError, ContextOverflowError, EmptyPromptError, EngineClosedError,
                     GenerationSuperseded, InvalidLogitsError)
from .guard import Guard
from .models import resolve_model
from .sync import KVSequence, TextSync
from .valuefile import ValueFileInfo, read_gguf_header, value_info_from_header
from .vocab import TokenMapping, read_vocab, resolve_mapping

log = logging.getLogger(__name__)

NO_VALUE = ("none", "off", "")


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

    def __init__(self, base, value=None, alpha: float | None = None, *, n_ctx: int = 2048,
                 n_threads: int | None = None, n_batch: int = 512, seed: int = 0,
                 token_map=None, concurrent: bool | None = None, verbose: bool = False,
                 value_prompt: str = "own"):
        if value_prompt not in VALUE_PROMPTS:
            raise ConfigError(f"value_prompt must be one of {', '.join(VALUE_PROMPTS)}, got {value_prompt!r}")
        self.value_prompt = value_prompt
        self._value_template: str | None = None
        self._value_eos_text = ""
        config = EngineConfig(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads or default_threads(),
                              alpha=1.0 if alpha is None else alpha, seed=seed)
        self._config = config
        self._seed = seed
        self._calls = 0
        self._guard = Guard("this Engine")
        self._pool: ThreadPoolExecutor | None = None
        self._base_model = self._value_model = None
        self._base_ctx = self._value_ctx = None
        self._last_completion_tokens: list[int] = []
        self.stats = GenerationStats(n_ctx=n_ctx)

        try:
            self._load(base, value, alpha, config, token_map, concurrent, verbose)
        except BaseException:
            self.close()  # free whatever was loaded before the failure, now
            raise

    def _load(self, base, value, alpha, config: EngineConfig, token_map, concurrent, verbose) -> None:
        n_ctx, n_batch = config.n_ctx, config.n_batch
        self.base_path = resolve_model(base)
        base_header = read_gguf_header(self.base_path)
        self._base_model = Model(self.base_path, verbose=verbose)
        self._base_vocab = self._base_model.vocab
        self._base_ctx = Context(self._base_model, n_ctx=n_ctx, n_batch=n_batch, n_threads=config.n_threads)
        # llama.cpp rounds the window up (to 256); the engine keeps to the one asked for
        self._n_ctx = min(n_ctx, self._base_ctx.n_ctx)
        self.stats.n_ctx = self._n_ctx
        self._base = KVSequence(self._base_ctx, checkpoint=self._guard.check)
        self._chat_template = base_header.get("tokenizer.chat_template")
        self._eos_text = self._base_vocab.eos_text

        self.value_path: Path | None = None
        self.value_info: ValueFileInfo | None = None
        self.mapping: TokenMapping | None = None
        self._value: KVSequence | TextSync | None = None
        if value is not None and str(value).lower() not in NO_VALUE:
            self._load_value(value, base_header, n_ctx, n_batch, config.n_threads, token_map, verbose)

        default_alpha = self.value_info.default_alpha if self.value_info else 1.0
        self.alpha = default_alpha if alpha is None else alpha
        self.value_enabled = self.has_value
        self._scratch = np.empty(self._base_vocab.n_tokens, dtype=np.float32)
        self.concurrent = bool(concurrent) and self.has_value
        if self.concurrent:
            self._setup_concurrency(config.n_threads)

    # --- loading ----------------------------------------------------------------------------

    def _load_value(self, value, base_header, n_ctx, n_batch, n_threads, token_map, verbose) -> None:
        self.value_path = resolve_model(value)
        value_header = read_gguf_header(self.value_path)
        self.value_info = value_info_from_header(value_header)
        base_vocab, value_vocab = read_vocab(base_header), read_vocab(value_header)
        info = self.value_info
        if info.training_base_fingerprint and info.training_base_fingerprint != base_vocab.fingerprint:
            log.info("value network was trained against %s (another vocabulary): transferring "
                     "across vocabularies", info.training_base_name)
        self._value_model = Model(self.value_path, verbose=verbose)
        vv = self._value_model.vocab
        self.mapping = resolve_mapping(
            base_vocab, value_vocab, lambda text: vv.tokenize(text, add_special=False, parse_special=False),
            map_path=token_map)
        if self.mapping.identity:
            self._value_ctx = Context(self._value_model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads)
            self._value = KVSequence(self._value_ctx, checkpoint=self._guard.check)
        else:
            # The value tokenization of the same text may be longer than the base's.
            value_n_ctx = min(2 * n_ctx, max(n_ctx, self._value_model.n_ctx_train))
            self._value_ctx = Context(self._value_model, n_ctx=value_n_ctx, n_batch=n_batch,
                                      n_threads=n_threads)
            self._value = TextSync(vv, self._value_ctx, checkpoint=self._guard.check)
            self._value_template = value_header.get("tokenizer.chat_template")
            self._value_eos_text = vv.eos_text
        self._token_map = self.mapping.token_map
        self._token_weights = self.mapping.token_weights

    def _setup_concurrency(self, n_threads: int) -> None:
        """Split the cores between the two decodes, roughly by model size (decode cost)."""
        base_size, value_size = self._base_model.size_bytes, self._value_model.size_bytes
        base_threads = max(1, min(n_threads - 1, round(n_threads * base_size / (base_size + value_size))))
        self._base_ctx.set_threads(base_threads)
        self._value_ctx.set_threads(max(1, n_threads - base_threads))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ivl-value")

    # --- public properties ------------------------------------------------------------------

    @property
    def has_value(self) -> bool:
        return self._value is not None

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
        return self._alpha

    @alpha.setter
    def alpha(self, value) -> None:
        self._guard.check()
        self._alpha = check_alpha(value)

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
        # (a same-vocabulary value model reads the base's tokens; value_prompt is unused then)
        return self._run(value_prompt or prompt, tokens, max_tokens, sampling or SamplingConfig(), stops)

    def complete(self, prompt: str, max_tokens: int | None = 256, sampling: SamplingConfig | None = None,
                 stop: list[str] | str | None = None) -> str:
        return "".join(self.generate(prompt, max_tokens, sampling, stop))

    def _make_sampler(self, sampling: SamplingConfig):
        from . import _core

        seed = sampling.seed if sampling.seed is not None else (self._seed + self._calls) & 0xFFFFFFFF
        return _core.Sampler(sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                             sampling.repeat_penalty, sampling.repeat_last_n,
                             sampling.presence_penalty, sampling.frequency_penalty, seed)

    def _run(self, value_text: str, prompt_tokens: list[int], max_tokens: int | None,
             sampling: SamplingConfig, stops: list[str]) -> Iterator[str]:
        ticket = self._guard.claim()   # at the first next(): EngineBusyError / EngineClosedError
        try:
            yield from self._decode_loop(ticket, value_text, prompt_tokens, max_tokens, sampling, stops)
        finally:
            self._guard.release(ticket)

    def _decode_loop(self, ticket: int, value_text: str, prompt_tokens: list[int],
                     max_tokens: int | None, sampling: SamplingConfig, stops: list[str]) -> Iterator[str]:
        """The token loop. llama.cpp runs only inside `work(ticket)` blocks; text is yielded
        outside them, so close() from another thread never waits on a slow consumer."""
        work = self._guard.work
        self._calls += 1
        stats = GenerationStats(prompt_tokens=len(prompt_tokens), n_ctx=self.n_ctx)
        self.stats = stats
        # alpha 0 at the start: the value model is not run (its cache catches up next call)
        use_value = self.has_value and self.value_enabled and self.alpha != 0.0
        value = self._value if use_value else None
        sampler = self._make_sampler(sampling)
        for t in prompt_tokens[-sampling.repeat_last_n:] if sampling.repeat_last_n else []:
            sampler.accept(t)
        vocab = self._base_vocab
        detok = Detokenizer(vocab.piece)  # the prompt precedes: no leading-space rule
        stopper = _StopStrings(stops)
        completion: list[int] = []
        self._last_completion_tokens = completion
        t_start = time.perf_counter()
        try:
            with work(ticket):
                # Interrupted calls may leave decoded-but-unrecorded positions: trim them first.
                self._base.repair()
                if value is not None:
                    value.repair()
                stats.reused_prompt_tokens = self._prefill(value_text, prompt_tokens, value, stats)
            t_loop = time.perf_counter()
            stats.prefill_s = t_loop - t_start
            step, stopped = 0, False
            while True:
                with work(ticket):
                    token = self._sample(sampler, value, step, stats)
                    if step == 0:
                        stats.time_to_first_token_s = time.perf_counter() - t_start
                    step += 1
                    if vocab.is_eog(token):
                        stats.finish_reason = "stop"
                        break
                    completion.append(token)
                    stats.completion_tokens = len(completion)
                    released = detok.push(token)
                text, stopped = stopper.feed(released)
                if text:
                    yield text
                if stopped:
                    stats.finish_reason = "stop"
                    break
                if max_tokens is not None and len(completion) >= max_tokens:
                    stats.finish_reason = "length"
                    break
                if len(self._base) + 1 > self.n_ctx:
                    stats.finish_reason = "length"
                    break
                with work(ticket):
                    try:
                        self._advance(token, value, released, stats)
                    except ContextOverflowError:  # the value side filled its window first
                        stats.finish_reason = "length"
                        break
            stats.decode_s = time.perf_counter() - t_loop
            if not stopped:  # EOG or length: release what the stop check held back
                tail, _ = stopper.feed(detok.flush())
                tail += stopper.flush()
                if tail:
                    yield tail
        except (KeyboardInterrupt, GeneratorExit, EngineClosedError, GenerationSuperseded):
            stats.finish_reason = stats.finish_reason or "interrupted"
            raise
        finally:
            stats.context_used = len(self._base)
            if stats.decode_s == 0.0 and stats.prefill_s:
                stats.decode_s = time.perf_counter() - t_start - stats.prefill_s
            if stats.decode_s > 0:
                stats.tokens_per_s = stats.completion_tokens / stats.decode_s

    def _sample(self, sampler, value, step: int, stats: GenerationStats) -> int:
        """Fuse the current logits of base and value and draw a token (accepted into the
        sampler's penalty history)."""
        from . import _core

        t0 = time.perf_counter()
        base_ptr, n_base = self._base_ctx.logits_ptr(), self._base_vocab.n_tokens
        if value is not None:
            value_ptr, n_value = self._value_ctx.logits_ptr(), self._value_ctx.n_vocab
            token_map, weights, alpha = self._token_map, self._token_weights, self.alpha
        else:  # same path, zero contribution
            value_ptr, n_value, token_map, weights, alpha = base_ptr, n_base, None, None, 0.0
        try:
            token = _core._fuse_and_sample(sampler, base_ptr, n_base, value_ptr, n_value,
                                           token_map, alpha, weights, self._scratch)
        except ValueError as e:
            raise InvalidLogitsError(f"cannot sample: {e} (step {step}); the model file may "
                                     f"be corrupt or alpha too large") from None
        sampler.accept(token)
        stats.fuse_sample_s += time.perf_counter() - t0
        return token

    def _prefill(self, value_text: str, prompt_tokens: list[int], value, stats: GenerationStats) -> int:
        """Bring both caches to the prompt, reusing common prefixes; returns base tokens reused.
        A value model with another vocabulary reads `value_text`; one with the base's reads
        the base's tokens."""
        value_job = None
        if value is not None:
            value_job = lambda: value.start(prompt_tokens, value_text.encode("utf-8"))
        return self._lockstep(lambda: self._base.sync_to(prompt_tokens), value_job, stats)[0]

    def _advance(self, token: int, value, released: str, stats: GenerationStats) -> None:
        """Feed the sampled token to both models (a value model with another vocabulary reads
        the text the detokenizer released: complete characters only)."""
        value_job = None
        if value is not None:
            value_job = lambda: value.feed(token, released.encode("utf-8"))
        self._lockstep(lambda: self._base.append([token]), value_job, stats)

    def _lockstep(self, base_job, value_job, stats: GenerationStats):
        """Run the base and value decodes, one after the other or concurrently."""
        if value_job is None:
            t0 = time.perf_counter()
            result = base_job()
            stats.base_decode_s += time.perf_counter() - t0
            return result, None
        future = None
        if self._pool is not None:
            try:
                future = self._pool.submit(_timed, value_job)
            except RuntimeError:   # the interpreter is exiting: its pools take no more work
                future = None
        if future is not None:
            t0 = time.perf_counter()
            try:
                result = base_job()
            finally:
                stats.base_decode_s += time.perf_counter() - t0
                value_result, value_s = _join(future)  # never leave the value decode running
            stats.value_decode_s += value_s
            return result, value_result
        t0 = time.perf_counter()
        result = base_job()
        t1 = time.perf_counter()
        value_result = value_job()
        stats.base_decode_s += t1 - t0
        stats.value_decode_s += time.perf_counter() - t1
        return result, value_result

    # --- chat (the format lives in ivl_local/chat.py) ---------------------------------------

    def render_value_chat(self, messages: list[dict]) -> str | None:
        """The conversation as a cross-vocabulary value model reads it: in its own chat format
        (the template its value file carries, else the fallback), the format it was trained on.
        None when the value model shares the base's vocabulary (it reads the base's tokens) or
        value_prompt is "base"."""
        self._guard.check()
        if self._value is None or self.identity_vocab or self.value_prompt != "own":
            return None
        return render_messages(messages, self._value_template, bos_token="", eos_token=self._value_eos_text)

    def generate_chat(self, messages: list[dict], max_tokens: int | None = 256,
                      sampling: SamplingConfig | None = None, stop=None) -> Iterator[str]:
        """generate() on the rendered conversation (each model in its format), with the stop
        strings the format needs; the raw deltas, leading whitespace included."""
        return self.generate(self.render_chat(messages), max_tokens, sampling,
                             chat_stops(self._chat_template, _stop_list(stop)),
                             value_prompt=self.render_value_chat(messages))

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
            if self._value is not None:
                self._value.reset()

    # --- lifetime ---------------------------------------------------------------------------

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
        for name in ("_value_ctx", "_base_ctx", "_value_model", "_base_model"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
                setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _stop_list(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ConfigError(f"stop must be a string or a list of strings, got {stop!r}")
    return list(stops)


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
