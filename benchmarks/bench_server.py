"""`ivl serve` under concurrent clients, side by side with one client on the Python API.

    PYTHONPATH=. python benchmarks/bench_server.py [--tokens 48] [--clients 1,2,4] [--slots 1,2] [--threads N]

SmolLM2-135M alone (--value none), the same prompts and settings everywhere. Rows:

  python-api           one Engine in this process, one client (no HTTP): the baseline
  serve --slots S      an `ivl serve` process with S slots (each slot gets threads // S
                       threads), C clients each streaming one /v1/completions answer at once

(Each slot gets max(1, --threads // S) threads: with --threads 1, two slots use two.)

Columns: aggregate tokens/s (every client's completion tokens over the wall time from the first
request sent to the last answer ended), time to first token (mean and max over the clients,
as a client sees it: request sent to first text chunk), completion tokens in all. Each
(S, C) cell runs --rounds times; the round with the best aggregate is kept.

Slots decode one sequence each (no continuous batching): on a CPU, S slots at once share the
cores and the memory bandwidth, so the aggregate mostly shows what concurrency costs or saves
on this machine, not a batching gain.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import warnings

PROMPTS = ["Here is a short story about a robot who learns to paint:\n",
           "The history of the printing press begins",
           "A recipe for a simple tomato soup:\n",
           "Ten facts about the ocean:\n1."]
N_CTX = 512


def python_api(tokens: int, threads: int, rounds: int) -> dict:
    from ivl_local import SamplingConfig
    from ivl_local.engine import Engine
    from ivl_local.models import resolve_model

    warnings.simplefilter("ignore")
    sampling = SamplingConfig(temperature=0.0)
    best = None
    with Engine(resolve_model("smollm2-135m"), None, n_ctx=N_CTX, n_threads=threads) as engine:
        engine.complete("Warm up.", max_tokens=2, sampling=sampling)
        for _ in range(rounds):
            engine.clear_cache()
            t0 = time.perf_counter()
            ttft = None
            for _delta in engine.generate(f"(0) {PROMPTS[0]}", max_tokens=tokens, sampling=sampling):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
            wall = time.perf_counter() - t0
            n = engine.stats.completion_tokens
            row = {"tok_s": n / wall, "ttft_mean": ttft or wall, "ttft_max": ttft or wall, "tokens": n}
            best = row if best is None or row["tok_s"] > best["tok_s"] else best
    return best


def start_server(slots: int, threads: int) -> tuple[subprocess.Popen, str]:
    from ivl_local.models import resolve_model

    cmd = [sys.executable, "-P", "-m", "ivl_local.cli.main", "serve", "--base", str(resolve_model("smollm2-135m")),
           "--value", "none", "--port", "0", "--slots", str(slots), "--queue", "64", "--ctx", str(N_CTX),
           "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()
    if " on http://" not in line:
        proc.kill()
        raise SystemExit(f"ivl serve did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" on ")[1].split("/v1")[0]


def one_client(http, url: str, prompt: str, tokens: int, t_start: float, out: list) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    ttft, n = None, 0
    with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - t_start
    out.append((ttft, n, time.perf_counter()))


_requests = iter(range(1, 1 << 30))


def clients_at_once(url: str, n_clients: int, tokens: int) -> dict:
    """Each request's prompt starts with its own number: no slot reuses a cached prefix (the
    Python API row clears its cache too), so TTFT includes the whole prompt's decode."""
    import httpx

    results: list = []
    with httpx.Client(timeout=600) as http:
        t0 = time.perf_counter()
        workers = [threading.Thread(target=one_client,
                                    args=(http, url, f"({next(_requests)}) {PROMPTS[i % len(PROMPTS)]}",
                                          tokens, t0, results))
                   for i in range(n_clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    if len(results) != n_clients:
        raise SystemExit(f"{n_clients - len(results)} of {n_clients} clients failed")
    wall = max(end for _, _, end in results) - t0
    ttfts = [t if t is not None else wall for t, _, _ in results]
    total = sum(n for _, n, _ in results)
    return {"tok_s": total / wall, "ttft_mean": sum(ttfts) / len(ttfts), "ttft_max": max(ttfts), "tokens": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="max_tokens of every answer")
    ap.add_argument("--clients", default="1,2,4", help="concurrent clients, comma-separated")
    ap.add_argument("--slots", default="1,2", help="server slot counts, comma-separated")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads in all, per setup (default: one per free core, as ivl does)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if args.threads is None:
        from ivl_local.config import default_threads

        args.threads = default_threads()
    clients = [int(c) for c in args.clients.split(",")]
    slot_counts = [int(s) for s in args.slots.split(",")]

    rows = [("python-api", 1, python_api(args.tokens, args.threads, args.rounds))]
    for slots in slot_counts:
        proc, url = start_server(slots, args.threads)
        try:
            clients_at_once(url, 1, 2)   # warm up
            for n in clients:
                best = max((clients_at_once(url, n, args.tokens) for _ in range(args.rounds)),
                           key=lambda r: r["tok_s"])
                rows.append((f"serve --slots {slots}", n, best))
        finally:
            proc.terminate()
            proc.wait(60)

    print(f"SmolLM2-135M, {args.tokens} tokens per answer, {args.threads} thread(s) per setup "
          f"(a slot gets max(1, threads // slots)), greedy, "
          f"n_ctx {N_CTX}, {os.cpu_count()} cores (load {os.getloadavg()[0]:.1f})")
    print(f"{'setup':<18} {'clients':>7} {'agg tok/s':>10} {'ttft mean s':>12} {'ttft max s':>11} {'tokens':>7}")
    for name, n, r in rows:
        print(f"{name:<18} {n:>7} {r['tok_s']:>10.1f} {r['ttft_mean']:>12.3f} {r['ttft_max']:>11.3f} {r['tokens']:>7}")
    table = {(name, n): r for name, n, r in rows}
    api = table[("python-api", 1)]["tok_s"]
    for slots in slot_counts:
        for n in clients:
            r = table[(f"serve --slots {slots}", n)]
            print(f"serve --slots {slots}, {n} client{'s' * (n > 1)} vs python-api: {r['tok_s'] / api:.2f}x")
    if len(slot_counts) > 1:
        a, b = slot_counts[0], slot_counts[-1]
        for n in clients:
            ratio = table[(f"serve --slots {b}", n)]["tok_s"] / table[(f"serve --slots {a}", n)]["tok_s"]
            print(f"--slots {b} vs --slots {a}, {n} client{'s' * (n > 1)}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
