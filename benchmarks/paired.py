"""Paired difference of two configurations from two evaluation reports (same test items).

    python benchmarks/paired.py docs/results/pretrained-400-own/results.json "gemma3 + value[smollm2]" \
                                docs/results/pretrained-400/results.json "gemma3 + value[smollm2]"

prints mean(a - b) with its 95 % paired-bootstrap interval (ivl_local.eval.stats), after
checking that both reports scored the same test items (example ids), seed and token limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivl_local.errors import IVLError  # noqa: E402
from ivl_local.eval.report import load_report  # noqa: E402
from ivl_local.eval.stats import paired_difference  # noqa: E402


def scores(report: str, name: str) -> tuple[list[float], dict]:
    try:
        data = load_report(report)   # any results.json; one error line if it is not one
    except IVLError as e:
        raise SystemExit(f"error: {e}") from None
    for r in data["results"]:
        if r["name"] == name:
            return r["scores"], data["meta"]
    known = ", ".join(r["name"] for r in data["results"])
    raise SystemExit(f"error: no configuration {name!r} in {report} (has: {known})")


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    a, meta_a = scores(argv[0], argv[1])
    b, meta_b = scores(argv[2], argv[3])
    for key in ("split", "example_ids", "seed", "max_tokens"):
        if meta_a.get(key) != meta_b.get(key):
            raise SystemExit(f"error: the reports differ in {key} ({meta_a.get(key)} vs {meta_b.get(key)})")
    d, lo, hi = paired_difference(a, b)
    print(f"{argv[1]} ({sum(a) / len(a):.3f}) - {argv[3]} ({sum(b) / len(b):.3f}) over {len(a)} items: "
          f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] (95 % paired bootstrap)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
