"""`ivl compat`: how well a value model's vocabulary and opinions reach a base model.

    ivl compat gemma3-270m value.ivl.gguf                       # coverage, mass on the corpus
    ivl compat gemma3-270m value.ivl.gguf --data demos.jsonl    # + per-step agreement
    ivl compat gemma3-270m value.ivl.gguf --data demos.jsonl --json
    ivl compat gemma3-270m value.ivl.gguf --store-alpha 1.5     # this base's alpha, kept with the map
    ivl compat gemma3-270m value.ivl.gguf --data demos.jsonl --store-alpha calibrated
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from ._common import one_line_warnings, user_errors

SHOWN_DISAGREEMENTS = 15


def compat(
    base: Annotated[str, typer.Argument(help="Base model: a .gguf path or a known name.")],
    value: Annotated[str, typer.Argument(help="Value model: a .ivl.gguf / .gguf path or a known name.")],
    data: Annotated[Path | None, typer.Option(
        help="Demonstrations (ivl train's JSONL): mass measured on them, and each answer "
             "teacher-forced step by step. Default: mass on the shipped corpus, no steps.")] = None,
    limit: Annotated[int, typer.Option(help="Demonstrations read from --data.")] = 20,
    alpha: Annotated[float | None, typer.Option(help="Value scale (default: the value file's).")] = None,
    own_base: Annotated[str | None, typer.Option(
        help="The value's training base, for what the value wants on it (default: the one "
             "its file names, if installed; 'none' = the value's logits alone).")] = None,
    map_file: Annotated[Path | None, typer.Option("--map", help="A token map .npz (else exact-text).")] = None,
    store_alpha: Annotated[str | None, typer.Option(
        "--store-alpha", help="Store this base's alpha with the token map (--map's file, else the cached "
        "exact-text map): later runs of this base with a value net of this vocabulary use it when no "
        "--alpha is given. A number, 'calibrated' (alpha x the measured logit-spread ratio; needs --data) "
        "or 'none' (remove it).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """Token coverage both ways, the value's probability mass the base can hear, and where
    the fused top-1 differs from what the value net wants in its own vocabulary."""
    with user_errors(debug), one_line_warnings():
        if data is not None and not data.is_file():
            raise ConfigError(f"no such demonstration file: {data}")
        if map_file is not None and not map_file.is_file():
            raise ConfigError(f"no such token map file: {map_file}")
        from ..compat import check_store_alpha, compat_report

        check_store_alpha(store_alpha)
        report = compat_report(base, value, data, limit=limit, alpha=alpha, own_base=own_base,
                               token_map=map_file, store_alpha=store_alpha,
                               progress=lambda m: print(f"measuring {m}...", file=sys.stderr)
                               if sys.stderr.isatty() else None)
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
        return
    _print(report)
    if report.stored_map is not None:
        print("removed the stored alpha from " if report.stored_alpha is None else
              f"stored alpha {report.stored_alpha:g} with ", end="")
        print(f"the token map {report.stored_map}")


def _print(report) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..compat import fmt_share

    console = Console(highlight=False)
    cov = report.coverage
    console.print(f"[bold]{Path(report.base).name}[/] <- [bold]{Path(report.value).name}[/]"
                  f"  map {report.builder}, alpha {report.alpha:g}"
                  + (f", wish on {Path(report.own_base).name}" if report.own_base else
                     ", wish = the value's logits alone"))
    table = Table(title="exact-text coverage")
    for col in ("direction", "normal tokens", "exact counterpart", "share"):
        table.add_column(col, justify="right" if col != "direction" else "left")
    table.add_row("base -> value", f"{cov.base_normal:,}", f"{cov.base_exact:,}", fmt_share(cov.base_share))
    table.add_row("value -> base", f"{cov.value_normal:,}", f"{cov.value_exact:,}", fmt_share(cov.value_share))
    console.print(table)
    rules = ", ".join(f"{name} {n:,}" for name, n in cov.rules.items() if n)
    console.print(f"base tokens by map rule: {rules}; {cov.shared_value_tokens:,} value tokens "
                  f"shared by several base tokens (at most {cov.max_fan_in:,})")
    if report.mass is not None:
        mass = report.mass
        table = Table(title=f"value probability mass ({mass.positions} positions of {mass.source})")
        for col in ("distribution", "on exact counterparts", "on any mapped token"):
            table.add_column(col, justify="right" if col != "distribution" else "left")
        table.add_row("value logits", fmt_share(mass.exact), fmt_share(mass.reached))
        if mass.own_exact is not None:
            table.add_row("own base + alpha * value", fmt_share(mass.own_exact), fmt_share(mass.own_reached))
        console.print(table)
    summary = report.step_summary()
    if not summary["steps"]:
        return
    table = Table(title=f"teacher-forced answers: {summary['steps']} steps")
    table.add_column("top-1 of", justify="left")
    table.add_column("equals the reference", justify="right")
    table.add_row("base alone", fmt_share(summary["base_is_reference"]))
    table.add_row("value's wish", fmt_share(summary["wish_is_reference"]))
    table.add_row("fused", fmt_share(summary["fused_is_reference"]))
    console.print(table)
    by_rule = ", ".join(f"{k} {v}" for k, v in summary["disagreements_by_rule"].items()) or "-"
    console.print(f"fused top-1 = the value's wish at [bold]{fmt_share(summary['agree'])}[/] of steps; "
                  f"where not, the winning base token's map rule: {by_rule}")
    if "wish_carried_by_own_base" in summary:
        console.print(f"steps whose wish the value alone does not prefer (its training base carries "
                      f"it): {fmt_share(summary['wish_carried_by_own_base'])} of all, "
                      f"{summary['disagreements_carried_by_own_base']} of the disagreements")
        console.print(f"logit spread, this base / the value's training base (median): "
                      f"{summary['spread_ratio']:.2f} (a calibrated alpha: "
                      f"{report.alpha * summary['spread_ratio']:.2f})")
    misses = [s for s in report.steps if not s.agree]
    if misses:
        table = Table(title=f"disagreements (first {min(len(misses), SHOWN_DISAGREEMENTS)} of {len(misses)})")
        for col in ("demo", "step", "reference", "wish", "fused", "rule", "value added", "wish's rank",
                    "base alone", "wish lead: value / own base"):
            table.add_column(col)
        for s in misses[:SHOWN_DISAGREEMENTS]:
            table.add_row(str(s.demo), str(s.step), repr(s.reference), repr(s.wish), repr(s.fused),
                          s.fused_rule, f"{s.fused_value:+.2f}",
                          "-" if s.wish_rank is None else str(s.wish_rank), repr(s.base_alone),
                          "-" if s.value_margin is None else f"{s.value_margin:+.1f} / {s.own_margin:+.1f}")
        console.print(table)
