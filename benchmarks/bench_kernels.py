"""Micro-benchmark: one decode step's fuse + map + sample, C++ vs numpy, side by side.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--vocab 262144] [--iters 300]

For every SIMD level this CPU has, times `_core._fuse_and_sample` (identity map and a random
cross-vocabulary map with weights; top-k 40 / top-p 0.9 / temperature 0.8, and greedy) on
raw pointers, as the engine calls it, and prints the ratio to two numpy baselines:
  - "numpy argsort": what a Python logits_processor typically does (fuse, softmax over the
    vocabulary, argsort for top-k/top-p, draw);
  - "numpy argpartition": a careful numpy version (argpartition for top-k, softmax on 40).
Each figure is the median over several rounds of the mean over `iters` calls, in CPU time
of the calling thread (time.thread_time), so that other processes on a shared machine
inflate it less than wall time would; everything here runs on that one thread. The mapped
case maps the 262,144-token base onto a 151,936-token value vocabulary (Qwen2.5's size)
through a random map, 5 % unmapped: the cache-unfriendly worst case. The "real map" case is
the Engine's usual one, Gemma (262,144) -> SmolLM2 (49,152 value logits, L2-resident): the
cached map from ~/.cache/ivl-local/token-maps/ when one of that shape is there, else a
random map of that size. "top-k 0/top-p 0.9" is the no-top-k chain (softmax over the whole
vocabulary, exact nucleus), timed with fewer calls.

Then `_fuse_terms_and_sample` (a base plus N terms, issue 10) side by side with
`_fuse_and_sample` on the same inputs, per level: 1 term (identity; the real map), and 3
terms (an expert and an anti-expert as identity log-softmax terms, plus the real-map value
term). `--terms-only` runs just that table.

`--chat` (issue 12): µs per `_fuse_terms_and_sample` call, as the Engine makes it, at the
CLI's sampling defaults (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and the same
without top-k, for the base alone, a same-vocabulary value net and the real map. With
`--before PATH/_core*.so` (an extension built from an earlier commit) the same calls on that
build run in the same process, interleaved, and the ratio is printed. With `--logits FILE`
the rows use logits captured from real decoding (`--capture FILE` writes them: an Engine
generation of Gemma 3 270M with a SmolLM2 value net through the real map and a Gemma value
net, at the chat settings, recording each step's base and value logits), cycling through the
steps; synthetic logits are a poor stand-in (their cut points and spreads are not an LLM's).
`--cold` evicts them from cache before each call (in the Engine the value model decodes
between the base's decode and the fuse, and its weights stream through the caches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def load_core(so_path: str):
    """Another build of the extension as ivl_local._core. It must be the first one this
    process loads: an extension module of a name already loaded is handed back as is."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ivl_local._core", so_path)
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    sys.modules["ivl_local._core"] = core
    return core


if "--serve-core" in sys.argv:  # BeforeCore's child: the other build, before any import of ours
    _core = load_core(sys.argv[sys.argv.index("--serve-core") + 1])
else:
    from ivl_local import _core

TOP_K, TOP_P, TEMPERATURE, ALPHA = 40, 0.9, 0.8, 0.8


def timed_us(step, iters: int, rounds: int = 5) -> float:
    step()  # warm caches
    means = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(iters):
            step()
        means.append((time.thread_time() - start) / iters * 1e6)
    return statistics.median(means)


def make_inputs(vocab: int, n_value: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # LLM-like logits: a broad body plus a few strong candidates.
    base = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    base[rng.choice(vocab, 20, replace=False)] += 12.0
    value = (rng.standard_normal(n_value) * 0.5).astype(np.float32)
    token_map = rng.integers(0, n_value, vocab).astype(np.int32)
    token_map[rng.random(vocab) < 0.05] = -1  # 5 % of base tokens without a value token
    token_weights = np.where(token_map >= 0, 1.0, 0.0).astype(np.float32)
    return base, value, token_map, token_weights


def real_map(vocab: int, seed: int = 1):
    """(value, token_map, token_weights, label): the cached Gemma -> SmolLM2 map if present."""
    rng = np.random.default_rng(seed)
    for path in sorted((Path.home() / ".cache" / "ivl-local" / "token-maps").glob("*.npz")):
        with np.load(path) as data:
            token_map = data["token_map"]
            if token_map.size == vocab and token_map.max() < vocab // 2:
                n_value = int(token_map.max()) + 1
                value = (rng.standard_normal(n_value) * 0.5).astype(np.float32)
                return value, token_map, data["token_weights"], f"cached {path.name}"
    n_value = 49_152
    value = (rng.standard_normal(n_value) * 0.5).astype(np.float32)
    token_map = rng.integers(0, n_value, vocab).astype(np.int32)
    token_map[rng.random(vocab) < 0.024] = -1
    return value, token_map, np.where(token_map >= 0, 1.0, 0.0).astype(np.float32), "random"


def numpy_step(base, value, token_map, token_weights, rng, greedy: bool, partition: bool):
    if token_map is None:
        fused = base + ALPHA * value
    else:
        fused = base + ALPHA * token_weights * value[np.maximum(token_map, 0)]
    if greedy:
        return int(np.argmax(fused))
    if partition:
        top = np.argpartition(fused, -TOP_K)[-TOP_K:]
        top = top[np.argsort(-fused[top], kind="stable")]
        scaled = fused[top] / TEMPERATURE
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        ids = top
    else:
        scaled = fused / TEMPERATURE
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")[:TOP_K]
        probs = probs[order] / probs[order].sum()
        ids = order
    keep = int(np.searchsorted(np.cumsum(probs), TOP_P)) + 1
    probs = probs[:keep] / probs[:keep].sum()
    return int(ids[rng.choice(keep, p=probs)])


def bench_terms(base, value_same, real_value, real_tmap, real_tw, iters: int) -> None:
    """µs per step of _fuse_terms_and_sample vs _fuse_and_sample, per SIMD level."""
    rng = np.random.default_rng(2)
    expert = (rng.standard_normal(base.size) * 2.0).astype(np.float32)
    anti = (rng.standard_normal(base.size) * 2.0).astype(np.float32)
    scratch = np.empty_like(base)
    identity = (value_same.ctypes.data, value_same.size, None, None, ALPHA, "raw")
    mapped = (real_value.ctypes.data, real_value.size, real_tmap, real_tw, ALPHA, "raw")
    cases = {  # name -> (terms, the single-value _fuse_and_sample to compare with)
        "1 term identity": ([identity], (value_same, None, None)),
        f"1 term map {real_value.size:,}": ([mapped], (real_value, real_tmap, real_tw)),
        "3 terms (2 log_softmax + map)": (
            [(expert.ctypes.data, expert.size, None, None, 1.0, "log_softmax"),
             (anti.ctypes.data, anti.size, None, None, -1.0, "log_softmax"), mapped],
            (real_value, real_tmap, real_tw)),
    }
    modes = {"top-k 40/top-p 0.9": False, "greedy": True}
    print(f"\nfuse_terms_and_sample vs fuse_and_sample, vocab {base.size:,}; µs per decode step "
          "(3 terms: compared with fuse_and_sample of the mapped value alone)")
    header = (f"{'level':<8} {'terms':<31} {'sampling':<19} {'fuse_and_sample':>16} "
              f"{'fuse_terms':>11} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            for case, (terms, (vals, tmap, tw)) in cases.items():
                for mode, greedy in modes.items():
                    def sampler():
                        return _core.Sampler(temperature=0.0 if greedy else TEMPERATURE,
                                             top_k=TOP_K, top_p=TOP_P, min_p=0.0, seed=1)
                    one, many = sampler(), sampler()
                    single = timed_us(
                        lambda: _core._fuse_and_sample(one, base.ctypes.data, base.size,
                                                      vals.ctypes.data, vals.size, tmap,
                                                      ALPHA, tw, scratch), iters)
                    fused = timed_us(
                        lambda: _core._fuse_terms_and_sample(many, base.ctypes.data, base.size,
                                                            terms, 0.0, scratch), iters)
                    print(f"{level:<8} {case:<31} {mode:<19} {single:16.1f} {fused:11.1f} "
                          f"{fused / single:5.2f}x")
    finally:
        _core.set_simd_level("auto")


CHAT = {"chat (top-k 40)": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
        "chat, top-k off": dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.05)}


COLD_BYTES = 48 << 20  # more than this machine's L3: a pass over it evicts the logits


def chat_step(core, steps, terms_by_case, scratch, iters, cold=False):
    """(mode, case) -> µs of that Engine-style step on `core`, cycling through the steps.

    steps[s]: step s's base logits; terms_by_case[case][s]: (logits arrays, terms builder).
    As in the Engine, every step's logits sit in the same buffers, written just before the
    call (llama.cpp writes its output there, so they start in cache, not in DRAM); only the
    call is timed (thread CPU time around each call, summed). `cold`: a 48 MB pass after the
    copy, as the value model's decode between the base's and the fuse: the logits, map and
    scratch start in DRAM."""
    base_buffer = np.empty_like(steps[0])
    evict = np.zeros(COLD_BYTES // 4, np.float32) if cold else None
    base_ptr = base_buffer.ctypes.data  # an int, as llama_get_logits_ith's (ndarray.ctypes costs µs)

    def run(mode: str, case: str) -> float:
        sampler = core.Sampler(**CHAT[mode], seed=1)
        arrays, make_terms = terms_by_case[case]
        buffers = [np.empty_like(a[0]) for a in arrays]
        terms = make_terms(buffers)

        def call(s: int) -> int:
            np.copyto(base_buffer, steps[s])
            for buffer, a in zip(buffers, arrays):
                np.copyto(buffer, a[s])
            if evict is not None:
                np.add(evict, 1.0, out=evict)
            start = time.thread_time_ns()
            core._fuse_terms_and_sample(sampler, base_ptr, base_buffer.size, terms, 0.0, scratch)
            return time.thread_time_ns() - start

        for s in range(len(steps)):  # warm-up
            call(s)
        means = []
        for _ in range(3):
            total = sum(call(i % len(steps)) for i in range(iters))
            means.append(total / iters / 1e3)
        return statistics.median(means)
    return run


def chat_cases(values_same, real_values, real_tmap, real_tw):
    """case -> (per-step logits arrays of its terms, buffers -> the Engine's terms)."""
    return {
        "base alone": ([], lambda buffers: []),
        "same vocab": ([values_same], lambda buffers: [
            (buffers[0].ctypes.data, buffers[0].size, None, None, ALPHA, "raw")]),
        "real map": ([real_values], lambda buffers: [
            (buffers[0].ctypes.data, buffers[0].size, real_tmap, real_tw, ALPHA, "raw")]),
    }


CAPTURE_PROMPTS = ["What is 17 * 23? Explain step by step.",
                   "Write a short story about a robot who learns to paint."]


def capture(out_path: str, tokens: int) -> None:
    """Real decoding's logits, step by step: Gemma 3 270M base + a SmolLM2 value net (the
    real map) + a Gemma value net (same vocabulary), chat settings, top-k 40."""
    from ivl_local import Engine
    from ivl_local.backend import logits_view
    from ivl_local.config import SamplingConfig
    from ivl_local.models import cache_dir
    from ivl_local.terms import ValueNet

    trained = cache_dir() / "eval" / "trained"
    smol = sorted(trained.glob("value-smollm2-135m-*/value.ivl.gguf"))
    gemma = sorted(trained.glob("value-gemma3-270m-*/value.ivl.gguf"))
    if not smol or not gemma:
        raise SystemExit(f"--capture needs a SmolLM2 and a Gemma value net under {trained}")
    recorded = {"base": [], "real": [], "same": []}
    real_fuse = _core._fuse_terms_and_sample
    maps = {}

    def recording(sampler, base_ptr, n_base, parts, mask, scratch):
        recorded["base"].append(np.array(logits_view(base_ptr, n_base)))
        for ptr, n, tmap, tw, _, _ in parts:
            key = "same" if tmap is None else "real"
            recorded[key].append(np.array(logits_view(ptr, n)))
            if tmap is not None:
                maps["token_map"], maps["token_weights"] = tmap, tw
        return real_fuse(sampler, base_ptr, n_base, parts, mask, scratch)

    _core._fuse_terms_and_sample = recording
    try:
        with Engine("gemma3-270m", terms=[ValueNet(str(smol[0]), 1.0), ValueNet(str(gemma[0]), 1.0)],
                    n_ctx=512) as engine:
            for prompt in CAPTURE_PROMPTS:
                text = engine.render_chat([{"role": "user", "content": prompt}])
                for _ in engine.generate(text, max_tokens=tokens, sampling=SamplingConfig(seed=3)):
                    pass
    finally:
        _core._fuse_terms_and_sample = real_fuse
    np.savez(out_path, base=np.stack(recorded["base"]), real=np.stack(recorded["real"]),
             same=np.stack(recorded["same"]), **maps)
    print(f"{len(recorded['base'])} steps -> {out_path} (value nets {smol[0]}, {gemma[0]})")


def load_steps(path: str):
    """(base steps, same-vocab value steps, real-map value steps, token_map, token_weights)."""
    with np.load(path) as data:
        return (list(data["base"]), list(data["same"]), list(data["real"]),
                data["token_map"], data["token_weights"])


class BeforeCore:
    """The same steps on an _core built from another commit, in a child process (pybind11
    registers its types once per process), asked row by row so both see the same load."""

    def __init__(self, so_path: str, argv: list[str]):
        import subprocess

        self.child = subprocess.Popen([sys.executable, __file__, *argv, "--serve-core", so_path],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, mode: str, case: str) -> float:
        self.child.stdin.write(f"{mode}\t{case}\n")
        self.child.stdin.flush()
        return float(self.child.stdout.readline())

    def close(self) -> None:
        self.child.stdin.close()
        self.child.wait()


def serve_core(so_path: str, steps) -> None:
    """Child side of BeforeCore: times rows on the other build, loaded as _core at import."""
    assert Path(_core.__file__).resolve() == Path(so_path).resolve(), _core.__file__
    run = steps(_core)
    for line in sys.stdin:
        mode, case = line.rstrip("\n").split("\t")
        print(run(mode, case), flush=True)


def bench_chat(steps, cases, iters: int, before, label: str, cold: bool) -> None:
    """µs per Engine-style step (_fuse_terms_and_sample) at the chat settings, best level."""
    scratch = np.empty_like(steps[0])
    now = chat_step(_core, steps, cases, scratch, iters, cold)
    label += ", cold caches (a 48 MB pass before each call)" if cold else ", logits in cache"
    print(f"\nfuse+sample at the chat settings, vocab {steps[0].size:,}, level "
          f"{_core.simd_level()}, {label}; µs per step (best of 2 interleaved medians, thread "
          f"CPU time; a shared machine inflates both)")
    header = f"{'sampling':<17} {'terms':<12} {'now':>9}"
    if before is not None:
        header += f" {'before':>9} {'before/now':>11}"
    print(header)
    print("-" * len(header))
    for mode in CHAT:
        for case in cases:
            figures = {"now": [], "before": []}
            for _ in range(2):
                figures["now"].append(now(mode, case))
                if before is not None:
                    figures["before"].append(before(mode, case))
            row = f"{mode:<17} {case:<12} {min(figures['now']):9.1f}"
            if before is not None:
                row += f" {min(figures['before']):9.1f} {min(figures['before']) / min(figures['now']):10.1f}x"
            print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--value-vocab", type=int, default=151_936)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--terms-only", action="store_true",
                        help="only the fuse_terms_and_sample table")
    parser.add_argument("--chat", action="store_true",
                        help="only the chat-settings table (base, same vocab, real map)")
    parser.add_argument("--before", metavar="SO", default=None,
                        help="an _core extension built from another commit, timed beside this one")
    parser.add_argument("--logits", metavar="NPZ", default=None,
                        help="--chat on logits captured from real decoding (see --capture)")
    parser.add_argument("--capture", metavar="NPZ", default=None,
                        help="decode with the real models and save each step's logits")
    parser.add_argument("--cold", action="store_true",
                        help="--chat with the logits evicted from cache before each call, as "
                             "in the Engine after the value model's decode")
    parser.add_argument("--capture-tokens", type=int, default=24,
                        help="tokens per capture prompt")
    parser.add_argument("--serve-core", metavar="SO", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.capture:
        capture(args.capture, args.capture_tokens)
        return

    base, value, token_map, token_weights = make_inputs(args.vocab, args.value_vocab)
    scratch = np.empty_like(base)
    rng = np.random.default_rng(0)
    value_same = np.resize(value, base.size)  # identity case: same vocabulary
    real_value, real_tmap, real_tw, real_label = real_map(args.vocab)
    if args.logits:
        steps, values_same, real_values, real_tmap, real_tw = load_steps(args.logits)
        chat_label = f"{len(steps)} captured steps of {args.logits}"
    else:
        steps, values_same, real_values = [base], [value_same], [real_value]
        chat_label = "synthetic logits"
    cases = chat_cases(values_same, real_values, real_tmap, real_tw)
    if args.serve_core:
        serve_core(args.serve_core,
                   lambda core: chat_step(core, steps, cases, scratch, args.iters, args.cold))
        return
    before = None
    if args.before:
        child_argv = ["--vocab", str(args.vocab), "--value-vocab", str(args.value_vocab),
                      "--iters", str(args.iters)]
        if args.logits:
            child_argv += ["--logits", args.logits]
        if args.cold:
            child_argv += ["--cold"]
        before = BeforeCore(args.before, child_argv)
    if args.chat:
        bench_chat(steps, cases, args.iters, before, chat_label, args.cold)
        if before is not None:
            before.close()
        return
    if args.terms_only:
        bench_terms(base, value_same, real_value, real_tmap, real_tw, args.iters)
        return
    cases = {  # name -> (value_logits, token_map, token_weights)
        "identity": (value_same, None, None),
        "mapped": (value, token_map, token_weights),
        "real map": (real_value, real_tmap, real_tw),
    }
    modes = {"top-k 40/top-p 0.9": False, "greedy": True}
    top_k_off = "top-k 0/top-p 0.9"

    numpy_us = {}
    for case, (vals, tmap, tw) in cases.items():
        for mode, greedy in modes.items():
            for partition in (False, True):
                numpy_us[case, mode, partition] = timed_us(
                    lambda: numpy_step(base, vals, tmap, tw, rng, greedy, partition),
                    max(args.iters // 10, 10),
                )

    print(f"vocab {args.vocab:,}, alpha {ALPHA}, temperature {TEMPERATURE}; µs per decode step")
    print(f"available SIMD levels: {_core.available_simd_levels()} (auto: {_core.simd_level()})")
    print(f"mapped: random {args.vocab:,} -> {args.value_vocab:,}; real map: {args.vocab:,} -> "
          f"{real_value.size:,} ({real_label})")
    header = (f"{'level':<8} {'map':<9} {'sampling':<19} {'C++ µs':>8} {'numpy argsort':>14} "
              f"{'ratio':>7} {'numpy argpart':>14} {'ratio':>7}")
    print(header)
    print("-" * len(header))
    try:
        for level in _core.available_simd_levels():
            _core.set_simd_level(level)
            for case, (vals, tmap, tw) in cases.items():
                for mode, greedy in modes.items():
                    sampler = _core.Sampler(temperature=0.0 if greedy else TEMPERATURE,
                                            top_k=TOP_K, top_p=TOP_P, min_p=0.0, seed=1)
                    cxx = timed_us(
                        lambda: _core._fuse_and_sample(sampler, base.ctypes.data, base.size,
                                                      vals.ctypes.data, vals.size, tmap,
                                                      ALPHA, tw, scratch),
                        args.iters,
                    )
                    slow = numpy_us[case, mode, False]
                    fast = numpy_us[case, mode, True]
                    print(f"{level:<8} {case:<9} {mode:<19} {cxx:8.1f} {slow:14.1f} "
                          f"{slow / cxx:6.0f}x {fast:14.1f} {fast / cxx:6.0f}x")
            vals, tmap, tw = cases["identity"]
            sampler = _core.Sampler(temperature=TEMPERATURE, top_k=0, top_p=TOP_P, min_p=0.0,
                                    seed=1)
            cxx = timed_us(
                lambda: _core._fuse_and_sample(sampler, base.ctypes.data, base.size,
                                              vals.ctypes.data, vals.size, tmap, ALPHA, tw,
                                              scratch),
                max(args.iters // 10, 10),
            )
            print(f"{level:<8} {'identity':<9} {top_k_off:<19} {cxx:8.1f} {'-':>14} {'':>7} "
                  f"{'-':>14}")
        # Parts of the step, at the best level, to show where the time goes.
        _core.set_simd_level("auto")
        out = np.empty_like(base)
        fuse_id = timed_us(lambda: _core._fuse_logits_ptr(out.ctypes.data, base.ctypes.data,
                                                         base.size, value_same.ctypes.data,
                                                         value_same.size, None, ALPHA, None),
                           args.iters)
        fuse_map = timed_us(lambda: _core._fuse_logits_ptr(out.ctypes.data, base.ctypes.data,
                                                          base.size, value.ctypes.data,
                                                          value.size, token_map, ALPHA,
                                                          token_weights),
                            args.iters)
        fuse_real = timed_us(lambda: _core._fuse_logits_ptr(out.ctypes.data, base.ctypes.data,
                                                           base.size, real_value.ctypes.data,
                                                           real_value.size, real_tmap, ALPHA,
                                                           real_tw),
                             args.iters)
        sampler = _core.Sampler(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, min_p=0.0)
        sample_only = timed_us(lambda: sampler._sample_ptr(out.ctypes.data, out.size), args.iters)
        print(f"\nparts at {_core.simd_level()}: fuse identity {fuse_id:.1f} µs, fuse mapped "
              f"{fuse_map:.1f} µs, fuse real map {fuse_real:.1f} µs, sample_ptr (NaN check + "
              f"top-k 40/top-p 0.9) {sample_only:.1f} µs")
    finally:
        _core.set_simd_level("auto")
    bench_terms(base, value_same, real_value, real_tmap, real_tw, args.iters)
    bench_chat(steps, cases, args.iters, before, chat_label, args.cold)
    if before is not None:
        before.close()


if __name__ == "__main__":
    main()
