"""Instruction following with verifiable constraints: IFEval's own checkers, from `if-verifiable`.

    examples = load_examples(split_path("test", "ifeval"))    # data/ifeval_test.jsonl
    verdict = examples[0].verdict("some answer")               # Verdict(strict=(True, False), ...)
    examples[0].score(answer)          # prompt-level strict: 1.0 iff every instruction passes
    examples[0].lenient_score(answer)  # prompt-level loose (IFEval's loose variants of the answer)
    summary = summarize([e.verdict(a) for e, a in zip(examples, answers)])
    summary["prompt_strict"], summary["instruction_loose"]

The checkers and the strict/loose rule are the package's (`if_verifiable.common.evaluate_instructions`
over `if_verifiable.ifeval.instructions_registry.INSTRUCTION_DICT`, Google's IFEval code); this
module only chooses which of them the task uses and aggregates as IFEval reports:

- strict: the checker on the answer as written; loose: passes if any of the answer, the answer
  without its first line, last line or both, each with and without `*`, passes;
- prompt-level: the share of prompts whose every instruction passes;
- instruction-level: passed instructions over all instructions (pooled, not averaged per prompt).

What is left out, and why (`EXCLUDED`): two checkers need NLTK's `punkt` tokenizer data, which
nothing here can download (they raise LookupError without it); two need answers this task
does not ask for (another language, a fixed yes/no/maybe sentence). `if_verifiable.ifbench` is
never imported: its module calls `nltk.download` at import time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import DataError

TASK = "ifeval"

# The IFEval instructions this task uses: every checker that runs offline and fits a short
# English answer to a request.
INSTRUCTIONS = (
    "keywords:existence",
    "keywords:frequency",
    "keywords:forbidden_words",
    "keywords:letter_frequency",
    "length_constraints:number_paragraphs",
    "length_constraints:number_words",
    "length_constraints:nth_paragraph_first_word",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:multiple_sections",
    "detectable_format:json_format",
    "detectable_format:title",
    "combination:two_responses",
    "combination:repeat_prompt",
    "startend:end_checker",
    "startend:quotation",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "punctuation:no_comma",
)
EXCLUDED = {
    "length_constraints:number_sentences": "needs NLTK punkt data (sentence tokenizer), not installable offline",
    "change_case:capital_word_frequency": "needs NLTK punkt data (nltk.word_tokenize), not installable offline",
    "language:response_language": "asks for a non-English answer: no programmatic demonstration, "
                                   "and the small teachers cannot write one reliably",
    "detectable_format:constrained_response": "the answer must be a fixed yes/no/maybe sentence; "
                                              "the base requests are not yes/no questions",
}


@lru_cache(maxsize=None)
def _registry():
    """(evaluate_instructions, INSTRUCTION_DICT), imported on first use (never ifbench)."""
    try:
        import langdetect
        from if_verifiable.common import evaluate_instructions
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as e:
        raise DataError(f"the ifeval task needs the eval extra: pip install 'ivl-local[eval]' ({e})") from None
    # langdetect (all-caps / lowercase English checkers) samples at random unless seeded:
    # without this the same answer could pass once and fail the next time.
    langdetect.DetectorFactory.seed = 0
    missing = [i for i in INSTRUCTIONS if i not in INSTRUCTION_DICT]
    assert not missing, f"if-verifiable has no checker {missing}"   # the pinned version has them
    return evaluate_instructions, INSTRUCTION_DICT


def check_instructions(instruction_ids, kwargs, where: str = "") -> None:
    """DataError unless every id is one this task uses and its kwargs build its checker.
    (The package skips an unknown id silently; here it is an error.)"""
    _, registry = _registry()
    if len(instruction_ids) != len(kwargs) or not instruction_ids:
        raise DataError(f"{where}instruction_id_list and kwargs must be non-empty lists of equal length")
    for iid, args in zip(instruction_ids, kwargs):
        if iid not in INSTRUCTIONS:
            reason = EXCLUDED.get(iid, "not an IFEval instruction")
            raise DataError(f"{where}instruction {iid!r} is not used by this task ({reason})")
        if not isinstance(args, dict):
            raise DataError(f"{where}kwargs of {iid} must be an object")
        try:
            registry[iid](iid).build_description(**args)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}bad kwargs for {iid}: {e}") from None


def describe(instruction_id: str, kwargs: dict) -> str:
    """The instruction as IFEval's checker words it, e.g. 'Answer with less than 40 words.'"""
    _, registry = _registry()
    return registry[instruction_id](instruction_id).build_description(**kwargs)


# An answer that repeats the request passes the checkers that look for words the request
# itself contains (its placeholders, keywords, "SECTION 1"): Gemma 3 270M base passed 3 of 40
# prompts that way in the first run. Not a checker of IFEval's: a guard of this harness,
# reported beside IFEval's own accuracies. A prompt sentence (split at . ! ? and line ends)
# of at least ECHO_MIN_WORDS words found verbatim in the answer (case and spacing aside) is
# an echo.
ECHO_MIN_WORDS = 5
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def echoed(answer: str | None, prompt: str) -> tuple[str, ...]:
    """The prompt's sentences of >= ECHO_MIN_WORDS words that the answer repeats verbatim."""
    said = _normal(answer or "")
    if not said:
        return ()
    sentences = (_normal(x) for x in _SENTENCE_END.split(prompt))
    return tuple(x for x in sentences if len(x.split()) >= ECHO_MIN_WORDS and x in said)


@dataclass(frozen=True)
class Verdict:
    """One answer against one prompt's instructions (in the prompt's order)."""

    instruction_ids: tuple[str, ...]
    strict: tuple[bool, ...]
    loose: tuple[bool, ...]
    echo: bool = False     # the answer repeats a sentence of the request (echoed())

    @property
    def prompt_strict(self) -> bool:
        return all(self.strict)

    @property
    def prompt_strict_no_echo(self) -> bool:
        """Prompt-level strict, an echoing answer failing: what the answer did itself."""
        return self.prompt_strict and not self.echo

    @property
    def prompt_loose(self) -> bool:
        return all(self.loose)


def verify(answer: str | None, instruction_ids, kwargs, prompt: str = "") -> Verdict:
    """Every instruction's strict and loose verdict on `answer` (an empty answer fails all)."""
    evaluate, registry = _registry()
    ids = tuple(instruction_ids)
    unknown = [i for i in ids if i not in INSTRUCTIONS]
    if unknown:   # the package would skip them silently
        raise DataError(f"instructions not used by this task: {unknown}")
    # kwargs given as None are dropped by the package, as IFEval's loader does.
    results, _ = evaluate(answer or "", list(ids), [dict(k) for k in kwargs], prompt, registry)
    if not results:   # an empty answer (or only an unclosed <think> block): every instruction fails
        return Verdict(ids, (False,) * len(ids), (False,) * len(ids))
    assert [r.instruction_id for r in results] == list(ids), "a checker was skipped"
    return Verdict(ids, tuple(r.strict_pass for r in results), tuple(r.loose_pass for r in results),
                   echo=bool(echoed(answer, prompt)))


def summarize(verdicts: list[Verdict]) -> dict:
    """IFEval's four accuracies, plus per-instruction strict pass rates."""
    n = len(verdicts)
    flat_strict = [p for v in verdicts for p in v.strict]
    flat_loose = [p for v in verdicts for p in v.loose]
    per: dict[str, list[bool]] = {}
    for v in verdicts:
        for iid, p in zip(v.instruction_ids, v.strict):
            per.setdefault(iid, []).append(p)

    def share(xs) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {"prompts": n, "instructions": len(flat_strict),
            "prompt_strict": share([v.prompt_strict for v in verdicts]),
            "prompt_strict_no_echo": share([v.prompt_strict_no_echo for v in verdicts]),
            "echoes": share([v.echo for v in verdicts]),
            "prompt_loose": share([v.prompt_loose for v in verdicts]),
            "instruction_strict": share(flat_strict), "instruction_loose": share(flat_loose),
            "per_instruction_strict": {iid: (share(ps), len(ps)) for iid, ps in sorted(per.items())}}


@dataclass(frozen=True)
class IFEvalExample:
    """A prompt with its instructions; `messages` ends with a demonstration on train rows."""

    index: int                       # line number in the split file (1-based): a stable id
    messages: tuple
    prompt: str                      # the user's whole request, constraints included
    instruction_ids: tuple[str, ...]
    kwargs: tuple                    # one dict per instruction
    base_id: str                     # which base request (topic and kind) it was built on
    task: str = TASK

    @property
    def prompt_messages(self) -> list[dict]:
        messages = self.messages[:-1] if self.messages[-1]["role"] == "assistant" else self.messages
        return [dict(m) for m in messages]

    def verdict(self, answer: str | None) -> Verdict:
        return verify(answer, self.instruction_ids, self.kwargs, self.prompt)

    def score(self, answer: str | None) -> float:
        """Prompt-level strict accuracy of one answer: 1.0 iff every instruction passes."""
        return float(self.verdict(answer).prompt_strict)

    def lenient_score(self, answer: str | None) -> float:
        """Prompt-level loose accuracy of one answer."""
        return float(self.verdict(answer).prompt_loose)


def load_examples(path: str | Path, limit: int | None = None) -> list[IFEvalExample]:
    """Rows of data/make_ifeval.py; DataError (file and line) on a malformed one.

    `limit` N keeps N rows spread evenly over the file (rows round(i * len / N), in file
    order), not the first N: the splits are written topic by topic, so the first 40 test
    prompts are all one topic. Every row is still checked."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    out: list[IFEvalExample] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}: "
        try:
            row = json.loads(line)
            messages = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"])
            ids, kwargs = list(row["instruction_id_list"]), list(row["kwargs"])
            prompt, base_id = str(row["prompt"]), str(row["base_id"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{where}not an ifeval row ({e})") from None
        if not messages or messages[0]["role"] != "user" or messages[0]["content"] != prompt:
            raise DataError(f"{where}the first message must be the user's prompt")
        check_instructions(ids, kwargs, where)
        out.append(IFEvalExample(lineno, messages, prompt, tuple(ids), tuple(kwargs), base_id))
    if limit is not None and limit < len(out):
        out = [out[round(i * len(out) / limit)] for i in range(max(limit, 0))]
    return out
