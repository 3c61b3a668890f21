"""Demonstrations for the ifeval task by rejection sampling from local instruct models, and the
teachers' own pass rates.

    python benchmarks/make_ifeval_demos.py --teachers smollm2-135m qwen2.5-coder-1.5b --limit 40
    python benchmarks/make_ifeval_demos.py --split valid --limit 60 --samples 1   # pass rates only

Each teacher answers --limit prompts spread evenly over the split (load_split's rule): one greedy answer, then
--samples - 1 answers drawn at --temperature (seeds 1, 2, ...). An answer is kept as a
demonstration only if it passes every instruction of its prompt under IFEval's strict rule
(ivl_local.eval.ifeval); each kept row records how it was made ("source"). The teachers' pass
rates (greedy answer: IFEval's four accuracies; "any of K": the rejection yield) go to
--report as JSON and markdown. The programmatic demonstrations are data/ifeval_train.jsonl
(data/make_ifeval.py); this adds sampled ones beside them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "convert")]

from ivl_local.config import GREEDY, SamplingConfig  # noqa: E402
from ivl_local.errors import IVLError  # noqa: E402
from ivl_local.eval.ifeval import summarize  # noqa: E402
from ivl_local.eval.task import TASK_LIMITS, load_split, split_path  # noqa: E402

LIMITS = TASK_LIMITS["ifeval"]


def sample_teacher(teacher: str, examples, samples: int, temperature: float, max_tokens: int,
                   log=print) -> list[list[dict]]:
    """Per example, each answer as {"answer", "how", "verdict"}; the first is greedy."""
    from ivl_local.engine import Engine

    out = []
    with Engine(teacher, None, n_ctx=LIMITS["n_ctx"]) as engine:
        for i, example in enumerate(examples, 1):
            answers = []
            for k in range(samples):
                sampling = GREEDY if k == 0 else SamplingConfig(temperature=temperature, seed=k)
                how = "greedy" if k == 0 else f"temperature {temperature:g}, top-k 40, top-p 0.95, min-p 0.05, seed {k}"
                reply = engine.chat(example.prompt_messages, max_tokens=max_tokens, sampling=sampling)
                text = reply["choices"][0]["message"]["content"]
                answers.append({"answer": text, "how": how, "verdict": example.verdict(text),
                                "finish": reply["choices"][0]["finish_reason"]})
            out.append(answers)
            passed = sum(a["verdict"].prompt_strict for a in answers)
            log(f"  {teacher} {i}/{len(examples)}: {passed}/{samples} pass  [{', '.join(example.instruction_ids)}]")
    return out


def teacher_rates(examples, answers) -> dict:
    greedy = summarize([a[0]["verdict"] for a in answers])
    greedy.pop("per_instruction_strict")
    any_pass = sum(any(x["verdict"].prompt_strict for x in a) for a in answers)
    truncated = sum(a[0]["finish"] == "length" for a in answers)
    return dict(greedy, any_of_k_strict=any_pass / max(1, len(examples)), greedy_cut_at_max_tokens=truncated)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teachers", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=40, help="prompts (N spread evenly over the split)")
    parser.add_argument("--samples", type=int, default=3, help="answers per prompt: 1 greedy + N-1 sampled")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-tokens", type=int, default=LIMITS["max_tokens"])
    parser.add_argument("--out", default="data/ifeval_train_sampled.jsonl",
                        help="kept demonstrations (JSONL); '' writes none")
    parser.add_argument("--report", default="docs/results/ifeval-teachers")
    args = parser.parse_args()
    try:
        examples = load_split(args.split, args.limit, task="ifeval")
        rows = [json.loads(line) for line in split_path(args.split, "ifeval")
                .read_text().splitlines()][:len(examples)]
        rates, kept, started = {}, [], time.time()
        for teacher in args.teachers:
            t0 = time.time()
            answers = sample_teacher(teacher, examples, args.samples, args.temperature, args.max_tokens)
            rates[teacher] = dict(teacher_rates(examples, answers), seconds=round(time.time() - t0, 1))
            for example, row, candidates in zip(examples, rows, answers):
                for cand in candidates:
                    if cand["verdict"].prompt_strict:
                        kept.append({**{k: v for k, v in row.items() if k not in ("messages", "witness", "source")},
                                     "messages": [*example.prompt_messages,
                                                  {"role": "assistant", "content": cand["answer"]}],
                                     "source": f"{teacher}, {cand['how']}, max {args.max_tokens} tokens; "
                                               "kept: passes every checker (strict)"})
                        break     # one demonstration per prompt and teacher: the first that passes
    except IVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {"command": command, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "split": args.split, "prompts": len(examples), "samples": args.samples,
            "temperature": args.temperature, "max_tokens": args.max_tokens,
            "wall_seconds": round(time.time() - started, 1)}
    report = Path(args.report)
    report.mkdir(parents=True, exist_ok=True)
    (report / "teachers.json").write_text(json.dumps({"meta": meta, "rates": rates}, indent=1) + "\n")
    lines = ["# ifeval teachers: pass rates of local instruct models", "",
             f"- command: `{command}`", f"- date: {meta['date']}; wall time {meta['wall_seconds']} s",
             f"- {len(examples)} prompts of split `{args.split}` (spread evenly over it); greedy answer "
             f"+ {args.samples - 1} sampled at temperature {args.temperature:g}; max {args.max_tokens} tokens", "",
             "| teacher | prompt strict | prompt loose | instr. strict | instr. loose | any of "
             f"{args.samples} passes (strict) | greedy cut at max tokens | s |", "|---|---|---|---|---|---|---|---|"]
    for teacher, r in rates.items():
        lines.append(f"| {teacher} | {r['prompt_strict']:.3f} | {r['prompt_loose']:.3f} | "
                     f"{r['instruction_strict']:.3f} | {r['instruction_loose']:.3f} | {r['any_of_k_strict']:.3f} | "
                     f"{r['greedy_cut_at_max_tokens']} | {r['seconds']:.0f} |")
    (report / "teachers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for row in kept:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(kept)} demonstrations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
