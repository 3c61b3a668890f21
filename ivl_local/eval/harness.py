"""run_eval: every configuration on the held-out split, greedy, with confidence intervals.

    from ivl_local.eval import run_eval
    report = run_eval(None, quick=True)            # the quick plan, ~minutes on 2 cores
    report.results["smollm2 + value"].score       # mean task score in [0, 1]
    report.markdown_path, report.plot_paths

Steps: build (or reuse) every artifact the plan names; load one runner per distinct
(base, value, token map) and answer the split at each alpha it is asked for; score with the
task's own scorer; write results.json, results.md and PNG plots. A configuration whose model
is missing or whose artifact fails is skipped with a printed notice, never silently.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import IVLError
from .configs import AlignedMap, EvalConfig, Plan, Trained, build_plan, label_of
from .stats import bootstrap_interval, wilson_interval
from .task import TASK_LIMITS, Example, load_split, scorer_name

QUICK_LIMIT = 12      # examples per configuration in quick mode
MAX_TOKENS = 16       # answers are at most 4 characters; a chatty model is cut here


@dataclass
class ConfigResult:
    config: EvalConfig
    answers: list[str]
    scores: np.ndarray            # task score per example, in [0, 1]
    lenient: np.ndarray           # task score of the first number in the answer
    seconds: float
    files: dict = field(default_factory=dict)   # role -> {"file", "sha256"}
    metrics: dict = field(default_factory=dict)  # the task's own aggregate metrics (ifeval: IFEval's four)

    @property
    def n(self) -> int:
        return int(self.scores.size)

    @property
    def map_kind(self) -> str:
        """How value tokens reach the base: '-' (no value), 'identity' (same vocabulary),
        'aligned' (a corpus-aligned map), 'exact-text' (the default map), each '+ MODE' in
        another map_mode (candidates, logprob, shared)."""
        if self.config.value is None and self.config.proxy is None:
            return "-"
        if self.config.token_map is not None:
            return "aligned" if self.config.map_mode == "raw" else f"aligned + {self.config.map_mode}"
        base, value = (self.files.get(role) or {} for role in ("base", "value" if self.config.value else "expert"))
        if base.get("vocab") and base.get("vocab") == value.get("vocab"):
            return "identity"
        mode = self.config.map_mode
        return "exact-text" if mode == "raw" else f"exact-text + {mode}"

    @property
    def score(self) -> float:
        return float(self.scores.mean()) if self.n else float("nan")

    @property
    def score_ci(self) -> tuple[float, float]:
        return bootstrap_interval(self.scores)

    @property
    def exact(self) -> int:
        return int((self.scores == 1.0).sum())

    @property
    def exact_ci(self) -> tuple[float, float]:
        return wilson_interval(self.exact, self.n)

    @property
    def lenient_score(self) -> float:
        return float(self.lenient.mean()) if self.n else float("nan")

    def summary(self) -> dict:
        c = self.config
        return {"name": c.name, "kind": c.kind, "base": label_of(c.base), "value": c.value_label,
                "alpha": c.alpha, "token_map": self.map_kind,
                "value_prompt": c.value_prompt, "map_mode": c.map_mode,
                "n": self.n, "score": self.score, "score_ci": list(self.score_ci),
                "exact": self.exact, "exact_rate": self.exact / self.n if self.n else float("nan"),
                "exact_ci": list(self.exact_ci), "lenient_score": self.lenient_score,
                "seconds": round(self.seconds, 2), "files": self.files, "note": c.note,
                **({"metrics": self.metrics} if self.metrics else {})}


@dataclass
class EvalReport:
    results: dict[str, ConfigResult]
    skipped: list[str]
    meta: dict
    out_dir: Path
    markdown_path: Path | None = None
    json_path: Path | None = None
    plot_paths: list[Path] = field(default_factory=list)


def _default_command(quick: bool, split: str, limit: int | None) -> str:
    if sys.argv and sys.argv[0].endswith(("eval.py", "ivl")):
        return " ".join([Path(sys.executable).name, *sys.argv])
    return f"ivl_local.eval.run_eval(quick={quick}, split={split!r}, limit={limit})"


def run_eval(configs: list[EvalConfig] | Plan | None = None, split: str = "test", limit: int | None = None,
             quick: bool = False, out_dir: str | os.PathLike = "docs/results", *, task: str = "arith",
             seed: int = 0,
             max_tokens: int | None = None, workspace=None, runner_factory: Callable | None = None,
             command: str | None = None, log: Callable[[str], None] = print,
             progress: bool = True) -> EvalReport:
    """Evaluate `configs` (None: the quick or full plan) on `split`; write the report.

    `task` names whose split is read (task.TASKS: "arith", "spell"); None plans use it too.
    Quick mode writes under out_dir/quick/ so it never overwrites a full run's report.
    `max_tokens` None: the task's own limit (task.TASK_LIMITS), else MAX_TOKENS.
    `workspace` (artifacts) and `runner_factory` (answers) are replaceable for tests."""
    from . import report as report_mod

    started = time.time()
    plan = configs if isinstance(configs, Plan) else (
        build_plan(quick, task=task) if configs is None else Plan(list(configs)))
    _check_names(plan.configs)
    for line in plan.skipped:
        log(f"skipped: {line}")
    limit = QUICK_LIMIT if (quick and limit is None) else limit
    limits = TASK_LIMITS.get(task, {})
    max_tokens = max_tokens or limits.get("quick_max_tokens" if quick else "max_tokens", MAX_TOKENS)
    examples = load_split(split, limit, task)
    if workspace is None:
        from ..models import cache_dir
        from .artifacts import Workspace

        workspace = Workspace(cache_dir() / "eval", log=log)
    if runner_factory is None:
        from .runners import make_runner as runner_factory

    skipped = list(plan.skipped)
    out = Path(out_dir) / ("quick" if quick else "")
    meta = {
        "command": command or _default_command(quick, split, limit),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "split": split, "examples": len(examples), "example_ids": [e.index for e in examples],
        "quick": quick, "seed": seed, "sampling": "greedy (temperature 0, argmax, ties -> lowest id)",
        "max_tokens": max_tokens, "bootstrap": "percentile, 2000 resamples, seed 0",
        "task": examples[0].task if examples else "?", "scorer": scorer_name(task),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"load average {os.getloadavg()[0]:.1f} at start",
    }

    def ordered(results: dict) -> dict:
        return {c.name: results[c.name] for c in plan.configs if c.name in results}

    def write_partial(results: dict) -> None:
        """After each loaded model group: a run stopped early still leaves its numbers."""
        pending = [c.name for c in plan.configs if c.name not in results]
        partial = EvalReport(ordered(results), skipped + [f"{n}: not run yet (partial report)" for n in pending],
                             dict(meta, wall_seconds=round(time.time() - started, 1), partial=True), out)
        report_mod.write_report(partial)

    results = _answer_all(plan.configs, examples, workspace, runner_factory, seed, max_tokens, log,
                          progress, skipped, on_group=write_partial, n_ctx=limits.get("n_ctx"))
    meta["wall_seconds"] = round(time.time() - started, 1)
    rep = EvalReport(ordered(results), skipped, meta, out)
    report_mod.write_report(rep)
    log(f"wrote {rep.markdown_path} ({len(rep.results)} configurations, {len(examples)} examples each)")
    return rep


def _check_names(configs: list[EvalConfig]) -> None:
    names = [c.name for c in configs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"configuration names must be unique: {sorted(dupes)}")


@dataclass
class _Resolved:
    config: EvalConfig
    base: Path
    value: Path | None
    token_map: Path | None
    torch_base_gguf: Path | None
    terms: list = field(default_factory=list)     # ivl_local term specs (proxy, extra value nets)
    term_files: dict = field(default_factory=dict)   # role -> path, for the report


def _resolve(c: EvalConfig, workspace, failed: dict) -> _Resolved:
    """Paths of a configuration's files, building artifacts on first use (IVLError if not)."""
    from ..terms import Proxy, ValueNet

    def model(ref) -> Path:
        return Path(_cached(failed, ref, lambda: workspace.model(ref)))

    base = model(c.base)
    value = None if c.value is None else model(c.value)
    terms, term_files = [], {}
    for i, (ref, weight) in enumerate(c.extra_values, 2):
        term_files[f"value {i}"] = path = model(ref)
        terms.append(ValueNet(str(path), weight))
    if c.proxy is not None:
        term_files["expert"], term_files["anti-expert"] = expert, anti = model(c.proxy.expert), model(c.proxy.anti)
        terms.append(Proxy(str(expert), str(anti), weight=c.proxy.weight))
    token_map = None if c.token_map is None else _cached(
        failed, c.token_map, lambda: workspace.token_map(c.token_map))
    torch_gguf = None
    if base.is_dir():   # a torch checkpoint: prompts use the training base's GGUF
        assert isinstance(c.base, Trained)
        torch_gguf = workspace.model(c.base.base)
    return _Resolved(c, base, value, token_map and Path(token_map), torch_gguf,
                     terms, term_files)


def _cached(failed: dict, key, build):
    """Build once; a failure is remembered so dependent configurations skip at once."""
    if key in failed:
        raise failed[key]
    try:
        return build()
    except IVLError as e:
        failed[key] = e
        raise


def _answer_all(configs: list[EvalConfig], examples: list[Example], workspace, runner_factory,
                seed: int, max_tokens: int, log, progress: bool, skipped: list[str],
                on_group: Callable[[dict], None] = lambda results: None,
                n_ctx: int | None = None) -> dict[str, ConfigResult]:
    """Group configurations by (base, value, map) in plan order; per group build what it
    needs, load it once and answer at each alpha. Results arrive group by group."""
    from ..progress import step_progress

    groups: dict[tuple, list[EvalConfig]] = {}
    for c in configs:
        groups.setdefault(c.engine_key, []).append(c)
    conversations = [e.prompt_messages for e in examples]
    results: dict[str, ConfigResult] = {}
    failed: dict = {}
    total = sum(len({c.alpha for c in cs}) for cs in groups.values()) * len(examples)
    with step_progress("evaluating", total if progress else 0) as advance:
        for members in groups.values():
            try:
                r0 = _resolve(members[0], workspace, failed)
            except IVLError as e:
                for c in members:
                    skipped.append(f"{c.name}: {e}")
                    log(f"skipped: {c.name}: {e}")
                continue
            extra = {"terms": r0.terms} if r0.terms else {}   # a factory without terms still works
            if n_ctx:   # a task with long prompts or answers (else the runner's default)
                extra["n_ctx"] = n_ctx
            if members[0].map_mode != "raw":
                extra["map_mode"] = members[0].map_mode
            runner = runner_factory(r0.base, r0.value, r0.token_map, seed, r0.torch_base_gguf,
                                    value_prompt=members[0].value_prompt, **extra)
            try:
                by_alpha: dict[float, tuple[list[str], float]] = {}
                for c in members:
                    if c.alpha not in by_alpha:
                        runner.alpha = c.alpha
                        t0 = time.time()
                        answers = runner.answer_all(conversations, max_tokens, advance)
                        by_alpha[c.alpha] = (answers, time.time() - t0)
                    answers, seconds = by_alpha[c.alpha]
                    res = results[c.name] = _scored(r0, c, answers, examples, seconds, workspace)
                    log(f"  {c.name:<40} score {res.score:.3f}  exact {res.exact}/{res.n}  ({seconds:.1f}s)")
            finally:
                runner.close()
            on_group(results)
    return results


def _scored(r: _Resolved, config: EvalConfig, answers: list[str], examples: list[Example], seconds: float,
            workspace) -> ConfigResult:
    scores = np.array([e.score(a) for e, a in zip(examples, answers)], dtype=np.float64)
    lenient = np.array([e.lenient_score(a) for e, a in zip(examples, answers)], dtype=np.float64)
    metrics = {}
    if examples and hasattr(examples[0], "verdict"):   # ifeval: IFEval's prompt/instruction accuracies
        from .ifeval import summarize

        metrics = summarize([e.verdict(a) for e, a in zip(examples, answers)])
    files = {"base": workspace.describe(r.base)}
    if r.value is not None:
        files["value"] = workspace.describe(r.value)
    if r.token_map is not None:
        files["token_map"] = workspace.describe(r.token_map)
    for role, path in r.term_files.items():
        files[role] = workspace.describe(path)
    return ConfigResult(config, list(answers), scores, lenient, seconds, files, metrics)


__all__ = ["run_eval", "EvalReport", "ConfigResult", "QUICK_LIMIT", "AlignedMap"]
