"""Issue 14's goals read from an ifeval report, each met / missed / not measured with its interval.

    python -m ivl_local.eval.ifeval_goals docs/results/ifeval-first/results.json   # markdown
    python -m ivl_local.eval.ifeval_goals A/results.json B/results.json   # rows of runs on the same items
    python -m ivl_local.eval.ifeval_goals A/results.json --plot ifeval.png   # and a plot of every row
    rows = goals(load_report(path))          # [{"goal", "measured", "value", "ci", "verdict"}]
    table = instruction_table(load_report(path))   # strict pass rate per instruction and row
    gains = instruction_gains(load_report(path))   # instruction-level differences (re-scores answers)
    echoes = echo_rows(load_report(path))          # answers that repeat the request, echo-guarded scores
    rows = guarded_goals(load_report(path))        # the goals with an echoing answer failing

The harness's own comparisons (report.comparisons) cover the share of the full fine-tune's
gain and IVL - proxy-tuning; the cross-vocabulary goal also needs the value net's gain on a
foreign base divided by its gain on its own training base, a ratio of two paired gains on the
same items, which this module adds. Everything is computed from the per-item prompt-level
strict scores in results.json: no model runs.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from .stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_interval, paired_difference, paired_ratio

GOAL_FT_SHARE = 0.90          # value net >= 90 % of full fine-tuning's gain on its training base
GOAL_CROSS_SHARE = 0.70       # across vocabularies >= 70 % of the gain on the value's own base
GOAL_SAME_FAMILY = 0.80       # Qwen 0.5B value net on the 1.5B: >= 80 % of the 1.5B's tuning gain


def _rows(report: dict) -> list[dict]:
    return [r for r in report["results"] if r["kind"] != "alpha-sweep"]


def _alone(report: dict, base: str) -> dict | None:
    return next((r for r in _rows(report) if r["kind"] == "base" and r["base"] == base), None)


def _trained_on(value_label: str) -> str:
    """The training base of a value net label: 'value[smollm2-135m, ifeval]' -> 'smollm2-135m'."""
    return value_label.removeprefix("value[").split(",")[0].split("]")[0]


def _verdict(value: float, goal: float, reference_lo: float = 1.0) -> str:
    """'met' / 'missed' on the point estimate; 'undecided' when the reference gain may be 0."""
    if math.isnan(value) or not reference_lo > 0:
        return "undecided (reference gain's interval includes 0)"
    return "met" if value >= goal else "missed"


def _row(goal: str, measured: str, value: float, ci, verdict: str) -> dict:
    return {"goal": goal, "measured": measured, "value": value, "ci": list(ci), "verdict": verdict}


# Rows of a value network added to a base at its default weight: on its own training base
# (in-distribution) or on another (cross-vocab); a recipe variant (norm-weight-0) is either,
# by the base it runs on. Each recipe is judged against the goals on its own.
VALUE_KINDS = ("in-distribution", "cross-vocab", "norm-weight-0")


def _model(base_label: str) -> str:
    """The model of a base label: 'smollm2-135m Q4_0' (another quantization) -> 'smollm2-135m'."""
    return base_label.split(" ")[0]


def _plain(r: dict) -> bool:
    """A row composed the default way: alpha 1, the exact-text map (or none), its own chat
    format; the rows the goals speak of (variants have their own comparisons in the report)."""
    return (r["alpha"] == 1.0 and r.get("map_mode", "raw") == "raw" and r.get("value_prompt", "own") == "own"
            and r.get("token_map", "-") in ("-", "identity", "exact-text"))


def _ivl_rows_against(proxy_row: dict, rows: list[dict]) -> list[dict]:
    """The IVL rows a proxy-tuning row is compared with: every recipe of a value net trained on
    the expert's base, added the default way to the same base."""
    return [o for o in rows if o["kind"] in VALUE_KINDS and o["base"] == proxy_row["base"]
            and o["value"].startswith("value[") and _plain(o)
            and proxy_row["value"].startswith(f"proxy[{_trained_on(o['value'])} ")]


def goals(report: dict) -> list[dict]:
    """One row per goal of issue 14 that this report can judge, and one 'not measured' row for
    each goal it cannot (a missing row of the study). Every value-net recipe in the report (the
    plan's and its norm-weight-0 variant) gets its own rows."""
    out: list[dict] = []
    rows = _rows(report)
    value_rows = [r for r in rows if r["kind"] in VALUE_KINDS and r["value"].startswith("value[") and _plain(r)]
    # on its training base's own file; the same model in another quantization is neither row
    in_dist = [r for r in value_rows if r["base"] == _trained_on(r["value"])]
    for r in in_dist:
        alone = _alone(report, r["base"])
        ft = next((o for o in rows if o["kind"] == "full-finetune" and o["base"].startswith(f"{r['base']} ")), None)
        if alone is None or ft is None:
            continue
        share, lo, hi = paired_ratio(r["scores"], alone["scores"], ft["scores"], alone["scores"])
        _, ft_lo, _ = paired_difference(ft["scores"], alone["scores"])
        out.append(_row(f"{r['name']}: >= {GOAL_FT_SHARE:.0%} of {ft['name']}'s gain", "share of the gain",
                        share, (lo, hi), _verdict(share, GOAL_FT_SHARE, ft_lo)))
    if not out:
        out.append(_row("value net >= 90 % of full fine-tuning's gain", "not measured", math.nan,
                        (math.nan, math.nan), "not measured"))

    cross = [r for r in value_rows if _model(r["base"]) != _trained_on(r["value"])]
    for r in cross:
        alone = _alone(report, r["base"])
        if alone is None:
            continue
        gain, lo, hi = paired_difference(r["scores"], alone["scores"])
        out.append(_row(f"{r['name']}: gain clearly above 0", "gain over the base alone", gain, (lo, hi),
                        "met" if lo > 0 else "missed"))
        own = next((o for o in in_dist if o["value"] == r["value"]), None)
        own_alone = own and _alone(report, own["base"])
        if own is None or own_alone is None:
            continue
        share, slo, shi = paired_ratio(r["scores"], alone["scores"], own["scores"], own_alone["scores"])
        _, own_lo, _ = paired_difference(own["scores"], own_alone["scores"])
        out.append(_row(f"{r['name']}: >= {GOAL_CROSS_SHARE:.0%} of the gain on its own base ({own['name']})",
                        "share of the own-base gain", share, (slo, shi),
                        _verdict(share, GOAL_CROSS_SHARE, own_lo)))
    # both directions: value nets trained on two different models, each on another model
    sources = {_trained_on(r["value"]) for r in cross}
    if len(sources) < 2:
        out.append(_row("across vocabularies in both directions", "not measured", math.nan,
                        (math.nan, math.nan), f"not measured (cross-vocabulary rows only for value nets "
                        f"trained on {', '.join(sorted(sources)) or 'no base'})"))

    for p in (r for r in rows if r["kind"] == "proxy-tuning"):
        for ivl in _ivl_rows_against(p, rows):
            d, lo, hi = paired_difference(ivl["scores"], p["scores"])
            verdict = "met" if lo >= 0 else "missed" if hi < 0 else "level (the interval holds 0)"
            out.append(_row(f"{ivl['name']} >= {p['name']}", "IVL - proxy-tuning", d, (lo, hi), verdict))

    if not any(r["kind"] == "same-family" for r in rows):
        out.append(_row("Qwen 0.5B value net on the 1.5B: gain >= its gain on the 0.5B, "
                        f">= {GOAL_SAME_FAMILY:.0%} of the 1.5B's tuning gain", "not measured", math.nan,
                        (math.nan, math.nan), "not measured"))
    return out


def _instruction_passes(report: dict, verdicts: dict | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(instructions per prompt, {row name: strict passes per prompt}), re-scored from the
    answers (results.json keeps prompt-level scores only) on the report's own prompts."""
    verdicts = _verdicts(report) if verdicts is None else verdicts
    counts = np.array([len(v.instruction_ids) for v in next(iter(verdicts.values()), [])], np.float64)
    passes = {name: np.array([sum(v.strict) for v in vs], np.float64) for name, vs in verdicts.items()}
    return counts, passes


def _verdicts(report: dict) -> dict[str, list]:
    """{row name: [Verdict per prompt]}, re-scored from the answers on the report's prompts."""
    from .ifeval import load_examples
    from .task import split_path

    by_index = {e.index: e for e in load_examples(split_path(report["meta"]["split"], "ifeval"))}
    examples = [by_index[i] for i in report["meta"]["example_ids"]]
    return {r["name"]: [e.verdict(a) for e, a in zip(examples, r["answers"])] for r in _rows(report)}


def _reference(report: dict, r: dict) -> dict | None:
    """The base-alone row a row with an added model is compared with (a fine-tune: the base it
    was trained from); None for a base row or when that row was not run."""
    if r["kind"] == "base":
        return None
    return _alone(report, r["base"]) or (
        _alone(report, r["base"].split(" ")[0]) if r["kind"] == "full-finetune" else None)


def echo_rows(report: dict, verdicts: dict | None = None) -> list[dict]:
    """Per row: the share of answers that repeat a sentence of the request, prompt-level strict
    as IFEval scores it and with an echoing answer failing, and (rows with an added model) the
    echo-guarded difference from the base alone, paired over the same prompts."""
    verdicts = _verdicts(report) if verdicts is None else verdicts
    guarded = {name: np.array([v.prompt_strict_no_echo for v in vs], np.float64) for name, vs in verdicts.items()}
    out = []
    for r in _rows(report):
        vs = verdicts[r["name"]]
        row = {"name": r["name"], "echoes": float(np.mean([v.echo for v in vs])),
               "prompt_strict": float(np.mean([v.prompt_strict for v in vs])),
               "prompt_strict_no_echo": float(guarded[r["name"]].mean()), "gain": None}
        alone = _reference(report, r)
        if alone is not None:
            d, lo, hi = paired_difference(guarded[r["name"]], guarded[alone["name"]])
            row["gain"] = {"vs": alone["name"], "value": d, "ci": [lo, hi]}
        out.append(row)
    return out


def guarded_goals(report: dict, verdicts: dict | None = None) -> list[dict]:
    """goals() with an echoing answer failing: a base that passes only by repeating the request
    (Gemma 3 base, docs/results) is judged from its guarded floor, not from IFEval's credit."""
    verdicts = _verdicts(report) if verdicts is None else verdicts
    guarded = {**report, "results": [{**r, "scores": [float(v.prompt_strict_no_echo) for v in verdicts[r["name"]]]}
                                     for r in _rows(report)]}
    return goals(guarded)


def _pooled_difference(a, b, counts, seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """sum(a - b) / sum(counts) (IFEval's pooled instruction-level accuracy, a minus b) with a
    percentile bootstrap over prompts, paired."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, counts.size, size=(BOOTSTRAP_RESAMPLES, counts.size))
    diff = a - b
    lo, hi = np.percentile(diff[idx].sum(axis=1) / counts[idx].sum(axis=1), [2.5, 97.5])
    return float(diff.sum() / counts.sum()), float(lo), float(hi)


def instruction_gains(report: dict, verdicts: dict | None = None) -> list[dict]:
    """Instruction-level strict accuracy (pooled, as IFEval reports it) of each row with an
    added model minus its base alone, and of IVL minus proxy-tuning on the same base: twice
    as many verdicts as prompts, so tighter than the prompt-level goal measures."""
    counts, passes = _instruction_passes(report, verdicts)
    rows, out = _rows(report), []
    for r in rows:
        alone = _reference(report, r)
        if alone is not None:
            d, lo, hi = _pooled_difference(passes[r["name"]], passes[alone["name"]], counts)
            out.append({"comparison": f"{r['name']} - {alone['name']}", "value": d, "ci": [lo, hi]})
    for p in (r for r in rows if r["kind"] == "proxy-tuning"):
        for ivl in _ivl_rows_against(p, rows):
            d, lo, hi = _pooled_difference(passes[ivl["name"]], passes[p["name"]], counts)
            out.append({"comparison": f"{ivl['name']} - {p['name']}", "value": d, "ci": [lo, hi]})
    return out


def instruction_table(report: dict) -> tuple[list[str], list[tuple[str, list[tuple[float, int]]]]]:
    """(instruction ids, [(row name, [(strict pass rate, count) per id])]) of the non-sweep rows."""
    rows = [r for r in _rows(report) if r.get("metrics")]
    ids = sorted({i for r in rows for i in r["metrics"]["per_instruction_strict"]})
    table = [(r["name"], [tuple(r["metrics"]["per_instruction_strict"].get(i, (math.nan, 0))) for i in ids])
             for r in rows]
    return ids, table


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}" if abs(x) < 2 else f"{x:.2f}"


def _goal_lines(rows: list[dict]) -> list[str]:
    lines = ["| goal | measured | value [95 % CI] | verdict |", "|---|---|---|---|"]
    for g in rows:
        ci = "" if math.isnan(g["ci"][0]) else f" [{_fmt(g['ci'][0])}, {_fmt(g['ci'][1])}]"
        lines.append(f"| {g['goal']} | {g['measured']} | {_fmt(g['value'])}{ci} | {g['verdict']} |")
    return lines


def markdown(report: dict) -> str:
    lines = _goal_lines(goals(report))
    if report["meta"].get("example_ids"):
        verdicts = _verdicts(report)   # every answer re-scored once, for every table
        lines += ["", "The same goals with an answer that echoes the request failing:", ""]
        lines += _goal_lines(guarded_goals(report, verdicts))
        lines += ["", "| instruction-level strict (pooled) | difference [95 % CI] |", "|---|---|"]
        for g in instruction_gains(report, verdicts):
            lines.append(f"| {g['comparison']} | {_fmt(g['value'])} [{_fmt(g['ci'][0])}, {_fmt(g['ci'][1])}] |")
        lines += ["", "| row | answers echoing the request | prompt strict | prompt strict, echoes failing "
                  "| echo-guarded gain over the base alone [95 % CI] |", "|---|---|---|---|---|"]
        for e in echo_rows(report, verdicts):
            g = e["gain"]
            gain = "" if g is None else f"{_fmt(g['value'])} [{_fmt(g['ci'][0])}, {_fmt(g['ci'][1])}] vs {g['vs']}"
            lines.append(f"| {e['name']} | {e['echoes']:.3f} | {e['prompt_strict']:.3f} | "
                         f"{e['prompt_strict_no_echo']:.3f} | {gain} |")
    ids, table = instruction_table(report)
    if ids:
        names = [name for name, _ in table]
        lines += ["", "| instruction (prompts) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for j, iid in enumerate(ids):
            count = max(cells[j][1] for _, cells in table)
            lines.append(f"| {iid} ({count}) | " + " | ".join(f"{cells[j][0]:.2f}" for _, cells in table) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path, verdicts: dict | None = None) -> None:
    """Prompt-level strict per row, as IFEval scores it and with an echoing answer failing, each
    with its 95 % bootstrap interval over the report's prompts (matplotlib, Agg: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    verdicts = _verdicts(report) if verdicts is None else verdicts
    names = [r["name"] for r in _rows(report)][::-1]
    series = {"prompt strict (IFEval)": "prompt_strict", "prompt strict, echoes failing": "prompt_strict_no_echo"}
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(names) + 1.6))
    y = np.arange(len(names))
    stored = {r["name"]: np.asarray(r["scores"], np.float64) for r in _rows(report)}
    for i, (label, field) in enumerate(series.items()):
        # IFEval's series from the report's own scores (the goals use them); the guarded one re-scored
        scores = [stored[name] if field == "prompt_strict" else
                  np.array([float(getattr(v, field)) for v in verdicts[name]]) for name in names]
        means = np.array([s.mean() for s in scores])
        cis = np.array([bootstrap_interval(s) for s in scores])
        ax.barh(y + (0.2 if i == 0 else -0.2), means, height=0.38, label=label, color=f"C{i}", capsize=3,
                xerr=[means - cis[:, 0], cis[:, 1] - means])
    ax.set_yticks(y, names)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of prompts with every instruction followed, 95 % bootstrap CI")
    ax.set_title(f"ifeval, {len(report['meta']['example_ids'])} {report['meta']['split']} prompts "
                 "(the same for every row)", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# what makes two reports' rows pair: the same task, scorer, prompts and decoding
SAME_ITEMS = ("task", "scorer", "split", "example_ids", "seed", "max_tokens")
ROW_IDENTITY = ("kind", "base", "value", "alpha", "token_map", "value_prompt", "map_mode", "scores", "answers")


def merge_reports(reports: list[dict], names: list[str] | None = None) -> dict:
    """One report holding the rows of several run on the same items (a row run later, e.g. the
    norm-0 net on Gemma, paired with the earlier rows). A row name met twice must be the same row
    (settings, scores and answers); it is kept once. ValueError when the reports' items or
    settings differ, or (several reports) one has no example ids to pair on."""
    names = names or [f"report {i + 1}" for i in range(len(reports))]
    if not reports or len(names) != len(reports):
        raise ValueError("merge_reports needs one name per report")
    first, rows, seen = reports[0], [], {}
    for report, name in zip(reports, names):
        if len(reports) > 1 and not report["meta"].get("example_ids"):
            raise ValueError(f"{name} has no example ids: its rows cannot be paired")
        for key in SAME_ITEMS:
            if report["meta"].get(key) != first["meta"].get(key):
                raise ValueError(f"{name} and {names[0]} differ in {key}: their rows do not pair")
        for r in report["results"]:
            identity = tuple(r.get(key) for key in ROW_IDENTITY)
            if r["name"] in seen:
                if seen[r["name"]] != identity:
                    raise ValueError(f"two different rows are named {r['name']!r} ({name})")
                continue
            seen[r["name"]] = identity
            rows.append(r)
    return {**first, "results": rows}


def main(argv: list[str]) -> int:
    from ..errors import IVLError
    from .report import load_report

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return 2

    plot_to = None
    if "--plot" in argv:
        at = argv.index("--plot")
        plot_to = Path(argv[at + 1]) if at + 1 < len(argv) else None
        argv = argv[:at] + argv[at + 2:]
        if plot_to is None or plot_to.suffix.lower() != ".png":
            return fail("--plot needs a .png path")
        if not plot_to.parent.is_dir():
            return fail(f"--plot: no folder {plot_to.parent}")
    if not argv or "--plot" in argv:
        print("usage: python -m ivl_local.eval.ifeval_goals RESULTS_JSON [RESULTS_JSON ...] [--plot PNG]\n"
              "  several reports of the same items are judged as one", file=sys.stderr)
        return 2
    try:
        loaded = [load_report(path) for path in argv]
        for path, report in zip(argv, loaded):
            if report["meta"].get("task") != "ifeval":
                return fail(f"{path} is a {report['meta'].get('task')!r} report, not an ifeval one")
        report = merge_reports(loaded, argv)
        if plot_to is not None and not report["meta"].get("example_ids"):
            return fail("--plot needs a report with its example ids")
        text = markdown(report)   # re-scores every answer: a report of other prompts fails here
        if plot_to is not None:
            plot(report, plot_to)
    except (IVLError, ValueError, KeyError, OSError) as e:
        return fail(f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e))
    print(text, end="")
    if plot_to is not None:
        print(f"wrote {plot_to}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
