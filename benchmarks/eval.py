"""Does a value network transfer? Runs ivl_local.eval.run_eval and writes docs/results/.

    python benchmarks/eval.py --quick              # every configuration kind, a few minutes
    python benchmarks/eval.py --limit 200          # the full plan on 200 test examples
    python benchmarks/eval.py --only smollm2 --skip "norm 0" --limit 100   # names matching these
    python benchmarks/eval.py --steps 48 --limit 100  # a smaller full run (shared CPUs)
    python benchmarks/eval.py --split valid --only '^smollm2 \+ value( @a=.*)?$' --out docs/results/valid
    python benchmarks/eval.py --alpha-from docs/results/valid/results.json --only ...   # alpha chosen on valid
    python benchmarks/eval.py --task spell --limit 200 --out docs/results/compose-spell   # second task
    python benchmarks/eval.py --task ifeval --quick --out docs/results/ifeval   # IFEval-style instructions
    python benchmarks/eval.py --smollm2-init pretrained --steps 100 --limit 100 \
        --skip 'value\[gemma3\]' 'norm 0' '^gemma3 \+ value$' --out docs/results/pretrained

Artifacts (trained value nets, full fine-tunes, re-quantized bases, aligned maps) are built on
first use and cached under ivl_local.models.cache_dir()/eval.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "convert")]

from ivl_local.eval import build_plan, run_eval  # noqa: E402
from ivl_local.errors import IVLError  # noqa: E402
from ivl_local.eval.alpha_select import apply_alphas, best_alphas  # noqa: E402
from ivl_local.eval.report import load_report  # noqa: E402
from ivl_local.eval.configs import Plan  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small recipes, few examples, one alpha sweep")
    parser.add_argument("--limit", type=int, default=None, help="test examples per configuration")
    parser.add_argument("--split", default="test")
    parser.add_argument("--task", default="arith", choices=["arith", "spell", "ifeval"],
                        help="arith: the study (chain_sum); spell: composed value nets on spell_backward; "
                             "ifeval: instruction following scored by IFEval's checkers")
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--only", nargs="*", default=None,
                        help="keep configurations whose name matches one of these regexes")
    parser.add_argument("--skip", nargs="*", default=None,
                        help="drop configurations whose name matches one of these regexes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of every trained artifact (default: 16 quick, 100 full)")
    parser.add_argument("--alpha-from", metavar="RESULTS_JSON", default=None,
                        help="run each swept configuration at the alpha that scored best in this report "
                             "(an alpha sweep on another split, e.g. --split valid)")
    parser.add_argument("--smollm2-init", default=None,
                        help="init of the SmolLM2 value nets: pretrained (full default) | fresh (quick default) | pruned:K")
    args = parser.parse_args()

    plan = build_plan(args.quick, steps=args.steps, smollm2_init=args.smollm2_init, task=args.task)
    if args.only or args.skip:
        keep = [c for c in plan.configs
                if (not args.only or any(re.search(p, c.name) for p in args.only))
                and not any(re.search(p, c.name) for p in args.skip or [])]
        dropped = [c.name for c in plan.configs if c not in keep]
        plan = Plan(keep, plan.skipped + [f"{name}: not selected (--only/--skip)" for name in dropped])
    try:
        if args.alpha_from:
            sweep = load_report(args.alpha_from)
            choices = best_alphas(sweep)
            plan = apply_alphas(plan, choices, sweep["meta"]["split"], args.split)
            for name, choice in choices.items():
                print(f"{name}: {choice.note()}")
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        run_eval(plan, split=args.split, limit=args.limit, quick=args.quick, out_dir=args.out,
                 seed=args.seed, command=command, task=args.task)
    except IVLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
