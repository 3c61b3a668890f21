"""End-to-end decode speed and memory of the Engine on real models, side by side in one run.

    PYTHONPATH=. python benchmarks/bench_engine.py [--tokens 48] [--threads 1] [--rounds 3]
    PYTHONPATH=. python benchmarks/bench_engine.py --configs fused,fused-candidates   # map_mode cost
    PYTHONPATH=. python benchmarks/bench_engine.py --configs fused,fused-logprob,fused-shared

Cross-vocabulary case: Gemma 3 270M base (262k SentencePiece vocabulary) + SmolLM2 135M
value (49k byte-level BPE vocabulary), alpha 1, llama.cpp's default sampling chain (top-k 40,
temperature 0.8, top-p 0.95, min-p 0.05). Rows:

  base alone            Engine(gemma) - llama_decode of one model per token
  value alone           Engine(smollm2)
  ideal sequential      1 / (t_base + t_value): both decodes back to back, nothing else
  fused, sequential     Engine(gemma, smollm2): decode both + text sync + _core._fuse_and_sample
  fused, concurrent     the same with concurrent=True (the two decodes on two threads)
  fused, candidates     fused, sequential with map_mode="candidates" (candidates_k 8): the value's
                        log-softmax, and each step the base's 8 best tokens whose text is several
                        SmolLM2 tokens scored by the value model (extra value decodes, rolled back)
  fused, logprob        fused, sequential with map_mode="logprob": the value's log-softmax through
                        the map, unmapped tokens at its mean (one more pass over the value logits)
  fused, shared         map_mode="shared": logprob, a value token's probability split among the base
                        tokens mapped to it as the base splits its own (a pass over the base logits)
  numpy baseline        llama-cpp-python high-level Llama.eval for both models, the same text
                        sync, and a numpy logits processor: fuse + map, argsort, the same chain

`--memory`: peak RSS stage by stage (imports, each model and context, decoding; raw backend
vs Engine, each in its own process), split into anonymous memory and mmap'ed weights, with
llama.cpp's own buffer sizes from its log, against files + KV.

Timing starts once the prompt is decoded and the first token is out (steady-state decode).
Each configuration runs in its own subprocess (clean peak RSS), `--rounds` times
interleaved; the round with the least CPU time per token counts (other processes on a
shared machine only slow a run down). Both wall-clock tokens/s and CPU ms per token are
shown: on a busy machine the CPU figure is the steadier one (it is not meaningful for the
concurrent row, whose point is overlapping two decodes in wall time). Peak RSS is compared
with what must be resident: both model files (mmap'ed) and both KV caches (f16, from the
GGUF shapes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

# llama.cpp's default chain (SamplingConfig's defaults): top-k 40, temperature, top-p, min-p
ALPHA, TOP_K, TEMPERATURE, TOP_P, MIN_P = 1.0, 40, 0.8, 0.95, 0.05
PROMPT = "Here is a short story about a robot who learns to paint:\n"
N_CTX = 512
MAP_MODE_CONFIGS = {"fused-candidates": "candidates", "fused-logprob": "logprob", "fused-shared": "shared"}
CONFIGS = ["base", "value", "fused", "fused-concurrent", *MAP_MODE_CONFIGS, "numpy"]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kv_cache_mb(path, n_ctx: int) -> float:
    """f16 K and V for every layer and position, from the GGUF's shapes."""
    from ivl_local.valuefile import read_gguf_header

    md = read_gguf_header(path).metadata
    arch = md["general.architecture"]
    layers, heads_kv = int(md[f"{arch}.block_count"]), int(md[f"{arch}.attention.head_count_kv"])
    head_dim = int(md.get(f"{arch}.attention.key_length",
                          int(md[f"{arch}.embedding_length"]) // int(md[f"{arch}.attention.head_count"])))
    return layers * n_ctx * heads_kv * head_dim * 2 * 2 / 2**20


# --- one configuration, in a subprocess -------------------------------------------------------

def steady_state(engine, prompt: str, tokens: int, sampling) -> dict:
    """Warm up, then time `tokens` decoded after `prompt`: the clock starts once the prompt is
    decoded and a token is out. Per-token wall and CPU time, and each engine timer's share."""
    engine.complete("Warm up.", max_tokens=2, sampling=sampling)
    engine.clear_cache()
    stream = engine.generate(prompt, max_tokens=tokens, sampling=sampling)
    next(stream)
    s = engine.stats
    timers = {"base_ms": "base_decode_s", "value_ms": "value_decode_s", "fuse_ms": "fuse_sample_s"}
    n0, start = s.completion_tokens, {key: getattr(s, name) for key, name in timers.items()}
    term = engine._value_term
    scorer = term.sources[0].scorer if term is not None else None   # map_mode "candidates"
    decodes0 = scorer.decodes if scorer is not None else 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in stream:
        pass
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = s.completion_tokens - n0
    out = dict(tokens=n, tok_s=n / wall, cpu_ms_per_token=cpu / n * 1e3, step_ms=wall / n * 1e3,
               **{key: (getattr(s, name) - start[key]) / n * 1e3 for key, name in timers.items()})
    if scorer is not None:
        out["scoring_decodes_per_token"] = (scorer.decodes - decodes0) / n
    return out


def run_engine(config: str, tokens: int, threads: int) -> dict:
    from ivl_local import SamplingConfig
    from ivl_local.engine import Engine
    from ivl_local.models import resolve_model

    gemma, smollm2 = resolve_model("gemma3-270m"), resolve_model("smollm2-135m")
    base, value = {"base": (gemma, None), "value": (smollm2, None)}.get(config, (gemma, smollm2))
    warnings.simplefilter("ignore")  # raw value model warning
    engine = Engine(base, value, ALPHA, n_ctx=N_CTX, n_threads=threads,
                    concurrent=config == "fused-concurrent",
                    map_mode=MAP_MODE_CONFIGS.get(config, "raw"))
    sampling = SamplingConfig(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P, seed=1)
    out = steady_state(engine, PROMPT, tokens, sampling)
    out.update(files_mb=(os.path.getsize(base) + (os.path.getsize(value) if value else 0)) / 2**20,
               kv_mb=kv_cache_mb(base, engine.n_ctx) + (kv_cache_mb(value, engine._value_ctx.n_ctx)
                                                          if value else 0.0))
    engine.close()
    out["rss_mb"] = peak_rss_mb()
    return out


def run_numpy(tokens: int, threads: int) -> dict:
    """What a user writes today: two llama_cpp.Llama objects and a numpy logits processor."""
    import llama_cpp
    from ivl_local.backend import safe_llama_params
    import numpy as np

    from ivl_local.models import resolve_model
    from ivl_local.valuefile import read_gguf_header
    from ivl_local.vocab import read_vocab, resolve_mapping

    gemma, smollm2 = resolve_model("gemma3-270m"), resolve_model("smollm2-135m")
    kw = dict(n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
    with safe_llama_params():
        base = llama_cpp.Llama(str(gemma), **kw)
    with safe_llama_params():
        value = llama_cpp.Llama(str(smollm2), **{**kw, "n_ctx": 2 * N_CTX})
    mapping = resolve_mapping(read_vocab(read_gguf_header(gemma)), read_vocab(read_gguf_header(smollm2)),
                              lambda t: value.tokenize(t, add_bos=False, special=False))
    token_map, weights = mapping.token_map, mapping.token_weights
    mapped = token_map >= 0
    safe_map = np.where(mapped, token_map, 0)
    rng = np.random.default_rng(1)
    eos = base.token_eos()

    def value_sync(text: bytes):
        ids = value.tokenize(text, add_bos=True, special=True)
        keep = 0
        old = value.input_ids[:value.n_tokens].tolist()
        while keep < min(len(ids), len(old)) and ids[keep] == old[keep]:
            keep += 1
        keep = min(keep, len(ids) - 1)
        value.n_tokens = keep  # Llama.eval rolls the KV cache back to n_tokens
        value.eval(ids[keep:])

    def step_logits():
        b = base.scores[base.n_tokens - 1]
        v = value.scores[value.n_tokens - 1]
        fused = b + ALPHA * np.where(mapped, weights * v[safe_map], 0.0)   # (262144,)
        order = np.argsort(-fused)[:TOP_K]                                  # full sort, then top-k
        z = fused[order] / TEMPERATURE
        p = np.exp(z - z.max())
        p /= p.sum()
        cut = int(np.searchsorted(np.cumsum(p), TOP_P)) + 1                 # top-p
        keep = np.flatnonzero(p[:cut] >= MIN_P * p[0])                      # min-p
        q = p[keep] / p[keep].sum()
        return int(order[keep[rng.choice(len(keep), p=q)]])

    text = PROMPT.encode()
    base.eval(base.tokenize(text, add_bos=True, special=True))
    value_sync(text)
    t_fuse, n, cpu0, wall0 = 0.0, 0, 0.0, 0.0
    for step in range(tokens):
        if step == 1:  # steady state, as for the engine: the first token is out
            cpu0, wall0 = time.process_time(), time.perf_counter()
        f0 = time.perf_counter()
        tok = step_logits()
        if step >= 1:
            t_fuse += time.perf_counter() - f0
            n += 1
        if tok == eos or step == tokens - 1:
            break
        text += base.detokenize([tok])
        base.eval([tok])
        value_sync(text)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    base.close()
    value.close()
    return dict(tokens=n, tok_s=n / wall, cpu_ms_per_token=cpu / n * 1e3, fuse_ms=t_fuse / n * 1e3,
                step_ms=wall / n * 1e3, rss_mb=peak_rss_mb())


# --- memory: where peak RSS goes, stage by stage --------------------------------------------------

def rss_now() -> dict:
    """This process's resident memory (MB): total, anonymous, file-backed (mmap'ed weights), peak."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return dict(rss=fields["VmRSS"], anon=fields["RssAnon"], file=fields["RssFile"],
                peak=fields["VmHWM"])


def run_memory(kind: str, tokens: int, threads: int, models: str = "gemma3-270m,smollm2-135m") -> dict:
    """Stages of one process: imports, the two models and contexts raw (backend.py, as the
    Engine makes them, llama.cpp's log on for its buffer sizes), a decode in each; or the same
    through Engine (construction, then a generation). Each stage's RSS split anon / file."""
    import numpy as np

    from ivl_local import _core, backend  # noqa: F401  (the extension's own footprint)
    from ivl_local.models import resolve_model

    gemma, smollm2 = (resolve_model(name) for name in models.split(","))   # base, value (--memory-models)
    stages = [("python, numpy, ivl_local, _core", rss_now())]
    from ivl_local.valuefile import read_gguf_header
    from ivl_local.vocab import read_vocab

    same_vocab = len({read_vocab(read_gguf_header(p)).fingerprint for p in (gemma, smollm2)}) == 1
    # the Engine's value window: the base's with one vocabulary, twice it across vocabularies
    value_ctx = N_CTX if same_vocab else min(2 * N_CTX, 8192)
    out = dict(files_mb=(os.path.getsize(gemma) + os.path.getsize(smollm2)) / 2**20,
               kv_mb=kv_cache_mb(gemma, N_CTX) + kv_cache_mb(smollm2, value_ctx))
    if kind == "mem-vocab":  # what llama.cpp holds for a vocabulary alone
        base_vocab = backend.Model(gemma, vocab_only=True)
        stages.append((f"+ base vocabulary only ({base_vocab.vocab.n_tokens:,} tokens)", rss_now()))
        value_vocab = backend.Model(smollm2, vocab_only=True)
        stages.append((f"+ value vocabulary only ({value_vocab.vocab.n_tokens:,} tokens)", rss_now()))
        del base_vocab, value_vocab
    elif kind == "mem-raw":
        base_model = backend.Model(gemma, verbose=True)
        stages.append(("+ base model (mmap)", rss_now()))
        base_ctx = backend.Context(base_model, n_ctx=N_CTX, n_threads=threads)
        stages.append(("+ base context", rss_now()))
        value_model = backend.Model(smollm2, verbose=True)
        value_ctxt = backend.Context(value_model, n_ctx=value_ctx, n_threads=threads)
        stages.append(("+ value model and context", rss_now()))
        for model, ctx in ((base_model, base_ctx), (value_model, value_ctxt)):
            ids = model.vocab.tokenize(PROMPT)
            ctx.decode(ids, 0)
            for i in range(tokens):
                token = int(np.argmax(ctx.logits_array()))
                ctx.decode([token], len(ids) + i)
        stages.append((f"+ prompt and {tokens} tokens decoded in each", rss_now()))
    else:
        from ivl_local import SamplingConfig
        from ivl_local.engine import Engine

        warnings.simplefilter("ignore")
        engine = Engine(gemma, smollm2, ALPHA, n_ctx=N_CTX, n_threads=threads)
        stages.append((f"+ Engine({gemma.stem[:16]}, {smollm2.stem[:16]})", rss_now()))
        sampling = SamplingConfig(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, min_p=MIN_P,
                                  seed=1)
        for _ in engine.generate(PROMPT, max_tokens=tokens, sampling=sampling):
            pass
        stages.append((f"+ a generation of {tokens} tokens", rss_now()))
        engine.close()
    out["stages"] = stages
    return out


def print_memory(results: dict[str, tuple[dict, str]]) -> None:
    import re

    print("\npeak RSS, stage by stage (MB; anon = heap and llama.cpp buffers, file = mmap'ed "
          "weights paged in)")
    for kind, (res, log) in results.items():
        print(f"{kind}: files {res['files_mb']:.0f} + KV {res['kv_mb']:.0f} = "
              f"{res['files_mb'] + res['kv_mb']:.0f} MB")
        print(f"  {'stage':46s} {'rss':>6s} {'anon':>6s} {'file':>6s} {'peak':>6s} {'peak/(files+KV)':>16s}")
        for name, m in res["stages"]:
            ratio = m["peak"] / (res["files_mb"] + res["kv_mb"])
            print(f"  {name:46s} {m['rss']:6.0f} {m['anon']:6.0f} {m['file']:6.0f} {m['peak']:6.0f} "
                  f"{ratio:15.2f}x")
        buffers: dict[str, float] = {}
        for what, mib in re.findall(r"(\w[\w ]*?) (?:buffer )?size =\s*([\d.]+) MiB", log):
            buffers[what.strip()] = buffers.get(what.strip(), 0.0) + float(mib)
        if buffers:
            print("  llama.cpp's own log, summed over both models (MiB): " +
                  ", ".join(f"{k} {v:.1f}" for k, v in buffers.items()))


# --- driver -------------------------------------------------------------------------------------

def child(config: str, tokens: int, threads: int, memory_models: str) -> None:
    if config.startswith("mem-"):
        result = run_memory(config, tokens, threads, memory_models)
    elif config == "numpy":
        result = run_numpy(tokens, threads)
    else:
        result = run_engine(config, tokens, threads)
    print("RESULT " + json.dumps(result))


def run_child(config: str, args, with_log: bool = False):
    cmd = [sys.executable, __file__, "--child", config, "--tokens", str(args.tokens),
           "--threads", str(args.threads), "--prompt", args.prompt, "--memory-models", args.memory_models]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{config} failed:\n{out.stderr[-2000:]}")
    result = json.loads(line[len("RESULT "):])
    return (result, out.stderr) if with_log else result


def main() -> None:
    global PROMPT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--memory", action="store_true",
                    help="only the memory table: peak RSS stage by stage, raw backend vs Engine")
    ap.add_argument("--prompt", default=PROMPT, help="the text decoded after (default: a story opening)")
    ap.add_argument("--memory-models", default="gemma3-270m,smollm2-135m",
                    help="--memory: BASE,VALUE (e.g. qwen2.5-coder-1.5b,qwen2.5-coder-0.5b: larger files, "
                         "the same fixed overhead)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    PROMPT = args.prompt
    if args.child:
        return child(args.child, args.tokens, args.threads, args.memory_models)
    if args.memory:
        return print_memory({kind: run_child(kind, args, with_log=True)
                             for kind in ("mem-vocab", "mem-raw", "mem-engine")})

    configs = args.configs.split(",")
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for config in configs:
            res = run_child(config, args)
            # best round = least disturbed by other processes (lowest CPU time per token)
            if config not in best or res["cpu_ms_per_token"] < best[config]["cpu_ms_per_token"]:
                best[config] = res
            print(f"round {r + 1}: {config:17s} {res['tok_s']:6.1f} tok/s "
                  f"{res['cpu_ms_per_token']:6.1f} cpu ms/token", file=sys.stderr)

    print(f"\nGemma 3 270M base + SmolLM2 135M value, {args.tokens} tokens, {args.threads} thread(s) "
          f"per model, n_ctx {N_CTX}, best of {args.rounds} rounds, cpu_count {os.cpu_count()}")
    if "base" in best and "value" in best:
        b, v = best["base"], best["value"]
        best["ideal"] = dict(tok_s=1 / (1 / b["tok_s"] + 1 / v["tok_s"]),
                             cpu_ms_per_token=b["cpu_ms_per_token"] + v["cpu_ms_per_token"])
    order = ["base", "value", "ideal", "fused", "fused-concurrent", *MAP_MODE_CONFIGS, "numpy"]
    names = {"base": "base alone", "value": "value alone", "ideal": "ideal 1/(t_b+t_v)",
             "fused": "fused, sequential", "fused-concurrent": "fused, concurrent",
             **{key: f"fused, {mode}" for key, mode in MAP_MODE_CONFIGS.items()}, "numpy": "numpy baseline"}
    ideal = best.get("ideal")
    print(f"{'':20s} {'tok/s':>7s} {'vs ideal':>9s} {'cpu ms/tok':>11s} {'vs ideal':>9s} {'step ms':>8s} "
          f"{'fuse+sample ms':>15s} {'peak RSS MB':>12s} {'files+KV MB':>12s}")
    for key in order:
        if key not in best:
            continue
        r = best[key]

        def f(name, fmt):
            return format(r[name], fmt) if name in r else ""
        wall_ratio = f"{r['tok_s'] / ideal['tok_s']:.2f}x" if ideal else ""
        cpu_ratio = f"{ideal['cpu_ms_per_token'] / r['cpu_ms_per_token']:.2f}x" if ideal else ""
        files_kv = f"{r['files_mb'] + r['kv_mb']:.0f}" if "files_mb" in r else ""
        print(f"{names[key]:20s} {r['tok_s']:7.1f} {wall_ratio:>9s} {f('cpu_ms_per_token', '.1f'):>11s} "
              f"{cpu_ratio:>9s} {f('step_ms', '.1f'):>8s} {f('fuse_ms', '.3f'):>15s} "
              f"{f('rss_mb', '.0f'):>12s} {files_kv:>12s}")
    if "fused" in best and "numpy" in best:
        fz, nz = best["fused"], best["numpy"]
        print(f"\nfused engine vs numpy baseline: {fz['tok_s'] / nz['tok_s']:.2f}x tokens/s (wall), "
              f"{nz['cpu_ms_per_token'] / fz['cpu_ms_per_token']:.2f}x (cpu); "
              f"fuse+map+sample {fz['fuse_ms']:.3f} ms vs numpy {nz['fuse_ms']:.2f} ms per token "
              f"({nz['fuse_ms'] / max(fz['fuse_ms'], 1e-9):.0f}x)")
        print(f"fuse+sample share of a fused step: {fz['fuse_ms'] / fz['step_ms']:.2%}")
    for key, mode in MAP_MODE_CONFIGS.items():
        if key not in best or "fused" not in best:
            continue
        fc, fz = best[key], best["fused"]
        scoring = (f"; {fc['scoring_decodes_per_token']:.2f} scoring decodes per token"
                   if "scoring_decodes_per_token" in fc else "")
        print(f"map_mode {mode} vs raw (fused, sequential): {fc['tok_s'] / fz['tok_s']:.2f}x tokens/s "
              f"(wall), step {fc['step_ms'] / fz['step_ms'] - 1:+.0%} (wall), "
              f"{fc['cpu_ms_per_token'] / fz['cpu_ms_per_token'] - 1:+.0%} (cpu ms/token); "
              f"value ms/token {fz['value_ms']:.1f} -> {fc['value_ms']:.1f}; "
              f"fuse+sample ms/token {fz['fuse_ms']:.3f} -> {fc['fuse_ms']:.3f}{scoring}")
    if "fused-concurrent" in best and "fused" in best:
        print(f"concurrent vs sequential: {best['fused-concurrent']['tok_s'] / best['fused']['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
