"""The chat layer over an Engine: messages in, the assistant's answer out, as text deltas or
OpenAI-style dicts. Everything here is format; decoding stays in the engine.

    for delta in chat_deltas(engine, [{"role": "user", "content": "Hi"}]):
        print(delta, end="")
    completion = chat_completion(engine, messages)          # a chat.completion dict
    for chunk in chat_chunks(engine, messages): ...         # chat.completion.chunk dicts

`Engine.chat_deltas` and `Engine.chat` call these.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterator

from .chat_template import FALLBACK_STOP
from .config import SamplingConfig


def chat_stops(template: str | None, stops: list[str]) -> list[str]:
    """A base without a chat template answers in the fallback format, which has no end token
    of its own after a turn: stop where the next user turn would start."""
    if template:
        return stops
    return stops + [s for s in FALLBACK_STOP if s not in stops]


def strip_leading(deltas: Iterator[str]) -> Iterator[str]:
    """The answer without its leading whitespace: templates end with 'Assistant:' or a role
    header, and the space or newline after it is format, not answer. (The one place this rule
    lives: the CLI, the session and the API all read answers through here.)"""
    started = False
    try:
        for delta in deltas:
            if not started:
                delta = delta.lstrip()
                started = bool(delta)
            if delta:
                yield delta
    finally:
        deltas.close()  # leaving early stops decoding now, not at garbage collection


def chat_deltas(engine, messages: list[dict], max_tokens: int | None = 256,
                sampling: SamplingConfig | None = None, stop=None) -> Iterator[str]:
    """The assistant's answer to `messages` as text deltas (what the CLI streams)."""
    return strip_leading(engine.generate_chat(messages, max_tokens, sampling, stop))


def ident(prefix: str = "chatcmpl") -> tuple[str, int]:
    """A fresh response id and its creation time (seconds), as the OpenAI API writes them."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())


def usage(stats) -> dict:
    """The `usage` object of a response, from a generation's GenerationStats."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def completion_dict(model: str, content: str, stats, ident_created: tuple[str, int] | None = None) -> dict:
    """A `chat.completion` dict for an answer already generated."""
    ident_, created = ident_created or ident()
    return {"id": ident_, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": stats.finish_reason}],
            "usage": usage(stats)}


def chunk_dict(ident_created: tuple[str, int], model: str, delta: dict, finish: str | None = None) -> dict:
    """One `chat.completion.chunk` dict (delta: {"role": ...}, {"content": ...} or {})."""
    ident_, created = ident_created
    return {"id": ident_, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def chat_completion(engine, messages: list[dict], max_tokens: int | None = 256,
                    sampling: SamplingConfig | None = None, stop=None) -> dict:
    """An OpenAI-style `chat.completion` dict."""
    ident_created = ident()
    content = "".join(chat_deltas(engine, messages, max_tokens, sampling, stop))
    return completion_dict(engine.model_name, content, engine.stats, ident_created)


def chat_chunks(engine, messages: list[dict], max_tokens: int | None = 256,
                sampling: SamplingConfig | None = None, stop=None) -> Iterator[dict]:
    """OpenAI-style `chat.completion.chunk` dicts: the role, the content deltas, the finish."""
    deltas = chat_deltas(engine, messages, max_tokens, sampling, stop)  # arguments checked now
    return _chunks(engine, deltas, ident())


def _chunks(engine, deltas: Iterator[str], ident_created: tuple[str, int]) -> Iterator[dict]:
    def chunk(delta: dict, finish=None):
        return chunk_dict(ident_created, engine.model_name, delta, finish)
    try:
        yield chunk({"role": "assistant"})
        for text in deltas:
            yield chunk({"content": text})
        yield chunk({}, engine.stats.finish_reason)
    finally:
        deltas.close()
