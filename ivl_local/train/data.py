"""Demonstrations -> token ids with a response mask (no torch here).

Text is tokenized with the base GGUF's own tokenizer (llama.cpp, vocab only), the exact
tokenizer the runtime uses, so a value network never sees a token split it will not meet
at inference. Two JSONL line shapes are accepted:

    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
        rendered with the base's `tokenizer.chat_template`, or the fallback format
        (ivl_local.chat_template) when the base has none; loss on assistant turns only.
    {"prompt": "Q: 2+2?\nA:", "response": " 4"}
        raw text; loss on the response tokens and an appended EOS token.

Other fields on a line (answer, metadata, ...) are kept for evaluation and ignored here.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..chat_template import split_for_training
from ..errors import ConfigError, DataError
from .basefile import BaseGGUF

IGNORE = -100  # label of a token the loss does not see (prompt, padding)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]    # = input_ids on response tokens, IGNORE elsewhere (unshifted)
    source_line: int


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such demonstration file")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            _check_shape(path, lineno, record)
            records.append((lineno, record))
    if not records:
        raise DataError(f"{path}: no demonstrations (the file is empty)")
    return records


def _check_shape(path: Path, lineno: int, record: dict) -> None:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{path}:{lineno}: 'messages' must be a list")
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                    or not isinstance(m.get("content"), str)):
                raise DataError(f"{path}:{lineno}: message {i} must be "
                                "{'role': system|user|assistant, 'content': str}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: no assistant message to learn from")
    elif "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise DataError(f"{path}:{lineno}: 'prompt' and 'response' must both be strings")
        if not record["response"]:
            raise DataError(f"{path}:{lineno}: empty 'response'")
    else:
        raise DataError(f"{path}:{lineno}: expected a 'messages' list or 'prompt'/'response' strings")


def segments_of(record: dict, base: BaseGGUF) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of one record, in order."""
    if "messages" in record:
        return split_for_training(record["messages"], base.chat_template,
                                  bos_token="", eos_token=base.eos_text)
    return [(record["prompt"], False), (record["response"], True)]


def tokenize_record(record: dict, base: BaseGGUF, max_len: int, lineno: int = 0) -> Example:
    """Each segment is tokenized on its own (the runtime tokenizes the prompt, then generates
    the response token by token), BOS only before the first; prompt tokens get IGNORE."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, is_response) in enumerate(segments_of(record, base)):
        ids = base.tokenize(text, add_bos=(i == 0))
        input_ids += ids
        labels += ids if is_response else [IGNORE] * len(ids)
    if "messages" not in record:  # raw pairs: teach the model to stop after the response
        input_ids.append(base.eos_id)
        labels.append(base.eos_id)
    return Example(tuple(input_ids[:max_len]), tuple(labels[:max_len]), lineno)


def load_examples(path: Path, base: BaseGGUF, max_len: int) -> tuple[list[Example], int]:
    """All usable examples of a file, and how many were dropped (no response token left
    inside max_len). DataError if none is usable."""
    path = Path(path)
    examples, dropped = [], 0
    for lineno, record in read_jsonl(path):
        try:
            example = tokenize_record(record, base, max_len, lineno)
        except ConfigError as e:  # a chat template that cannot render this conversation
            raise DataError(f"{path}:{lineno}: {e}") from None
        # A label at position 0 is never predicted (nothing precedes it).
        if any(label != IGNORE for label in example.labels[1:]):
            examples.append(example)
        else:
            dropped += 1
    if not examples:
        raise DataError(f"{path}: no example has a response token within max_len={max_len}")
    return examples, dropped


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded held-out split; at least one eval example when fraction > 0 and n > 1."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


def data_digest(path: Path) -> str:
    """'name sha256:abcdef012345' for the recipe metadata."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return f"{Path(path).name} sha256:{digest[:12]}"
