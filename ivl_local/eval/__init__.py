"""Evaluation harness: does a value network transfer? (issue 5)

    from ivl_local.eval import run_eval, build_plan
    report = run_eval(None, quick=True)     # writes docs/results/quick/results.md + PNGs

Re-exports only; no torch here (training runs in a child process, see artifacts.py).
"""

from .configs import (ALPHAS, KINDS, AlignedMap, EvalConfig, Plan, ProxyRef, Requantized, Trained,
                      alpha_sweep, build_plan)
from .harness import ConfigResult, EvalReport, run_eval
from .stats import bootstrap_interval, paired_difference, paired_ratio, wilson_interval

__all__ = ["run_eval", "build_plan", "EvalConfig", "Plan", "Trained", "Requantized", "AlignedMap", "ProxyRef",
           "ALPHAS", "KINDS", "alpha_sweep", "ConfigResult", "EvalReport", "wilson_interval",
           "bootstrap_interval", "paired_difference", "paired_ratio"]
