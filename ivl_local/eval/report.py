"""Turn ConfigResults into comparisons against the project's goals, a markdown report, a JSON
dump and PNG plots (matplotlib, Agg backend: no display needed).

    rows = comparisons(results)      # gains, recovered share of full FT, retention, map/norm deltas
    write_report(report)             # results.md, results.json, scores.png, alpha.png
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from .configs import KINDS, EvalConfig, Requantized, Trained, label_of, sweep_parent
from .stats import paired_difference, paired_ratio

GOAL_RECOVERY = 0.90      # value net recovers >= 90 % of the full fine-tuning gain
GOAL_RETENTION = 0.90     # >= 90 % of the in-distribution gain survives another quantization
GOAL_SAME_FAMILY = 0.80   # on a larger same-family base: >= 80 % of its reference FT's gain
GOAL_CROSS = 0.90         # another vocabulary keeps >= 90 % of the value net's own-base gain
CROSS_KINDS = ("cross-vocab", "cross-vocab-aligned", "cross-vocab-candidates", "cross-vocab-projection")


def _find(results, predicate):
    for r in results.values():
        if predicate(r.config):
            return r
    return None


def _alone(results, base):
    return _find(results, lambda c: c.kind == "base" and c.base == base and c.value is None)


def comparisons(results: dict) -> list[dict]:
    """One row per measured comparison: what, value, 95 % CI, goal text and whether met."""
    rows: list[dict] = []

    def add(what, kind, value, lo, hi, goal="", met=None):
        rows.append({"comparison": what, "kind": kind, "value": value, "ci": [lo, hi], "goal": goal, "met": met})

    for r in results.values():
        c = r.config
        if c.value is None or c.kind == "alpha-sweep":
            continue
        value = c.value
        alone = _alone(results, c.base)
        if alone is not None:   # gains over the base alone (a run without that row has the rest)
            _gain_rows(results, r, alone, add)
        if c.kind in CROSS_KINDS and c.map_mode != "raw":
            raw = _find(results, lambda o: o.kind in CROSS_KINDS and o.base == c.base and o.value == c.value
                        and o.token_map == c.token_map and o.value_prompt == c.value_prompt
                        and o.map_mode == "raw" and not o.extra_values)
            if raw is not None:
                d, dlo, dhi = paired_difference(r.scores, raw.scores)
                add(f"{c.map_mode} - raw map: {c.name}", c.kind, d, dlo, dhi)
        if c.kind == "cross-vocab" and c.value_prompt == "base":
            own = _find(results, lambda o: o.kind == "cross-vocab" and o.base == c.base and o.value == c.value
                        and o.token_map == c.token_map and o.value_prompt == "own")
            if own is not None:
                d, dlo, dhi = paired_difference(own.scores, r.scores)
                add(f"value's own chat format - base's format: {own.config.name}", c.kind, d, dlo, dhi)
        if c.kind == "cross-vocab-aligned":
            exact = _find(results, lambda o: o.kind == "cross-vocab" and o.base == c.base
                          and o.value == c.value and o.token_map is None
                          and o.value_prompt == c.value_prompt)
            if exact is not None:
                d, dlo, dhi = paired_difference(r.scores, exact.scores)
                add(f"aligned - exact-text map: {c.name}", c.kind, d, dlo, dhi)
        if c.kind == "chat-value" and isinstance(value, Trained):
            before = _find(results, lambda o: o.kind == "chat-value" and o.base == c.base
                           and isinstance(o.value, Trained) and set(o.value.data) < set(value.data))
            if before is not None:
                d, dlo, dhi = paired_difference(r.scores, before.scores)
                added = "+".join(x for x in value.data if x not in before.config.value.data)
                add(f"after - before adding {added}: {c.name} vs {before.config.name}", c.kind, d, dlo, dhi)
        if c.kind == "composed":
            _composed_rows(results, r, add)
        # a norm-weight variant of a value net (kind norm-weight-0, or a twin with its row's kind)
        if isinstance(value, Trained) and value.norm_weight != 1.0:   # (sweeps skipped above)
            default = replace(value, norm_weight=1.0)
            with_norm = _find(results, lambda o: o.kind != "alpha-sweep" and o.base == c.base
                              and o.value == default and o.token_map is None
                              and o.value_prompt == c.value_prompt)
            if with_norm is not None:
                d, dlo, dhi = paired_difference(with_norm.scores, r.scores)
                add(f"norm penalty (weight 1 - weight 0): {with_norm.config.name}", c.kind, d, dlo, dhi)
    for r in results.values():
        if r.config.proxy is not None and r.config.kind != "alpha-sweep":
            _proxy_rows(results, r, add)
    for r in results.values():   # alpha 0 must reproduce the base alone exactly (greedy)
        c = r.config
        if c.kind == "alpha-sweep" and c.alpha == 0:
            alone = _alone(results, c.base)
            if alone is not None:
                same = sum(a == b for a, b in zip(r.answers, alone.answers))
                add(f"alpha 0 reproduces base alone: {c.name}", "check", same / max(1, r.n),
                    math.nan, math.nan, "100 % identical answers", same == r.n)
    return rows


_DENOM_NOTE = " (judged only when the reference gain's CI is above 0)"


def _kept_rows(results, r, alone, add, goal: float, what) -> None:
    """The share of the value net's gain on its own training base that row `r` keeps on its
    base, paired on the same items; `what(in-distribution row)` names the comparison."""
    indist, train_alone = _in_distribution(results, r.config.value)
    if indist is None:
        return
    ratio, rlo, rhi = paired_ratio(r.scores, alone.scores, indist.scores, train_alone.scores)
    _, ilo, _ = paired_difference(indist.scores, train_alone.scores)
    add(what(indist), r.config.kind, ratio, rlo, rhi, f">= {goal:.0%}" + _DENOM_NOTE, _met(ratio, goal, ilo))


def _same_family_rows(results, r, alone, add) -> None:
    """A larger base of the training base's family: does the value net gain at least as much
    there as on its training base, and how much of the larger base's own fine-tuning gain?"""
    c, value = r.config, r.config.value
    indist, train_alone = _in_distribution(results, value)
    if indist is not None:
        here = np.asarray(r.scores, np.float64) - np.asarray(alone.scores, np.float64)
        there = np.asarray(indist.scores, np.float64) - np.asarray(train_alone.scores, np.float64)
        d, lo, hi = paired_difference(here, there)
        add(f"gain on {alone.config.name} - gain on {train_alone.config.name}: {c.name}", c.kind,
            d, lo, hi, ">= 0 (gains at least as much)", d >= 0)
    ref = _reference_for(results, c.base)
    if ref is not None:
        _reference_rows(add, r, alone, ref, GOAL_SAME_FAMILY,
                        f"reference gain: {ref.config.name} vs {alone.config.name}",
                        f"share of {ref.config.name} gain recovered: {c.name}")


def _gain_rows(results, r, alone, add) -> None:
    """Row `r`'s gain over its base alone, and the shares of gains that build on it: of the full
    FT's (in-distribution), of the own-base gain kept (another quantization, another vocabulary),
    the larger base of the same family."""
    c, value = r.config, r.config.value
    gain, lo, hi = paired_difference(r.scores, alone.scores)
    positive_goal = c.kind in CROSS_KINDS + ("same-family",)
    add(f"gain: {c.name} vs {alone.config.name}", c.kind, gain, lo, hi,
        "clearly positive (CI above 0)" if positive_goal else "",
        (lo > 0) if positive_goal else None)
    if c.kind == "in-distribution" and isinstance(value, Trained) and not c.extra_values:
        ft = _reference_for(results, value.base, value.task)
        if ft is not None:
            _reference_rows(add, r, alone, ft, GOAL_RECOVERY,
                            f"full-FT gain: {ft.config.name} vs {alone.config.name}",
                            f"share of full-FT gain recovered: {c.name}")
    if c.kind == "other-quantization" and isinstance(value, Trained):
        _kept_rows(results, r, alone, add, GOAL_RETENTION,
                   lambda indist: f"share of in-distribution gain kept: {c.name}")
    if c.kind == "same-family" and isinstance(value, Trained):
        _same_family_rows(results, r, alone, add)
    if c.kind in CROSS_KINDS and isinstance(value, Trained) and not c.extra_values and c.proxy is None:
        _kept_rows(results, r, alone, add, GOAL_CROSS,
                   lambda indist: f"share of own-base gain kept: {c.name} vs {indist.config.name}")


def _plain(o) -> bool:
    """Config `o` adds one model the default way: alpha 1, no other term, the exact-text map,
    its own chat format (not a sweep)."""
    return (not o.extra_values and o.proxy is None and o.token_map is None and o.value_prompt == "own"
            and o.map_mode == "raw" and o.alpha == 1.0 and o.kind != "alpha-sweep")


def _single(results, base, value):
    """The row adding only `value` (alpha 1, no other term) to `base`, if it was run."""
    return _find(results, lambda o: o.base == base and o.value == value and _plain(o))


def _composed_rows(results, r, add) -> None:
    """Several value nets added together against each of them alone, on the same items:
    does one task's value net cost the other task anything?"""
    c = r.config
    for ref in c.values:
        single = _single(results, c.base, ref)
        if single is not None:
            d, lo, hi = paired_difference(r.scores, single.scores)
            add(f"composed - one value net: {c.name} vs {single.config.name}", c.kind, d, lo, hi)


def _plain_ivl_of(o, base, expert: Trained) -> bool:
    """Row `o` adds, at alpha 1 on `base` with the default map and prompt, a value net trained
    on the proxy expert's base and task: the IVL row proxy-tuning is compared with."""
    return (o.base == base and _plain(o) and isinstance(o.value, Trained) and not o.value.full_finetune
            and o.value.base == expert.base and o.value.task == expert.task and o.value.data == expert.data)


def _proxy_rows(results, r, add) -> None:
    """Proxy-tuning, the IVL paper's baseline: its gain over the base alone, IVL's score
    minus its own on the same items (the value net trained on the expert's base and data),
    and on the expert's own base the share of the fine-tuning gain it recovers."""
    c, expert = r.config, r.config.proxy.expert
    alone = _alone(results, c.base)
    if alone is not None:
        gain, lo, hi = paired_difference(r.scores, alone.scores)
        add(f"gain: {c.name} vs {alone.config.name}", c.kind, gain, lo, hi)
    if not isinstance(expert, Trained):
        return
    # every value-net recipe on this base (norm weight 1 and its norm-0 twin, if both ran)
    for ivl in (o for o in results.values() if _plain_ivl_of(o.config, c.base, expert)):
        d, lo, hi = paired_difference(ivl.scores, r.scores)
        add(f"IVL - proxy-tuning: {ivl.config.name} vs {c.name}", c.kind, d, lo, hi)
    ft = _reference_for(results, c.base, expert.task)
    if alone is not None and ft is not None and ft.config.base == expert:
        ratio, rlo, rhi = paired_ratio(r.scores, alone.scores, ft.scores, alone.scores)
        add(f"share of full-FT gain recovered: {c.name}", c.kind, ratio, rlo, rhi)


def _in_distribution(results, value: Trained):
    """(value net on its own training base, that base alone), or (None, None)."""
    indist = _find(results, lambda o: o.kind == "in-distribution" and o.value == value and o.base == value.base)
    train_alone = _alone(results, value.base)
    return (indist, train_alone) if indist is not None and train_alone is not None else (None, None)


def _reference_for(results, base, task: str | None = None):
    """The fine-tuning reference (full or partial) of `base` (on `task`), if it was run."""
    return _find(results, lambda o: o.kind == "full-finetune" and isinstance(o.base, Trained)
                 and o.base.base == base and (task is None or o.base.task == task))


def _reference_rows(add, r, alone, ref, goal: float, gain_label: str, share_label: str) -> None:
    """The reference's gain over the base alone, and the share of it `r` recovers (judged
    against `goal` only when the reference's gain is clearly above 0)."""
    ratio, rlo, rhi = paired_ratio(r.scores, alone.scores, ref.scores, alone.scores)
    ref_gain, flo, fhi = paired_difference(ref.scores, alone.scores)
    add(gain_label, "full-finetune", ref_gain, flo, fhi)
    add(share_label, r.config.kind, ratio, rlo, rhi, f">= {goal:.0%}" + _DENOM_NOTE, _met(ratio, goal, flo))


def _met(value: float, goal: float, reference_gain_lo: float = 1.0):
    """A share of a gain means nothing when the gain itself may be 0: undecided (None) then."""
    if math.isnan(value) or not reference_gain_lo > 0:
        return None
    return bool(value >= goal)


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _ci(ci) -> str:
    lo, hi = ci
    return "" if (isinstance(lo, float) and math.isnan(lo)) else f"[{_fmt(lo)}, {_fmt(hi)}]"


def sweeps(results: dict) -> dict[str, list]:
    """Swept configuration name -> [(alpha, ConfigResult)] sorted, its alpha-1 result included."""
    out: dict[str, list] = {}
    for r in results.values():
        c = r.config
        if c.kind != "alpha-sweep":
            continue
        parent = sweep_parent(c.name)
        out.setdefault(parent, []).append((c.alpha, r))
    for parent, points in out.items():
        if parent in results:
            points.append((results[parent].config.alpha, results[parent]))
        points.sort(key=lambda p: p[0])
    return out


def markdown(report) -> str:
    m, results = report.meta, report.results
    title = "quick run" if m["quick"] else "full run"
    if m.get("partial"):
        title += "; PARTIAL: written while the run was still going"
    lines = [f"# ivl-local transfer evaluation ({title})", "",
             "Generated by `ivl_local.eval.run_eval`; every number below was measured in this run.", "",
             f"- command: `{m['command']}`",
             f"- date: {m['date']}; wall time {m['wall_seconds']} s; machine: {m['machine']}",
             f"- task: `{m['task']}`, split `{m['split']}`, {m['examples']} examples "
             f"(the same examples for every configuration); scorer: `{m['scorer']}`",
             f"- decoding: {m['sampling']}, engine seed {m['seed']}, max {m['max_tokens']} new tokens",
             f"- intervals: task score = {m['bootstrap']} bootstrap of the mean; exact = Wilson 95 %; "
             "comparisons = paired bootstrap over the same examples", "",
             "## Scores", "",
             "| configuration | kind | base | added (value nets, proxy) | alpha | map | task score [95% CI] | exact (Wilson 95%) | first-number/word score | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {k: i for i, k in enumerate(KINDS)}
    for r in sorted(results.values(), key=lambda r: order[r.config.kind]):
        s = r.summary()
        lines.append(f"| {s['name']} | {s['kind']} | {s['base']} | {s['value']} | {s['alpha']:g} | "
                     f"{s['token_map']} | {_fmt(s['score'])} {_ci(s['score_ci'])} | "
                     f"{s['exact']}/{s['n']} {_ci(s['exact_ci'])} | {_fmt(s['lenient_score'])} | {s['seconds']:.0f} |")
    lines += ["", "## Comparisons and goals", "",
              "| comparison | measured [95% CI] | goal | met |", "|---|---|---|---|"]
    for row in comparisons(results):
        met = {True: "yes", False: "**no**", None: "undecided" if row["goal"] else ""}[row["met"]]
        lines.append(f"| {row['comparison']} | {_fmt(row['value'])} {_ci(row['ci'])} | {row['goal']} | {met} |")
    with_metrics = [r for r in results.values() if r.metrics]
    if with_metrics:   # ifeval: IFEval's four accuracies (instruction-level pools all instructions)
        lines += ["", "## IFEval accuracies", "",
                  "| configuration | prompt strict | prompt loose | instruction strict | instruction loose "
                  "| answers echoing the request | prompt strict, echoes failing |",
                  "|---|---|---|---|---|---|---|"]
        for r in with_metrics:
            x = r.metrics
            lines.append(f"| {r.config.name} | {_fmt(x['prompt_strict'])} | {_fmt(x['prompt_loose'])} | "
                         f"{_fmt(x['instruction_strict'])} | {_fmt(x['instruction_loose'])} | "
                         f"{_fmt(x.get('echoes'))} | {_fmt(x.get('prompt_strict_no_echo'))} |")
    sw = sweeps(results)
    if sw:
        alphas = sorted({a for pts in sw.values() for a, _ in pts})
        lines += ["", "## Alpha sweeps (task score)", "",
                  "| configuration | " + " | ".join(f"a={a:g}" for a in alphas) + " |",
                  "|---|" + "---|" * len(alphas)]
        for parent, points in sw.items():
            by = {a: r for a, r in points}
            lines.append(f"| {parent} | " + " | ".join(_fmt(by[a].score) if a in by else "" for a in alphas) + " |")
    notes = [f"- {r.config.name}: {r.config.note}" for r in results.values() if r.config.note]
    if notes:
        lines += ["", "## Notes", ""] + notes
    lines += ["", "## Files", "", "| role | file | sha256 (first 12) |", "|---|---|---|"]
    seen = set()
    for r in results.values():
        for role, info in r.files.items():
            if info and info["file"] not in seen:
                seen.add(info["file"])
                lines.append(f"| {role} of {r.config.name} | `{info['file']}` | `{info['sha256']}` |")
    if report.skipped:
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in report.skipped]
    plots = [p.name for p in report.plot_paths]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(report) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[Path] = []
    results = [r for r in report.results.values() if r.config.kind != "alpha-sweep"]
    stamp = f"{report.meta['date']} | n={report.meta['examples']} | greedy, seed {report.meta['seed']}"
    if results:
        fig, ax = plt.subplots(figsize=(8, 0.42 * len(results) + 1.6))
        names = [r.config.name for r in results][::-1]
        scores = [r.score for r in results][::-1]
        cis = [r.score_ci for r in results][::-1]
        err = [[s - lo for s, (lo, hi) in zip(scores, cis)], [hi - s for s, (lo, hi) in zip(scores, cis)]]
        colours = {k: f"C{i}" for i, k in enumerate(KINDS)}
        ax.barh(names, scores, xerr=err, color=[colours[r.config.kind] for r in results][::-1], capsize=3)
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"task score ({report.meta.get('scorer', 'task scorer')}), 95% bootstrap CI")
        ax.set_title(f"Transfer of a value network: {report.meta.get('task', '')}\n{stamp}", fontsize=9)
        fig.tight_layout()
        path = report.out_dir / "scores.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    sw = sweeps(report.results)
    if sw:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, (parent, points) in enumerate(sw.items()):
            a = [p[0] for p in points]
            s = [p[1].score for p in points]
            lo = [p[1].score_ci[0] for p in points]
            hi = [p[1].score_ci[1] for p in points]
            ax.plot(a, s, marker="o", color=f"C{i}", label=parent)
            ax.fill_between(a, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_xlabel("alpha (scale of the value network)")
        ax.set_ylabel("task score, 95% CI")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.set_title(f"Alpha sweeps\n{stamp}", fontsize=9)
        fig.tight_layout()
        path = report.out_dir / "alpha.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out.append(path)
    return out


def to_json(report) -> dict:
    return {"meta": report.meta, "skipped": report.skipped,
            "results": [dict(r.summary(), answers=r.answers, scores=r.scores.tolist())
                        for r in report.results.values()],
            "comparisons": comparisons(report.results)}


def load_report(path) -> dict:
    """A results.json written by run_eval; one clear ConfigError if it is not one."""
    from ..errors import ConfigError

    path = Path(path)
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        report["meta"]["split"], report["results"]
    except FileNotFoundError:
        raise ConfigError(f"no such report: {path} (benchmarks/eval.py writes results.json)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an evaluation report (results.json): {e}") from None
    return report


def write_report(report) -> None:
    report.out_dir.mkdir(parents=True, exist_ok=True)
    report.plot_paths = plot(report)
    report.json_path = report.out_dir / "results.json"
    report.json_path.write_text(json.dumps(to_json(report), indent=1, default=_json_default) + "\n")
    report.markdown_path = report.out_dir / "results.md"
    report.markdown_path.write_text(markdown(report))


def _json_default(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


__all__ = ["comparisons", "markdown", "plot", "write_report", "sweeps", "label_of",
           "EvalConfig", "Requantized"]
