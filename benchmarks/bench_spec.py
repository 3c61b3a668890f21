"""Speculative fused decoding against plain decoding, side by side in one run.

    PYTHONPATH=. python benchmarks/bench_spec.py [--tokens 64] [--threads 1] [--families gemma,qwen]
                                                 [--rounds 2] [--draft-max 8] [--draft-min 0]

Compositions (greedy, raw completion of three prompt kinds: code to copy and extend, a story,
a question about a quoted passage):

  gemma base            Gemma 3 270M alone
  gemma + smollm2       + SmolLM2 135M as value (cross-vocabulary: text sync, token map)
  qwen1.5b base         Qwen2.5-Coder 1.5B alone
  qwen1.5b + qwen0.5b   + Qwen2.5-Coder 0.5B as value (same vocabulary)

Columns: tokens/s of plain decoding, with prompt-lookup drafts (`draft="ngram"`) and with a
draft model (Qwen 0.5B for the Qwen rows; Gemma has no smaller model with its vocabulary
here), each with its acceptance rate, and the speed-up over plain. Every speculative run's
tokens are checked against the plain run's (greedy: they must be identical; `same` column).
tokens/s = answer tokens / decode time after the prompt (the prompt's prefill excluded);
the caches are cleared before each run. The machine may be shared: runs are interleaved
(every mode of a prompt one after the other) for `--rounds` rounds and each cell keeps its
fastest round; CPU ms per token (all threads) is printed too, steadier than wall time when
other processes hold the cores. Compare columns of one run; the load average is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

PROMPTS = {
    "code": (
        "Original:\n\ndef total_price(items, tax_rate, discount=None):\n    subtotal = 0\n"
        "    for item in items:\n        subtotal += item.price * item.quantity\n"
        "    if discount is not None:\n        subtotal -= discount.amount(subtotal)\n"
        "    tax = subtotal * tax_rate\n    return round(subtotal + tax, 2)\n\n"
        "The same function with `subtotal` renamed to `net`:\n\n"
        "def total_price(items, tax_rate, discount=None):\n"),
    "story": "Once upon a time, in a small village at the edge of a great forest, there lived a",
    "quote": (
        "Passage: The lighthouse on Gull Rock was built in 1858 from granite quarried on the "
        "island itself. Its lamp, first lit with whale oil, was converted to kerosene in 1880 "
        "and to electricity in 1932. The keeper's house burned down in 1947, and the light has "
        "been automatic ever since.\n\nQuestion: Quote the sentence of the passage that says "
        "how the lamp was powered over the years.\nAnswer: \""),
}

FAMILIES = {
    "gemma": [("gemma base", "gemma3-270m", None, None), ("gemma + smollm2", "gemma3-270m", "smollm2-135m", None)],
    "qwen": [("qwen1.5b base", "qwen2.5-coder-1.5b", None, "qwen2.5-coder-0.5b"),
             ("qwen1.5b + qwen0.5b", "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b")],
}


def run(engine, prompt: str, tokens: int) -> tuple[list[int], float, float, float | None]:
    """(tokens, tokens/s, CPU ms per token, acceptance rate) of one greedy answer; the clock
    starts after the prompt's prefill (the first token's sampling included)."""
    from ivl_local import GREEDY

    engine.clear_cache()
    stream = engine.generate(prompt, max_tokens=tokens, sampling=GREEDY)
    next(stream)
    cpu0, wall0, n0 = time.process_time(), time.perf_counter(), engine.stats.completion_tokens
    for _ in stream:
        pass
    s = engine.stats
    n = s.completion_tokens - n0
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rate = s.acceptance_rate if s.drafted else None
    return list(engine._last_completion_tokens), n / wall, cpu / n * 1e3, rate


def verify_cost(path, threads: int, sizes=(4, 8)) -> str:
    """CPU ms of a one-token decode, and of a batch of 1 + k tokens with logits at each (what a
    verification decodes), as the price of one extra position relative to the one-token step:
    the quantity the adaptive draft length assumes (speculative.VERIFY_COST)."""
    from ivl_local.backend import Context, Model

    with Model(path) as model, Context(model, n_ctx=512, n_threads=threads) as ctx:
        tokens = model.vocab.tokenize(PROMPTS["code"])[:64]
        ctx.decode(tokens[:32], 0)

        def cpu_ms(n: int) -> float:
            times = []
            for _ in range(5):
                ctx.truncate(32)
                t0 = time.process_time()
                ctx.decode(tokens[32:32 + n], 32, logits_all=True)
                times.append(time.process_time() - t0)
            return min(times) * 1e3

        one = cpu_ms(1)
        parts = [f"1 token {one:.0f} ms"]
        for k in sizes:
            batch = cpu_ms(1 + k)
            parts.append(f"1+{k} tokens {batch:.0f} ms ({(batch - one) / k / one:.2f} of a step per position)")
        return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--draft-max", type=int, default=8)
    parser.add_argument("--draft-min", type=int, default=0, help="= --draft-max: a fixed draft length")
    parser.add_argument("--families", default="gemma,qwen")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from ivl_local.engine import Engine
    from ivl_local.errors import ModelNotFoundError
    from ivl_local.models import resolve_model

    warnings.simplefilter("ignore")   # raw value models
    print(f"# bench_spec: {args.tokens} tokens greedy, {args.threads} thread(s), draft_max {args.draft_max}, "
          f"draft_min {args.draft_min}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print("tok/s (x: over plain), acceptance, CPU ms/token (x: plain's / this)")
    print(f"{'composition':20} {'prompt':6} {'plain':>6} {'cpu':>5} | {'ngram':>6} {'x':>5} {'acc':>4} "
          f"{'cpu':>5} {'x':>5} | {'model':>6} {'x':>5} {'acc':>4} {'cpu':>5} {'x':>5} | same")
    for family in args.families.split(","):
        for name, base, value, draft_model in FAMILIES[family]:
            try:
                paths = [resolve_model(m) for m in (base, value, draft_model) if m]
            except ModelNotFoundError as e:
                print(f"{name:22} skipped: {e}")
                continue
            if value is None:
                print(f"# {base}: {verify_cost(resolve_model(base), args.threads)}", flush=True)
            drafts = [None, "ngram"] + ([resolve_model(draft_model)] if draft_model else [])
            engines = []
            for draft in drafts:   # every mode loaded at once: runs interleave
                kw = dict(draft=draft, draft_max=args.draft_max, draft_min=args.draft_min) if draft else {}
                engines.append(Engine(resolve_model(base), resolve_model(value) if value else None,
                                      n_ctx=1024, n_threads=args.threads, **kw))
                engines[-1].complete("Warm up.", max_tokens=2)
            best: dict = {}
            for _ in range(args.rounds):
                for kind, prompt in PROMPTS.items():
                    for i, engine in enumerate(engines):
                        got = run(engine, prompt, args.tokens)
                        old = best.get((i, kind))
                        best[(i, kind)] = got if old is None else (
                            got[0], max(got[1], old[1]), min(got[2], old[2]), got[3])
            for engine in engines:
                engine.close()
            for kind in PROMPTS:
                plain_tokens, plain, plain_cpu, _ = best[(0, kind)]
                row, same = f"{name:20} {kind:6} {plain:6.1f} {plain_cpu:5.0f}", []
                for i in range(1, len(drafts)):
                    tokens, speed, cpu, rate = best[(i, kind)]
                    row += (f" | {speed:6.1f} {speed / plain:5.2f} {(rate or 0) * 100:3.0f}% "
                            f"{cpu:5.0f} {plain_cpu / cpu:5.2f}")
                    same.append(tokens == plain_tokens)
                if len(drafts) == 2:
                    row += f" | {'-':>6} {'-':>5} {'-':>4} {'-':>5} {'-':>5}"
                print(row + " | " + ("yes" if all(same) else "NO"), flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
