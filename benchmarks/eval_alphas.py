"""One configuration of the study's plan at alphas of your choice (benchmarks/eval.py sweeps
only the plan's grid): the scale calibration of `ivl compat` (its spread ratio) next to an
alpha chosen on the validation split.

    python benchmarks/eval_alphas.py 'gemma3 + value[smollm2]' --alphas 1 1.3 1.5 2 \
        --split valid --limit 150 --out docs/results/scale-valid
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ivl_local.eval import run_eval  # noqa: E402
from ivl_local.eval.configs import Plan, alpha_sweep, build_plan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a configuration name of the full plan")
    parser.add_argument("--alphas", type=float, nargs="+", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    plan = build_plan()
    matches = [c for c in plan.configs if c.name == args.config]
    if not matches:
        parser.error(f"no configuration named {args.config!r} in the plan")
    config = matches[0]
    configs = ([config] if config.alpha in args.alphas else []) + alpha_sweep(config, args.alphas)
    run_eval(Plan(configs), split=args.split, limit=args.limit, out_dir=args.out,
             command=" ".join(["python", "benchmarks/eval_alphas.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
