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
from ..errors import ConfigError, ContextOverflowError, DataError
from .basefile import BaseGGUF

IGNORE = -100  # label of a token the loss does not see (prompt, padding)


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]    # = input_ids on response tokens, IGNORE elsewhere (unshifted)
    source_line: int


# One demonstration is a conversation, not a corpus: 1 MiB is ~250K tokens, far past any
# --max-len. A longer line is refused before it is read whole (a 50 MB line would otherwise
# be held several times over while it is decoded and parsed).
MAX_LINE_BYTES = 1 << 20


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; DataError names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such demonstration file")
    records = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            record = _parse_line(path, lineno, line)
            _check_shape(path, lineno, record)
            records.append((lineno, record))
    if not records:
        raise DataError(f"{path}: no demonstrations (the file is empty)")
    return records


def _lines(f, path: Path):
    """The file's lines as bytes, none longer than MAX_LINE_BYTES (DataError naming it)."""
    lineno = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB "
                            "(one demonstration per line)")
        yield line


def _parse_line(path: Path, lineno: int, line: bytes) -> dict:
    try:
        text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at "
                        f"offset {e.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise DataError(f"{path}:{lineno}: not usable JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _is_text(value) -> bool:
    """A str that can be tokenized (JSON can carry lone surrogates such as \\ud800)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_shape(path: Path, lineno: int, record: dict) -> None:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DataError(f"{path}:{lineno}: 'messages' must be a list")
        for i, m in enumerate(messages):
            if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
                    or not _is_text(m.get("content"))):
                raise DataError(f"{path}:{lineno}: message {i} must be "
                                "{'role': system|user|assistant, 'content': UTF-8 text}")
            if m["role"] == "assistant" and not m["content"].strip():
                raise DataError(f"{path}:{lineno}: message {i} is an empty assistant message "
                                "(nothing to learn from; drop it or write the answer)")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{lineno}: no assistant message to learn from")
    elif "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise DataError(f"{path}:{lineno}: 'prompt' and 'response' must both be strings")
        if not _is_text(record["prompt"]) or not _is_text(record["response"]):
            raise DataError(f"{path}:{lineno}: 'prompt' or 'response' is not UTF-8 text "
                            "(a lone surrogate such as \\ud800)")
        if not record["response"].strip():
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
        except (ConfigError, ContextOverflowError) as e:  # a template that cannot render it
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
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    return f"{Path(path).name} sha256:{digest[:12]}"
