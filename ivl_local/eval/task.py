"""The exact-answer task: held-out demonstrations and the task's own scorer.

    examples = load_split("test")                # data/arith_test.jsonl (reasoning-gym chain_sum)
    prompt = examples[0].prompt_messages         # the conversation without the answer
    score = examples[0].score("22")              # reasoning-gym's score_answer, in [0, 1]

Scoring is reasoning-gym's own `score_answer` for the row's task (Decimal equality, partial
credit len(oracle)/len(answer) when the oracle only appears inside a longer answer), applied
to the model's whole answer with surrounding whitespace stripped: the demonstrations answer
with the number alone, so a correct number buried in a sentence earns only partial credit.
`lenient_score` applies the same scorer to the first number in the answer, which separates
"knows the sum" from "answers in the taught format".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from ..datasets import data_dir
from ..errors import DataError

DATA_DIR = data_dir()
# Each task's splits: train (value nets, references), valid (choosing alpha), test (reports).
TASKS = {name: {split: f"{name}_{split}.jsonl" for split in ("train", "valid", "test")}
         for name in ("arith", "spell", "ifeval")}   # reasoning-gym chain_sum | spell_backward | eval/ifeval.py
# What a task's answers need, where it differs from the harness's defaults (short exact answers).
# ifeval: answers are paragraphs and lists (the longest demonstration is ~200 tokens); the quick
# smoke test cuts them shorter.
TASK_LIMITS = {"ifeval": {"max_tokens": 256, "quick_max_tokens": 64, "n_ctx": 1024}}
SPLITS = TASKS["arith"]
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"\w+")


@lru_cache(maxsize=None)
def scorer_for(task: str) -> Callable[[str | None, dict], float]:
    """reasoning-gym's score_answer for a registered task name."""
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


@dataclass(frozen=True)
class Example:
    index: int                 # line number in the split file (1-based): a stable id
    messages: tuple            # full conversation, the last message is the reference answer
    answer: str
    task: str
    entry: dict                # what the scorer reads (answer, metadata)

    @property
    def prompt_messages(self) -> list[dict]:
        """The conversation up to (not including) the reference answer."""
        return [dict(m) for m in self.messages[:-1]]

    def score(self, answer: str | None) -> float:
        return float(scorer_for(self.task)((answer or "").strip(), self.entry))

    def lenient_score(self, answer: str | None) -> float:
        """The score of the answer's first number (a numeric answer) or first word."""
        pattern = _NUMBER if _NUMBER.fullmatch(self.answer) else _WORD
        match = pattern.search(answer or "")
        return self.score(match.group(0)) if match else 0.0


def load_examples(path: str | Path, limit: int | None = None) -> list[Example]:
    """Rows with messages (last = assistant answer), answer and task; DataError on bad lines."""
    path = Path(path)
    out: list[Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"])
            answer, task = str(row["answer"]), str(row["task"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{lineno}: not an exact-answer row ({e})") from None
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"{path}:{lineno}: the last message must be the assistant's answer")
        entry = {"question": row.get("question", ""), "answer": answer, "metadata": row.get("metadata", {})}
        out.append(Example(lineno, messages, answer, task, entry))
        if limit is not None and len(out) >= limit:
            break
    return out


def split_path(split: str, task: str = "arith") -> Path:
    """A shipped split of `task` ("train", "valid", "test"), or a path to a JSONL file of the
    same shape."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    if split in TASKS[task]:
        return DATA_DIR / TASKS[task][split]
    return Path(split)


def load_split(split: str = "test", limit: int | None = None, task: str = "arith") -> list[Example]:
    if task == "ifeval":   # prompts with IFEval instructions, scored by their checkers
        from .ifeval import load_examples as load_ifeval

        return load_ifeval(split_path(split, task), limit)
    return load_examples(split_path(split, task), limit)


def scorer_name(task: str) -> str:
    """What scores a task's answers, for reports."""
    if task == "ifeval":
        return ("IFEval checkers (if-verifiable 0.1.2), prompt-level strict; "
                "lenient = prompt-level loose")
    return "reasoning_gym.get_score_answer_fn(task)"
