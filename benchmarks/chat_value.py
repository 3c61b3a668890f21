"""The default chat value network: which init makes the better one? Side by side, one run.

    PYTHONPATH=.:convert python benchmarks/chat_value.py --out docs/results/chat-value \
        [--variants fresh pruned:4] [--work ~/.cache/ivl-local/chat-value]

Each variant trains the default recipe (ivl_local.train.api.DEFAULT_RECIPE: Gemma 3 270M base,
data/chat_train.jsonl, one epoch; the recipe's time cap is lifted) with only its init (and the learning
rate that init wants) changed, converts it as the first run of `ivl-chat` does, and is measured
on data/chat_test.jsonl, whose prompts share no fact group with the training set:

  held-out CE / token acc  the trainer's own loss on the test answers (teacher forcing)
  ends by itself           the answer ends (end-of-turn) within --max-tokens, greedy
  answers the question     the answer contains the reference's key word (below)

The key word of a reference answer is its last word that is neither in the question nor a
function word ("Which city is the capital of France?" / "Paris is the capital of France."
-> "paris"); matched as a whole word, case and accents ignored. "Gemma alone" (no value
network) is the floor. Wall time of each training run is printed: on a machine shared with
other work it overstates the idle time; the steps/s ratio between variants is the fair part.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUNCTION_WORDS = set("""a an the is are was were be of in on to and or it its this that there
there's what which who how do does did you your i i'm my me we can has have had for with as at
by from word words""".split())
FRESH = {"init": "fresh", "fresh_hidden": 256, "fresh_layers": 2, "fresh_heads": 4,
         "fresh_kv_heads": 2, "fresh_intermediate": 768, "learning_rate": 1e-3}
VARIANTS = {   # init -> settings changed from DEFAULT_RECIPE
    "fresh": FRESH,                 # the default until this comparison: a fresh 2-layer llama
    "pruned:2": {"init": "pruned:2", "learning_rate": 1e-4},
    "pruned:4": {"init": "pruned:4", "learning_rate": 1e-4},    # the default now
}


def words(text: str) -> list[str]:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.findall(r"[a-z0-9']+", plain)


def key_word(question: str, reference: str) -> str | None:
    asked = set(words(question))
    new = [w for w in words(reference) if w not in asked and w not in FUNCTION_WORDS]
    return new[-1] if new else None


def answers(key: str | None, answer: str) -> bool:
    return key is not None and key in words(answer)


def test_items(path: Path) -> list[dict]:
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        question, reference = row["messages"][0]["content"], row["messages"][1]["content"]
        items.append({"question": question, "reference": reference,
                      "key": key_word(question, reference), "group": row["group"]})
    return items


def train_variant(name: str, work: Path) -> tuple[Path, dict]:
    from ivl_local.train.api import default_recipe

    out = work / name.replace(":", "-")
    started = time.perf_counter()
    # The recipe's wall-time cap is off: on a shared machine it would stop the variants at
    # different steps; every variant runs the recipe's full epoch (the steps/s show the cost).
    value_file = default_recipe(out, progress=True, max_seconds=None, **VARIANTS[name])
    seconds = time.perf_counter() - started
    meta = json.loads((out / "checkpoint" / "ivl_checkpoint.json").read_text())
    return value_file, {"wall_s": round(seconds, 1), "steps": meta["step"],
                        "total_steps": meta["total_steps"], "init": meta["init"],
                        "train_stats": meta["stats"]}


def held_out(ckpt: Path, data: Path) -> dict:
    from ivl_local.train.api import evaluate_checkpoint

    return evaluate_checkpoint(ckpt, data)


def generate(value_file: Path | None, items: list[dict], max_tokens: int) -> dict:
    from ivl_local import SamplingConfig
    from ivl_local.engine import Engine

    greedy = SamplingConfig(temperature=0.0)
    rows = []
    with Engine("gemma3-270m", value=value_file, n_ctx=512) as engine:
        for item in items:
            answer = "".join(engine.chat_deltas([{"role": "user", "content": item["question"]}],
                                                max_tokens=max_tokens, sampling=greedy))
            rows.append({**item, "answer": answer.strip(),
                         "ended": engine.stats.finish_reason == "stop",
                         "answered": answers(item["key"], answer)})
    n = len(rows)
    return {"ends_by_itself": sum(r["ended"] for r in rows) / n,
            "answers_question": sum(r["answered"] for r in rows) / n, "n": n, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=["fresh", "pruned:4"], choices=list(VARIANTS))
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/ivl-local/chat-value")
    ap.add_argument("--out", type=Path, default=None, help="write report.md and results.json here")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--data", type=Path, default=ROOT / "data/chat_test.jsonl")
    args = ap.parse_args()
    items = test_items(args.data)
    results = {"command": " ".join(["python", *sys.argv]), "data": str(args.data.relative_to(ROOT)),
               "max_tokens": args.max_tokens, "rows": {}}
    results["rows"]["gemma alone"] = {"generation": generate(None, items, args.max_tokens)}
    for name in args.variants:
        value_file, training = train_variant(name, args.work)
        row = {"training": training, "value_file": str(value_file),
               "held_out": held_out(value_file.parent / "checkpoint", args.data),
               "generation": generate(value_file, items, args.max_tokens)}
        results["rows"][name] = row
        print(json.dumps({name: {k: v for k, v in row.items() if k != "generation"}}, indent=1),
              file=sys.stderr)
    report = render(results)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "report.md").write_text(report)


def render(results: dict) -> str:
    lines = [f"# Default chat value network: init compared\n", f"`{results['command']}`\n",
             f"Held-out prompts: {results['data']} (greedy, at most {results['max_tokens']} tokens).\n",
             "| value network | train wall s | steps | steps/s | held-out CE | token acc | ends by itself | answers the question |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results["rows"].items():
        gen = row["generation"]
        if "training" in row:
            t, h = row["training"], row["held_out"]
            cells = [f"{t['wall_s']:.0f}", f"{t['steps']}/{t['total_steps']}",
                     f"{t['train_stats'].get('steps_per_s', 0):.3f}", f"{h['eval_ce']:.3f}",
                     f"{h['eval_token_acc']:.3f}"]
        else:
            cells = ["-"] * 5
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {gen['ends_by_itself']:.3f} | {gen['answers_question']:.3f} ({gen['n']}) |")
    lines.append("\n## Answers\n")
    names = list(results["rows"])
    for i, item in enumerate(results["rows"][names[0]]["generation"]["rows"]):
        lines.append(f"- **{item['question']}** (key `{item['key']}`)")
        for name in names:
            r = results["rows"][name]["generation"]["rows"][i]
            mark = ("✓" if r["answered"] else "✗") + ("" if r["ended"] else " …")
            lines.append(f"  - {name} {mark}: {r['answer'][:160]!r}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
