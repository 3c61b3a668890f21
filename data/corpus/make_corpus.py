"""Generate data/corpus/corpus.txt: the text ivl_local.align aligns two tokenizers on.

    python data/corpus/make_corpus.py        # deterministic; rewrites corpus.txt

Paragraphs (blank-line separated), in this order -- provenance in data/corpus/README.md.
The text most like the task's comes first, so a prefix (`max_bytes`) is still useful:
1. The project's own training demonstrations: data/arith_train.jsonl (reasoning-gym
   chain_sum, first 400 rows) and data/chat_train.jsonl, in the fallback chat format.
2. reasoning-gym `gsm_symbolic` word problems with their worked solutions (seed 2024).
3. "In the Year 2889" (Jules and Michel Verne), the Project Gutenberg text shipped inside
   reasoning-gym (reasoning_gym/data/in_the_year_2889.txt), between its START/END markers.
No test-split text is included.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent
GSM_SEED, GSM_SIZE = 2024, 220
ARITH_ROWS = 400


def verne() -> list[str]:
    from importlib.resources import files

    text = (files("reasoning_gym") / "data" / "in_the_year_2889.txt").read_text(encoding="utf-8")
    start = text.index("*** START OF")
    start = text.index("\n", start) + 1
    end = text.index("*** END OF")
    body = text[start:end].replace("\r\n", "\n")
    paragraphs = [" ".join(p.split()) for p in body.split("\n\n")]
    return [p for p in paragraphs if p]


def word_problems() -> list[str]:
    import reasoning_gym

    out = []
    for entry in reasoning_gym.create_dataset("gsm_symbolic", seed=GSM_SEED, size=GSM_SIZE):
        solution = entry["metadata"].get("answer_cot", "")
        out.append(f"{entry['question']}\n{solution}\nThe answer is {entry['answer']}.")
    return out


def demonstrations() -> list[str]:
    def rows(name: str, limit: int | None = None) -> list[dict]:
        lines = (DATA / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines[:limit] if line.strip()]

    out = []
    for row in rows("arith_train.jsonl", ARITH_ROWS) + rows("chat_train.jsonl"):
        turns = [("User: " if m["role"] == "user" else "Assistant: ") + m["content"] for m in row["messages"]]
        out.append("\n".join(turns))
    return out


def main() -> None:
    paragraphs = demonstrations() + word_problems() + verne()
    (HERE / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'corpus.txt'}: {len(paragraphs)} paragraphs")


if __name__ == "__main__":
    main()
