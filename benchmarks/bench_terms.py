"""Composed decoding (ivl_local/terms.py) on real models: the cost of terms, side by side.

    PYTHONPATH=. python benchmarks/bench_terms.py [--tokens 32] [--threads 1] [--rounds 2]

Gemma 3 270M base (262k vocabulary), terms from SmolLM2 135M (49k, mapped by text) and
from Gemma itself (CFG's second context). Rows, each in its own subprocess (clean peak RSS),
`--rounds` times interleaved, the round with the least CPU time per token kept:

  base                 Engine(gemma) alone
  smollm2              Engine(smollm2) alone: one term context's decode time
  base + 2 terms       Proxy(smollm2, smollm2): two SmolLM2 contexts, log-softmax, mapped
  base + 3 terms       the Proxy plus CFG (a second Gemma context on the same weights)
  ... concurrent       the same with concurrent=True (term decodes on worker threads)
  base + CFG           memory: CFG's extra peak RSS against its KV cache, at n_ctx 512 (the
                       timing rows' window) and at each --memory-n-ctx (base alone beside it)

Targets (issue 10): fusion + sampling <= 2 % of a step with 3 terms; sequential base + 2
terms >= 0.95 x the ideal 1/(t_base + 2 t_smollm2); CFG's extra memory <= its KV cache + 10 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import kv_cache_mb, peak_rss_mb, steady_state  # noqa: E402  (shared measuring helpers)

PROMPT = "Here is a short story about a robot who learns to paint:\n"
N_CTX = 512
CONFIGS = ["base", "smollm2", "base+2", "base+3", "base+3-concurrent", "base+cfg"]


def run(config: str, tokens: int, threads: int, n_ctx: int = N_CTX) -> dict:
    from ivl_local import CFG, Proxy, SamplingConfig
    from ivl_local.engine import Engine
    from ivl_local.models import resolve_model

    gemma, smollm2 = resolve_model("gemma3-270m"), resolve_model("smollm2-135m")
    proxy, cfg = Proxy(smollm2, smollm2, weight=0.5), CFG(scale=0.5)
    base, terms = {"base": (gemma, []), "smollm2": (smollm2, []), "base+2": (gemma, [proxy]),
                   "base+3": (gemma, [proxy, cfg]), "base+3-concurrent": (gemma, [proxy, cfg]),
                   "base+cfg": (gemma, [cfg])}[config]
    warnings.simplefilter("ignore")
    engine = Engine(base, None, terms=terms, n_ctx=n_ctx, n_threads=threads,
                    concurrent=config.endswith("concurrent"))
    sampling = SamplingConfig(seed=1)   # the CLI's chain: top-k 40, temperature 0.8, top-p, min-p
    out = steady_state(engine, PROMPT, tokens, sampling)
    out.update(models=len(engine._models), kv_mb=kv_cache_mb(gemma, n_ctx),
               # the KV cache of every context but the base's, as llama.cpp allocated it
               extra_kv_mb=sum(kv_cache_mb(gemma, c.n_ctx) for c in engine._contexts[1:]
                               if c.model is engine._base_model))
    engine.close()
    out["rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--memory-n-ctx", default="2048,4096",
                    help="more context sizes for the CFG memory rows (comma-separated; '' for none)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--n-ctx", type=int, default=N_CTX, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run(args.child, args.tokens, args.threads, args.n_ctx)))
        return

    def child(config: str, threads: int, n_ctx: int = N_CTX, tokens: int = args.tokens) -> dict:
        proc = subprocess.run([sys.executable, __file__, "--child", config, "--tokens", str(tokens),
                               "--threads", str(threads), "--n-ctx", str(n_ctx)],
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for config in CONFIGS:
            threads = max(2, args.threads) if config.endswith("concurrent") else args.threads
            result = child(config, threads)
            print(f"round {r + 1}: {config:18s} {result['tok_s']:6.1f} tok/s {result['cpu_ms_per_token']:6.1f} cpu ms/token",
                  flush=True)
            if config not in best or result["cpu_ms_per_token"] < best[config]["cpu_ms_per_token"]:
                best[config] = result
    b, v = best["base"], best["smollm2"]
    ideal2 = 1e3 / (b["step_ms"] + 2 * v["step_ms"])
    ideal3 = 1e3 / (2 * b["step_ms"] + 2 * v["step_ms"])
    print(f"\nGemma 3 270M base, SmolLM2 135M terms, {args.tokens} tokens, {args.threads} thread(s), "
          f"n_ctx {N_CTX}, best of {args.rounds}, cpu_count {os.cpu_count()}")
    print(f"{'':22s} {'tok/s':>7s} {'step ms':>8s} {'fuse+sample ms':>15s} {'share':>6s} {'peak RSS MB':>12s}")
    for config in CONFIGS:
        x = best[config]
        print(f"{config:22s} {x['tok_s']:7.1f} {x['step_ms']:8.1f} {x['fuse_ms']:15.3f} "
              f"{x['fuse_ms'] / x['step_ms']:6.1%} {x['rss_mb']:12.0f}")
    print(f"\nbase + 2 terms vs ideal 1/(t_base + 2 t_smollm2) = {ideal2:.1f} tok/s: "
          f"{best['base+2']['tok_s'] / ideal2:.2f}x")
    print(f"base + 3 terms (2 SmolLM2 + a Gemma CFG context) vs ideal {ideal3:.1f} tok/s: "
          f"{best['base+3']['tok_s'] / ideal3:.2f}x")
    print(f"fusion + sampling share of a 3-term step: {best['base+3']['fuse_ms'] / best['base+3']['step_ms']:.2%}")
    print(f"concurrent vs sequential (3 terms): {best['base+3-concurrent']['tok_s'] / best['base+3']['tok_s']:.2f}x")
    memory = [(N_CTX, b, best["base+cfg"])]
    for n_ctx in (int(n) for n in args.memory_n_ctx.split(",") if n.strip()):
        memory.append((n_ctx, child("base", args.threads, n_ctx, 8), child("base+cfg", args.threads, n_ctx, 8)))
    for n_ctx, alone, cfg in memory:
        extra = cfg["rss_mb"] - alone["rss_mb"]
        print(f"CFG at n_ctx {n_ctx}: {cfg['models']} model loaded; extra peak RSS {extra:.1f} MB vs its "
              f"KV cache {cfg['extra_kv_mb']:.1f} MB ({extra / cfg['extra_kv_mb']:.2f}x; "
              f"{extra - cfg['extra_kv_mb']:+.1f} MB beside it)")


if __name__ == "__main__":
    main()
