"""Choosing a value network's alpha on the validation split, never on the one reported.

    sweep = load_report("docs/results/valid-alpha/results.json")   # eval.report; a --split valid run
    choices = best_alphas(sweep)               # {"smollm2 + value": AlphaChoice(1.25, ...)}
    plan = apply_alphas(plan, choices, report_split="valid", eval_split="test")

A sweep is a configuration's result at alpha 1 ("NAME") plus its "NAME @a=X" results. The
chosen alpha is the one with the highest mean task score on the sweep's split; a tie goes to
the alpha nearest 1 (the default), so that noise alone never moves it. Applying the choice
keeps the configuration's name and kind (the report's comparisons still find it) and says
in its note where the alpha came from.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .configs import Plan, sweep_parent


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    score: float           # mean task score at that alpha on the sweep's split
    tried: tuple[tuple[float, float], ...]   # (alpha, score) of every alpha in the sweep
    split: str
    examples: int

    def note(self) -> str:
        tried = ", ".join(f"{a:g}: {s:.3f}" for a, s in self.tried)
        return f"alpha {self.alpha:g} chosen on split {self.split!r} ({self.examples} examples; {tried})"


def best_alphas(report: dict) -> dict[str, AlphaChoice]:
    """For each configuration the report swept (two alphas or more), the best alpha."""
    points: dict[str, list[tuple[float, float]]] = {}
    for r in report["results"]:
        parent = sweep_parent(r["name"])
        points.setdefault(parent, []).append((float(r["alpha"]), float(r["score"])))
    meta = report["meta"]
    choices = {}
    for parent, tried in points.items():
        if len({a for a, _ in tried}) < 2:
            continue
        tried.sort()
        alpha, score = max(tried, key=lambda p: (round(p[1], 12), -abs(p[0] - 1.0)))
        choices[parent] = AlphaChoice(alpha, score, tuple(tried), meta["split"], int(meta["examples"]))
    return choices


def apply_alphas(plan: Plan, choices: dict[str, AlphaChoice], report_split: str, eval_split: str) -> Plan:
    """The plan with each swept configuration at its chosen alpha.

    Refuses a choice made on the split being evaluated: that would be tuning on it."""
    if report_split == eval_split:
        raise ConfigError(f"the alphas were chosen on split {report_split!r}, the split being evaluated; "
                          "choose them on another split (benchmarks/eval.py --split valid)")
    if not choices:
        raise ConfigError("the report has no alpha sweep (a configuration at two alphas or more)")
    configs = []
    for c in plan.configs:
        choice = choices.get(c.name)
        if choice is not None:
            note = "; ".join(n for n in (c.note, choice.note()) if n)
            c = c.with_(alpha=choice.alpha, note=note)
        configs.append(c)
    return Plan(configs, plan.skipped)
