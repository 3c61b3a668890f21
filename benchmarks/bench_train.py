"""Training cost, side by side: steps/s and peak memory of value-net training per mode.

    PYTHONPATH=.:convert python benchmarks/bench_train.py [--steps 4] [--rows smollm2 ...]

Each row is one `ivl train` run in its own process (or `torchrun` processes), on the
arithmetic demonstrations (data/arith_train.jsonl), global batch 8 and max_len 96 unless
given, a trainable
copy of the base (init pretrained), the same seed; the figures are what the trainer itself
records in the checkpoint (ivl_checkpoint.json "stats": steps/s over the run's steps, the
first included; rank 0's peak RSS over the whole process, loading the base included, and
while training only: the steps and evaluations, sampled every 20 ms, which is where gradient
checkpointing and FSDP's sharding save). Rows:

  NAME            one process, 2 torch threads
  NAME +gc        the same with --grad-checkpointing
  NAME x2 DDP     torchrun --nproc_per_node 2, 1 thread each (the same 2 cores)
  NAME x2 FSDP    the same with --fsdp (per-process memory is what sharding lowers)

NAME is smollm2 (SmolLM2-135M) or qwen0.5b (Qwen2.5-Coder 0.5B). On a machine shared with
other work the absolute figures vary; rows are run one after the other, so compare ratios
within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASES = {"smollm2": "smollm2-135m", "qwen0.5b": "qwen2.5-coder-0.5b"}
MODES = {"1 proc": ([], 1, 2), "+gc": (["--grad-checkpointing"], 1, 2),
         "x2 DDP": ([], 2, 1), "x2 FSDP": (["--fsdp"], 2, 1)}


def run_row(base: str, mode: str, steps: int, work: Path, batch: int = 8, max_len: int = 96) -> dict:
    extra, procs, threads = MODES[mode]
    out = work / f"{base}-{mode.replace(' ', '_').replace('+', '')}"
    args = ["train", "--base", BASES[base], "--data", str(ROOT / "data/arith_train.jsonl"),
            "--out", str(out), "--init", "pretrained", "--steps", str(steps), "--batch-size", str(batch),
            "--max-len", str(max_len), "--eval-every", "0", "--threads", str(threads), "--seed", "0",
            "--no-check-tokenizer", *extra]
    launcher = ([sys.executable, "-P", "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable, "-P"])
    started = time.perf_counter()
    r = subprocess.run([*launcher, "-m", "ivl_local.cli.main", *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if r.returncode != 0:
        return {"base": base, "mode": mode, "error": r.stderr.strip().splitlines()[-1:]}
    meta = json.loads((out / "ivl_checkpoint.json").read_text())
    stats = meta["stats"]
    return {"base": base, "mode": mode, "steps": meta["step"], "steps_per_s": stats["steps_per_s"],
            "tokens_per_s": stats["tokens_per_s"], "peak_rss_mb": stats["peak_rss_mb"],
            "train_peak_rss_mb": stats.get("train_peak_rss_mb"),
            "wall_s": round(wall, 1), "final_loss": stats.get("final", {}).get("loss")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rows", nargs="+", default=list(BASES), choices=list(BASES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch-size", type=int, default=8, help="global micro-batch")
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ivl-bench-train-") as tmp:
        for base in args.rows:
            for mode in args.modes:
                row = run_row(base, mode, args.steps, Path(tmp), args.batch_size, args.max_len)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| value net | mode | steps/s | vs 1 proc | peak RSS MB, whole run (rank 0) | vs 1 proc | "
          "peak RSS MB, training (rank 0) | vs 1 proc | final loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['base']} | {row['mode']} | error: {row['error']} |")
            continue
        ref = next((r for r in rows if r["base"] == row["base"] and r["mode"] == "1 proc" and "error" not in r), None)
        speed = f"{row['steps_per_s'] / ref['steps_per_s']:.2f}x" if ref else "-"
        memory = f"{row['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x" if ref else "-"
        train, ref_train = row.get("train_peak_rss_mb"), ref and ref.get("train_peak_rss_mb")
        train_ratio = f"{train / ref_train:.2f}x" if train and ref_train else "-"
        print(f"| {row['base']} | {row['mode']} | {row['steps_per_s']:.3f} | {speed} | "
              f"{row['peak_rss_mb']:.0f} | {memory} | {train or 0:.0f} | {train_ratio} | {row['final_loss']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
