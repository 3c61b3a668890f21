"""`ivl serve`: an OpenAI-compatible HTTP server over N generation slots.

    engines = [Engine(base, value, models=registry, seed=slot_seed(seed, i), ...)
               for i in range(slots)]                                # shared weights
    app = create_app(engines, ServerLimits(queue=16, api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions.

Slots. Each slot is one Engine (its own contexts and KV caches; the weights are shared through
a ModelRegistry). A request takes a free slot or waits in a bounded queue; past the queue it
gets 503 with Retry-After. Its generation runs on a thread of its own (llama.cpp releases the
GIL while it decodes, so slots decode at the same time) and hands text deltas to the event
loop; the thread gives the slot back when the generation ends, however it ends, so a client
that goes away can never leak a slot. A client that disconnects cancels its generation at the
next token (Engine.cancel). Slots decode one sequence each: there is no continuous batching.

Per request the body may set, besides OpenAI's sampling fields, the composition's weights:
`alpha` (the value network's), `weights` (every term's, by position or by name) and
`value_enabled`; each slot's weights are set again from the defaults plus the request's
before every generation, so nothing leaks from one request to the next. Responses carry an
`ivl` object with the weights used and the generation's timings.

Errors are OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}) with one line of
text, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import chat
from .config import SamplingConfig
from .errors import (ConfigError, ContextOverflowError, EmptyPromptError, EngineClosedError,
                     GenerationCancelled, IVLError)
from .terms import check_term_weight

log = logging.getLogger("ivl_local.server")

RETRY_AFTER_S = 1        # what a 503 tells the client to wait before trying again
MAX_STOPS = 4            # OpenAI's limit on `stop` strings
MAX_STOP_CHARS = 256
DISCONNECT_POLL_S = 0.2  # how often a non-streamed request checks that its client is still there


@dataclass
class ServerLimits:
    """What the server accepts; every field has a safe default."""

    queue: int = 16                    # requests waiting for a slot before 503s
    api_key: str | None = None         # Bearer key; None: no authentication (loopback only)
    cors_origins: list[str] = field(default_factory=list)   # empty: no CORS headers at all
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_tokens: int = 1024             # the most a request may ask for (and the default)
    model_id: str | None = None        # the name /v1/models lists; default: the engine's
    shutdown_grace_s: float = 10.0     # at shutdown: how long running generations may go on


class APIError(Exception):
    """An error a client receives as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error_from(e: BaseException) -> APIError:
    """The HTTP answer to an engine error: a user's mistake is 400, the rest one line of 500."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (ConfigError, EmptyPromptError)):
        return APIError(400, str(e))
    if isinstance(e, (EngineClosedError, GenerationCancelled)):
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
    if isinstance(e, IVLError):
        return APIError(500, str(e), type="server_error")
    log.error("internal error: %s: %s", type(e).__name__, e, exc_info=log.isEnabledFor(logging.DEBUG))
    return APIError(500, f"internal error ({type(e).__name__}); see the server's log", type="server_error")


# --- requests -------------------------------------------------------------------------------

# Fields of the OpenAI API that this server does not implement: given with anything but their
# neutral value, they are a 400 that names them (never silently ignored).
_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1), "best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0),
    "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "web_search_options": (None,), "reasoning_effort": (None,),
}
_WHY = {"n": "one choice per request", "best_of": "one choice per request",
        "tools": "no tool calling", "tool_choice": "no tool calling", "functions": "no tool calling",
        "function_call": "no tool calling", "parallel_tool_calls": "no tool calling",
        "response_format": "no constrained output formats", "logprobs": "no log-probabilities",
        "top_logprobs": "no log-probabilities"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """The fields both endpoints share (after the unsupported ones are taken out)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None                   # accepted, unused (OpenAI: abuse monitoring)
    # ivl: the composition, for this request only
    alpha: Optional[float] = None
    weights: Union[list[Optional[float]], dict[str, float], None] = None
    value_enabled: Optional[bool] = None

    def sampling(self) -> SamplingConfig:
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                                               "presence_penalty", "frequency_penalty", "seed")}
        return SamplingConfig(**{k: v for k, v in given.items() if v is not None})


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None                   # accepted, unused

    def plain(self) -> dict:
        """{'role', 'content': str} as the chat layer takes it ('developer' is OpenAI's new
        name for 'system'; text parts are joined)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Generation):
    messages: list[Message]
    max_completion_tokens: Optional[int] = Field(None, ge=1)   # OpenAI's newer name of max_tokens


class CompletionRequest(_Generation):
    prompt: Union[str, list[str]]


def _parse(body: bytes, kind: type[_Generation], limits: ServerLimits) -> _Generation:
    try:
        data = json.loads(body)
    except RecursionError:   # [[[[...: nested past Python's recursion limit
        raise APIError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # bad UTF-8, bad JSON, an integer of more than 4300 digits
        message = str(e) if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)) else "a number is too long"
        raise APIError(400, f"the body is not valid JSON: {message}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    for name, neutral in _NEUTRAL.items():
        if name in data:
            value = data.pop(name)
            if not any(value == v and type(value) is type(v) for v in neutral):
                why = _WHY.get(name, "not implemented")
                raise APIError(400, f"'{name}' is not supported by ivl serve ({why}); leave it out",
                               param=name, code="unsupported_parameter")
    try:
        request = kind.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        message = ("is not a field of this endpoint" if first["type"] == "extra_forbidden" else first["msg"])
        raise APIError(400, f"'{where}' {message}" if first["type"] == "extra_forbidden" else f"{where}: {message}",
                       param=where) from None
    if isinstance(request, ChatRequest):
        if not request.messages:
            raise APIError(400, "messages: a conversation needs at least one message", param="messages")
        if len(request.messages) > limits.max_messages:
            raise APIError(400, f"messages: at most {limits.max_messages} messages per request "
                                f"(the server's --max-messages), got {len(request.messages)}", param="messages")
        if request.max_completion_tokens is not None:
            if request.max_tokens is not None and request.max_tokens != request.max_completion_tokens:
                raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
            request.max_tokens = request.max_completion_tokens
    else:
        if isinstance(request.prompt, list):
            if len(request.prompt) != 1:
                raise APIError(400, "prompt: one prompt per request", param="prompt")
            request.prompt = request.prompt[0]
    if request.max_tokens is not None and request.max_tokens > limits.max_tokens:
        raise APIError(400, f"max_tokens: at most {limits.max_tokens} (the server's --max-tokens), "
                            f"got {request.max_tokens}", param="max_tokens")
    stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters",
                       param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop: a stop string cannot be empty", param="stop")
    return request


# --- the composition and the slots -------------------------------------------------------------

@dataclass
class TermWeights:
    """The loaded terms and their default weights, as every slot has them."""

    model_id: str
    kinds: list[str]
    names: list[str]
    weights: list[float]
    has_value: bool           # a primary value network (the one `alpha` scales): term 0
    value_enabled: bool

    @classmethod
    def of(cls, engine, model_id: str | None) -> "TermWeights":
        terms = engine.terms
        return cls(model_id or engine.model_name, [t.kind for t in terms], [t.name for t in terms],
                   [t.weight for t in terms], engine.value_path is not None, engine.value_enabled)

    def describe(self) -> dict:
        return {"terms": [{"index": i, "kind": k, "name": n, "weight": w}
                          for i, (k, n, w) in enumerate(zip(self.kinds, self.names, self.weights))],
                "alpha": self.weights[0] if self.has_value else None, "value_enabled": self.value_enabled}

    def for_request(self, request: _Generation) -> tuple[list[float], bool]:
        """The weights and value switch of one request: the defaults, overridden."""
        weights = list(self.weights)
        given: dict[int, float] = {}
        if isinstance(request.weights, list):
            if len(request.weights) != len(weights):
                raise APIError(400, f"weights: one per term ({len(weights)}: {', '.join(self.names) or 'none'}), "
                                    f"got {len(request.weights)}", param="weights")
            given = {i: w for i, w in enumerate(request.weights) if w is not None}
        elif isinstance(request.weights, dict):
            given = {self._index(key): w for key, w in request.weights.items()}
        if request.alpha is not None:
            if not self.has_value:
                raise APIError(400, "alpha: no value network is loaded (the server runs without --value)",
                               param="alpha")
            if 0 in given:
                raise APIError(400, "give the value network's weight once: alpha or weights", param="alpha")
            try:
                given[0] = check_term_weight("value", request.alpha, "alpha")
            except ConfigError as e:
                raise APIError(400, str(e), param="alpha") from None
        for i, w in given.items():
            weights[i] = w
        try:
            weights = [check_term_weight(k, w, f"weights: {n}") for k, n, w in zip(self.kinds, self.names, weights)]
        except ConfigError as e:
            raise APIError(400, str(e), param="weights") from None
        enabled = self.value_enabled if request.value_enabled is None else request.value_enabled
        return weights, enabled

    def _index(self, key: str) -> int:
        if key.isascii() and key.isdigit() and int(key) < len(self.names):   # not '²' (isdigit, not int)
            return int(key)
        matches = [i for i, n in enumerate(self.names) if n == key]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise APIError(400, f"weights: {len(matches)} terms are named {key!r}: give them by index",
                           param="weights")
        raise APIError(400, f"weights: no term {key!r} (the terms: {', '.join(self.names) or 'none'})",
                       param="weights")


SLOT_SEED_STRIDE = 1 << 24   # requests a slot serves before its seeds reach the next slot's


def slot_seed(seed: int, index: int) -> int:
    """The seed of slot `index`'s Engine. An Engine seeds a request that gives none with its
    seed + the number of its earlier calls; with one seed for every slot, two requests running
    at once on two slots would draw the same random stream (the same text, at any temperature).
    Slots start 2^24 seeds apart, so their streams meet only after 16.7M requests on one slot."""
    return (seed + index * SLOT_SEED_STRIDE) & 0xFFFFFFFF


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Slot:
    def __init__(self, index: int, engine):
        self.index, self.engine = index, engine
        self.run: Optional["Run"] = None


class SlotPool:
    """Free slots and the requests waiting for one (FIFO, at most `queue`). Event loop only."""

    def __init__(self, engines: list, queue: int):
        self.slots = [Slot(i, e) for i, e in enumerate(engines)]
        self.queue = queue
        self._free: deque[Slot] = deque(self.slots)
        self._waiting: deque[asyncio.Future] = deque()
        self.counts = {"served": 0, "cancelled": 0, "rejected": 0, "failed": 0}
        self.stopping = False

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self) -> Slot:
        if self.stopping:
            raise ShuttingDown
        if self._free and not self._waiting:
            return self._free.popleft()
        if len(self._waiting) >= self.queue:
            self.counts["rejected"] += 1
            raise QueueFull
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():   # handed a slot as it was cancelled
                self.release(future.result())
            elif future in self._waiting:
                self._waiting.remove(future)
            raise

    def release(self, slot: Slot) -> None:
        slot.run = None
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(slot)
                return
        self._free.append(slot)

    def stop(self, grace: float) -> None:
        """Shutdown: no new generation starts (the waiting requests get 503 now); the running
        ones may go on for `grace` seconds, then are cancelled (each ends cleanly)."""
        self.stopping = True
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(ShuttingDown())
        asyncio.get_running_loop().call_later(grace, self.cancel_all)

    def cancel_all(self) -> None:
        for slot in self.slots:
            if slot.run is not None:
                slot.run.cancel()


class Run:
    """One generation on a slot, on a thread of its own: deltas go to the event loop through an
    asyncio queue; the thread gives the slot back when the generation ends, however it ends."""

    def __init__(self, pool: SlotPool, slot: Slot, deltas: Iterator[str]):
        self.pool, self.slot, self.deltas = pool, slot, deltas
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False
        self.stats = None
        slot.run = self
        self._thread = threading.Thread(target=self._work, name=f"ivl-slot-{slot.index}", daemon=True)
        self._thread.start()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:   # the event loop is closed: the server is gone
            pass

    def _work(self) -> None:
        engine, error, started = self.slot.engine, None, False
        try:
            if not self.cancelled.is_set():
                started = True
                for delta in self.deltas:
                    self._put(("delta", delta))
                    if self.cancelled.is_set():
                        break
        except GenerationCancelled:
            pass
        except BaseException as e:   # handed to the request (one line), never raised on a thread
            error = e
        finally:
            self.deltas.close()
            stats = engine.stats if started else None
            self._put(("end", stats, error))
            try:
                self.loop.call_soon_threadsafe(self._finish, stats, error)
            except RuntimeError:
                pass

    def _finish(self, stats, error) -> None:   # on the event loop
        self.finished = True
        counts = self.pool.counts
        if self.cancelled.is_set():
            counts["cancelled"] += 1
        elif error is not None:
            counts["failed"] += 1
        else:
            counts["served"] += 1
        self.pool.release(self.slot)

    def cancel(self) -> None:
        """Stop the generation at its next token. Until its thread has claimed the engine
        (Engine.cancel() answers False) the flag stops it and the cancel is retried."""
        if self.finished:
            return
        self.cancelled.set()
        if not self.slot.engine.cancel() and self._thread.is_alive():
            self.loop.call_later(0.05, self.cancel)

    async def events(self) -> AsyncIterator[tuple]:
        """('delta', text)... then ('end', stats, error)."""
        while True:
            item = await self.queue.get()
            yield item
            if item[0] == "end":
                return

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


# --- the app -----------------------------------------------------------------------------------

def _finish_reason(stats) -> str | None:
    reason = getattr(stats, "finish_reason", None)
    return reason if reason in ("stop", "length") else None


def create_app(engines: list, limits: ServerLimits | None = None) -> FastAPI:
    """The ASGI app over loaded engines (one per slot, sharing weights). The app closes them
    at shutdown (lifespan), after cancelling whatever still runs."""
    from contextlib import asynccontextmanager

    from starlette.concurrency import run_in_threadpool

    limits = limits or ServerLimits()
    composition = TermWeights.of(engines[0], limits.model_id)
    state: dict[str, Any] = {}
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        state["pool"] = SlotPool(engines, limits.queue)
        state["loop"] = asyncio.get_running_loop()
        try:
            yield
        finally:
            shutdown(state["pool"], engines)

    def begin_shutdown() -> None:
        """From the server's signal handler (any thread): stop taking work, give the running
        generations limits.shutdown_grace_s, then cancel them."""
        loop = state.get("loop")
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: state["pool"].stop(limits.shutdown_grace_s))

    app = FastAPI(title="ivl serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if limits.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return APIError(e.status_code, message.get(e.status_code, str(e.detail)), code=None).response()

    @app.exception_handler(Exception)
    async def on_error(request, e: Exception):
        return api_error_from(e).response()

    def authorize(request: Request) -> None:
        if limits.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        # the header's bytes (Starlette decodes them as latin-1) against the key's UTF-8: a
        # non-ASCII key could never match (argv bytes that are not UTF-8 come back as they were
        # given); strip() only HTTP's blanks ('à' ends in 0xa0, NBSP in latin-1)
        ok = scheme.lower() == "bearer" and hmac.compare_digest(key.strip(" \t").encode("latin-1"),
                                                                limits.api_key.encode("utf-8", "surrogateescape"))
        if not ok:
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' with the "
                                "server's --api-key", type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        too_big = APIError(413, f"the body is larger than the server's limit of {limits.max_body_bytes:,} "
                                f"bytes (--max-body)", code="body_too_large")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            raise too_big
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    @app.get("/health")
    async def health():
        pool: SlotPool = state["pool"]
        return {"status": "ok", "slots": len(pool.slots), "busy": pool.busy, "waiting": pool.waiting,
                "queue": pool.queue, **pool.counts}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        engine = engines[0]
        return {"object": "list", "data": [{
            "id": composition.model_id, "object": "model", "created": started, "owned_by": "ivl-local",
            "ivl": {"base": engine.base_path.name, "n_ctx": engine.n_ctx, "slots": len(engines),
                    **composition.describe()}}]}

    async def generation(request: Request, kind: type[_Generation]):
        """_generation(), every error an OpenAI-style answer: an exception that reached
        Starlette's last handler was answered, then re-raised and logged with its traceback."""
        try:
            return await _generation(request, kind)
        except ClientDisconnect:
            raise APIError(499, "the client went away while sending its request") from None
        except Exception as e:
            raise api_error_from(e) from None

    async def _generation(request: Request, kind: type[_Generation]):
        authorize(request)
        body = _parse(await read_body(request), kind, limits)
        if body.model is not None and body.model != composition.model_id:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves "
                                f"{composition.model_id!r} (GET /v1/models)", param="model", code="model_not_found")
        try:
            sampling = body.sampling()
        except ConfigError as e:
            raise APIError(400, str(e)) from None
        weights, value_enabled = composition.for_request(body)
        pool: SlotPool = state["pool"]
        t0 = time.perf_counter()
        try:
            slot = await _until_disconnected(request, pool.acquire())
        except ShuttingDown:
            raise api_error_from(EngineClosedError()) from None
        except QueueFull:
            raise APIError(503, f"all {len(pool.slots)} slots are busy and {pool.queue} requests are waiting "
                                f"(the server's --slots and --queue): try again shortly", type="server_error",
                           code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        queued_s = time.perf_counter() - t0
        try:
            deltas = await run_in_threadpool(_start, slot.engine, body, sampling, weights, value_enabled, limits)
        except BaseException as e:
            pool.release(slot)
            raise api_error_from(e) if isinstance(e, Exception) else e
        run = Run(pool, slot, deltas)
        ivl = {"slot": slot.index, "queued_s": round(queued_s, 4), "weights": weights,
               "value_enabled": value_enabled}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _sse(run, isinstance(body, ChatRequest), composition.model_id, ivl, include_usage)
            async def on_close(message):
                run.cancel()   # also when the stream never started iterating
            # at shutdown the pool cancels the run after the grace period and the stream ends
            # cleanly; sse-starlette's own cut comes later, as a backstop
            return EventSourceResponse(events, ping=15, send_timeout=60, sep="\n",
                                       client_close_handler_callable=on_close,
                                       shutdown_grace_period=limits.shutdown_grace_s + 5)
        return await _complete(request, run, isinstance(body, ChatRequest), composition.model_id, ivl)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generation(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generation(request, CompletionRequest)

    app.state.limits = limits
    app.state.begin_shutdown = begin_shutdown
    app.state.composition = composition
    return app


def _start(engine, body: _Generation, sampling: SamplingConfig, weights: list[float], value_enabled: bool,
           limits: ServerLimits) -> Iterator[str]:
    """On a worker thread, with the slot held: set this request's weights and make its delta
    generator (arguments and the prompt's length are checked here; decoding starts later)."""
    for term, weight in zip(engine.terms, weights):
        term.weight = weight
    engine.value_enabled = value_enabled

    def make(max_tokens):
        if isinstance(body, ChatRequest):
            messages = [m.plain() for m in body.messages]
            return engine.chat_deltas(messages, max_tokens, sampling, body.stop)
        return engine.generate(body.prompt, max_tokens, sampling, body.stop)

    if body.max_tokens is not None:
        return make(body.max_tokens)
    try:
        return make(limits.max_tokens)
    except ContextOverflowError:   # no max_tokens given: as many as the window still holds
        return make(None)


async def _until_disconnected(request: Request, awaitable):
    """Await `awaitable` (a queue wait), giving up when the client goes away meanwhile."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client went away while queued")
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


def _timings(stats) -> dict:
    return stats.as_dict() if stats is not None else {}


async def _complete(request: Request, run: Run, is_chat: bool, model: str, ivl: dict) -> JSONResponse:
    pieces: list[str] = []
    ident_created = chat.ident("chatcmpl" if is_chat else "cmpl")

    async def watch():
        while True:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                run.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    stats = error = None
    try:
        async for event in run.events():
            if event[0] == "delta":
                pieces.append(event[1])
            else:
                _, stats, error = event
    finally:
        watcher.cancel()
        if stats is None and error is None:
            run.cancel()    # this task was cancelled (shutdown): stop the generation now
    if error is not None:
        raise api_error_from(error)
    if run.cancelled.is_set() or stats is None:
        raise api_error_from(GenerationCancelled())
    text = "".join(pieces)
    if is_chat:
        body = chat.completion_dict(model, text, stats, ident_created)
        body["choices"][0]["finish_reason"] = _finish_reason(stats)
    else:
        body = _text_completion(ident_created, model, text, _finish_reason(stats))
        body["usage"] = chat.usage(stats)
    body["ivl"] = {**ivl, "timings": _timings(stats)}
    return JSONResponse(body)


def _text_completion(ident_created: tuple[str, int], model: str, text: str, finish: str | None) -> dict:
    ident, created = ident_created
    return {"id": ident, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


async def _sse(run: Run, is_chat: bool, model: str, ivl: dict, include_usage: bool) -> AsyncIterator[dict]:
    """OpenAI's stream: data: {chunk} ... data: [DONE]. A client that goes away cancels the
    task iterating this (sse-starlette), and the finally cancels the generation."""
    ident_created = chat.ident("chatcmpl" if is_chat else "cmpl")

    def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if is_chat:
            delta = {"role": "assistant"} if role else ({"content": text} if text is not None else {})
            out = chat.chunk_dict(ident_created, model, delta, finish)
        else:
            out = _text_completion(ident_created, model, text or "", finish)
        if include_usage:
            out["usage"] = None
        return out

    def data(obj) -> dict:
        return {"data": json.dumps(obj, ensure_ascii=False)}

    ended = False
    try:
        if is_chat:
            yield data(chunk(None, role=True))
        async for event in run.events():
            if event[0] == "delta":
                yield data(chunk(event[1]))
                continue
            ended = True
            _, stats, error = event
            if error is not None or run.cancelled.is_set() or stats is None:   # failed, or shutdown
                yield data(api_error_from(error or GenerationCancelled()).body())
            else:
                last = chunk(None, _finish_reason(stats))
                last["ivl"] = {**ivl, "timings": _timings(stats)}
                yield data(last)
                if include_usage:
                    tail = chunk(None)
                    tail["choices"], tail["usage"] = [], chat.usage(stats)
                    yield data(tail)
            yield {"data": "[DONE]"}
    finally:
        if not ended:
            run.cancel()   # the client went away (or the server is stopping): stop at the next token


def shutdown(pool: SlotPool | None, engines: list, timeout: float = 30.0) -> None:
    """Cancel every generation (each stops at its next token), wait for the slot threads, free
    the engines (and with the last one, the shared models). Idempotent."""
    runs = [slot.run for slot in pool.slots if slot.run is not None] if pool is not None else []
    for run in runs:
        run.cancelled.set()
    for engine in engines:
        engine.close()      # stops its generation at the next token, then frees its contexts
    for run in runs:
        run.join(timeout)

