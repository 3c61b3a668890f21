"""The Engine's concurrency contract (ivl_local/guard.py), on the real small models.

One generation at a time per Engine (another thread gets EngineBusyError); close() from any
thread stops a running generation at its next token and only then frees llama.cpp; every call
after close() is EngineClosedError. Each case that used to crash the process natively
(segfault, GGML_ASSERT abort) is also run in a subprocess, so a regression shows as an exit
code here instead of killing the test run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from ivl_local import GREEDY, SamplingConfig
from ivl_local.engine import Engine
from ivl_local.errors import (ConfigError, ContextOverflowError, EngineBusyError, EngineClosedError,
                              GenerationSuperseded, IVLError)
from ivl_local.guard import Guard
from ivl_local.valuefile import RawValueModelWarning

PROMPT = "The capital of France is"
KW = dict(n_ctx=256, n_threads=1)
ROUNDS = int(os.environ.get("IVL_THREAD_ROUNDS", "12"))   # each stress test repeats this often


# --- the Guard alone (no model) ----------------------------------------------------------------

def test_guard_one_generation_at_a_time_across_threads():
    guard = Guard()
    ticket = guard.claim()
    errors = []

    def other():
        try:
            guard.claim()
        except EngineBusyError as e:
            errors.append(e)

    t = threading.Thread(target=other, name="second-caller")
    t.start()
    t.join()
    assert len(errors) == 1 and "one generation at a time" in str(errors[0])
    guard.release(ticket)
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1  # free again: the second thread's claim went through


def test_guard_same_thread_supersedes_and_dead_threads_do_not_block():
    guard = Guard()
    old = guard.claim()
    new = guard.claim()
    with pytest.raises(GenerationSuperseded):
        with guard.work(old):
            pass
    with guard.work(new):
        pass
    guard.release(old)            # a stale release does not free the newer generation
    busy = []
    probe = threading.Thread(target=lambda: busy.append(pytest.raises(EngineBusyError, guard.claim)))
    probe.start()
    probe.join()
    assert len(busy) == 1
    guard.release(new)
    holder = threading.Thread(target=guard.claim)
    holder.start()
    holder.join()                 # it claimed and died without releasing
    guard.claim()                 # a dead owner's generation is taken over, not waited for


def test_guard_close_waits_for_work_and_refuses_everything_after():
    guard = Guard()
    freed, inside, release = [], threading.Event(), threading.Event()

    def worker():
        with guard.work():
            inside.set()
            release.wait(5)
            assert not freed      # nothing is freed while work runs

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(5)
    closer = threading.Thread(target=guard.close, args=(lambda: freed.append(1),))
    closer.start()
    time.sleep(0.05)
    assert closer.is_alive() and not freed   # close() waits for the running work
    release.set()
    t.join()
    closer.join()
    assert freed == [1]
    guard.close(lambda: freed.append(2))     # twice: freed once
    assert freed == [1]
    with pytest.raises(EngineClosedError):
        guard.claim()
    with pytest.raises(EngineClosedError):
        with guard.work():
            pass


def test_guard_close_from_inside_work_defers_the_free():
    guard = Guard()
    freed = []
    with guard.work():
        guard.close(lambda: freed.append(1))  # a signal handler or callback on this thread
        assert freed == []                    # not under the running work
    assert freed == [1]


def test_guard_deferred_free_runs_when_the_work_raises():
    guard = Guard()
    freed = []
    with pytest.raises(KeyboardInterrupt):
        with guard.work():
            guard.close(lambda: freed.append(1))   # a handler inside a step...
            assert freed == []
            raise KeyboardInterrupt                # ...which then raises
    assert freed == [1]


def test_guard_refuses_everything_but_close_from_inside_a_step():
    guard = Guard()
    ticket = guard.claim()
    with guard.work(ticket):
        for call in (guard.claim, guard.check_available, lambda: guard.work().__enter__()):
            with pytest.raises(EngineBusyError, match="inside one of its own steps"):
                call()
    with guard.work(ticket):                       # the refusals changed nothing
        pass


# --- real models -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(smollm2_path):
    with Engine(smollm2_path, None, **KW) as engine:
        return engine.complete(PROMPT, max_tokens=24, sampling=GREEDY)


def _stream_on_worker(engine, outcome, started, max_tokens=200, prompt=PROMPT):
    def run():
        try:
            for _ in engine.generate(prompt, max_tokens=max_tokens,
                                     sampling=SamplingConfig(temperature=0.9, seed=1)):
                started.set()
            outcome.append("done")
        except IVLError as e:
            outcome.append(e)
        finally:
            started.set()
    t = threading.Thread(target=run, name="answer-worker")
    t.start()
    return t


@pytest.mark.real
@pytest.mark.slow
def test_close_from_another_thread_while_generating(smollm2_path):
    """The README's desktop pattern: the UI thread closes the engine while a worker streams."""
    rng = random.Random(0)
    for _ in range(ROUNDS):
        engine = Engine(smollm2_path, None, **KW)
        outcome, started = [], threading.Event()
        worker = _stream_on_worker(engine, outcome, started)
        started.wait(30)
        time.sleep(rng.random() * 0.05)
        engine.close()
        worker.join(30)
        assert not worker.is_alive()
        assert outcome == ["done"] or isinstance(outcome[0], EngineClosedError), outcome
        assert engine.closed


@pytest.mark.real
@pytest.mark.slow
def test_close_while_a_cross_vocabulary_value_decodes_concurrently(smollm2_path, gemma3_path):
    """Value model on a worker pool (concurrent=True) and text sync: close() mid-answer."""
    for delay in (0.0, 0.02, 0.1):
        with pytest.warns(RawValueModelWarning):
            engine = Engine(gemma3_path, smollm2_path, concurrent=True, **{**KW, "n_threads": 2})
        outcome, started = [], threading.Event()
        worker = _stream_on_worker(engine, outcome, started)
        started.wait(60)
        time.sleep(delay)
        engine.close()
        worker.join(60)
        assert not worker.is_alive()
        assert outcome == ["done"] or isinstance(outcome[0], EngineClosedError), outcome


@pytest.mark.real
def test_two_threads_generating_at_once(smollm2_path, reference):
    with Engine(smollm2_path, None, **KW) as engine:
        for _ in range(ROUNDS):
            results = {}
            barrier = threading.Barrier(2)

            def ask(name):
                barrier.wait()
                try:
                    results[name] = engine.complete(PROMPT, max_tokens=24, sampling=GREEDY)
                except EngineBusyError as e:
                    results[name] = e

            threads = [threading.Thread(target=ask, args=(n,)) for n in ("a", "b")]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            answers = [r for r in results.values() if isinstance(r, str)]
            busy = [r for r in results.values() if isinstance(r, EngineBusyError)]
            assert len(answers) + len(busy) == 2 and answers   # one got through at least
            assert all(a == reference for a in answers)        # and is exact
        assert engine.complete(PROMPT, max_tokens=24, sampling=GREEDY) == reference


@pytest.mark.real
def test_an_open_generator_on_another_thread_keeps_the_engine_busy(smollm2_path, reference):
    with Engine(smollm2_path, None, **KW) as engine:
        holder_ready, holder_go = threading.Event(), threading.Event()
        state = {}

        def holder():
            stream = engine.generate(PROMPT + " (x)", max_tokens=50, sampling=GREEDY)
            next(stream)
            holder_ready.set()
            holder_go.wait(30)
            stream.close()
            state["closed"] = True

        t = threading.Thread(target=holder, name="holder")
        t.start()
        holder_ready.wait(30)
        with pytest.raises(EngineBusyError, match="holder"):
            engine.complete(PROMPT, max_tokens=24, sampling=GREEDY)
        with pytest.raises(EngineBusyError):
            engine.clear_cache()
        holder_go.set()
        t.join(30)
        assert state == {"closed": True}
        assert engine.complete(PROMPT, max_tokens=24, sampling=GREEDY) == reference


@pytest.mark.real
def test_every_call_after_close_is_a_typed_error(smollm2_path):
    engine = Engine(smollm2_path, None, **KW)
    stream = engine.generate(PROMPT, max_tokens=8, sampling=GREEDY)
    unstarted = engine.generate(PROMPT, max_tokens=8, sampling=GREEDY)
    next(stream)
    engine.close()
    engine.close()                                  # twice is fine
    messages = [{"role": "user", "content": "hi"}]
    calls = [lambda: engine.tokenize("hello"), lambda: engine.complete(PROMPT),
             lambda: engine.generate(PROMPT), lambda: engine.chat(messages),
             lambda: list(engine.chat_deltas(messages)), lambda: engine.clear_cache(),
             lambda: engine.render_chat(messages), lambda: list(stream), lambda: list(unstarted)]
    for call in calls:
        with pytest.raises(EngineClosedError, match="closed"):
            call()
    assert engine.n_ctx == 256 and engine.closed      # plain attributes stay readable
    with Engine(smollm2_path, None, **KW) as other:   # the process is fine
        assert other.complete(PROMPT, max_tokens=4, sampling=GREEDY)


@pytest.mark.real
def test_close_from_the_generating_thread_mid_step(smollm2_path, monkeypatch):
    """close() inside a decode step (as a signal handler would run it): nothing is freed
    under the step; the generation ends at its next step with EngineClosedError."""
    engine = Engine(smollm2_path, None, **KW)
    real = engine._base_ctx.logits_ptr
    calls = {"n": 0}

    def logits_ptr(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            engine.close()
        return real(*args)   # still valid: the free waits for the step to end

    monkeypatch.setattr(engine._base_ctx, "logits_ptr", logits_ptr)
    with pytest.raises(EngineClosedError):
        engine.complete(PROMPT, max_tokens=20, sampling=GREEDY)
    assert engine._base_ctx is None and engine.stats.finish_reason == "interrupted"


@pytest.mark.real
def test_calls_from_inside_a_step_are_refused_and_change_nothing(smollm2_path, reference, monkeypatch):
    """A signal handler or callback running inside a step on the generating thread: a second
    generation or a cache reset there would race the interrupted decode (llama_decode -1)."""
    with Engine(smollm2_path, None, **KW) as engine:
        real = engine._base_ctx.logits_ptr
        refused = []

        def logits_ptr(*args):
            for call in (lambda: engine.complete("Hi", max_tokens=2), engine.clear_cache,
                         lambda: engine.tokenize("x")):
                try:
                    call()
                except EngineBusyError:
                    refused.append(1)
            return real(*args)

        monkeypatch.setattr(engine._base_ctx, "logits_ptr", logits_ptr)
        assert engine.complete(PROMPT, max_tokens=24, sampling=GREEDY) == reference
        monkeypatch.undo()
        steps = engine.stats.completion_tokens + (engine.stats.finish_reason == "stop")  # EOG sampled too
        assert len(refused) == 3 * steps


@pytest.mark.real
def test_absurd_sizes_and_values_are_config_errors(smollm2_path):
    for kw in (dict(n_batch=2**31), dict(n_ctx=2**32 + 16), dict(n_threads=10**6), dict(alpha=10**400)):
        with pytest.raises(ConfigError):
            Engine(smollm2_path, None, **{**KW, **kw})
    with Engine(smollm2_path, None, **KW) as engine:
        with pytest.raises(ConfigError, match="not valid Unicode"):
            engine.complete("a lone surrogate \ud800 here", max_tokens=2)
        with pytest.raises(ConfigError, match="a very large integer"):
            engine.alpha = 10**5000
    with pytest.raises(EngineClosedError):
        engine.alpha = 0.5
    with pytest.raises(EngineClosedError):
        engine.value_enabled = False


@pytest.mark.real
def test_close_stops_a_long_prefill_at_a_chunk_boundary(smollm2_path):
    engine = Engine(smollm2_path, None, n_ctx=2048, n_batch=64, n_threads=1)
    prompt = "word " * 1500
    outcome, started = [], threading.Event()
    worker = _stream_on_worker(engine, outcome, started, max_tokens=4, prompt=prompt)
    time.sleep(0.2)
    t0 = time.perf_counter()
    engine.close()
    closed_in = time.perf_counter() - t0
    worker.join(60)
    assert outcome and isinstance(outcome[0], EngineClosedError), outcome
    print(f"\nclose() during a 1,500-token prefill returned in {closed_in:.2f} s")


@pytest.mark.real
def test_keyboard_interrupt_on_the_worker_then_close(smollm2_path, monkeypatch):
    engine = Engine(smollm2_path, None, **KW)
    real = engine._base_ctx.logits_ptr
    calls = {"n": 0}

    def logits_ptr(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(engine._base_ctx, "logits_ptr", logits_ptr)
    caught = []

    def run():
        try:
            engine.complete(PROMPT, max_tokens=20, sampling=GREEDY)
        except KeyboardInterrupt:
            caught.append("ki")

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert caught == ["ki"] and engine.stats.finish_reason == "interrupted"
    monkeypatch.undo()
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.complete(PROMPT)


@pytest.mark.real
def test_small_context_windows_are_what_the_engine_enforces(smollm2_path):
    """llama.cpp rounds n_ctx=64 up to 256 but caps its batch at 64: a 100-token prompt
    aborted it. Now the window asked for is the one enforced, and prompts decode in batches
    llama.cpp accepts."""
    with Engine(smollm2_path, None, n_ctx=64, n_threads=1) as engine:
        assert engine.n_ctx == 64
        long_prompt = "one two three four five six seven eight nine ten " * 10
        assert len(engine.tokenize(long_prompt)) > 64
        with pytest.raises(ContextOverflowError, match="context window is 64"):
            engine.complete(long_prompt, max_tokens=4)
        text = engine.complete("one two three four five six seven eight nine ten " * 3,
                               max_tokens=None, sampling=GREEDY)
        assert engine.stats.context_used <= 64 and text
    with Engine(smollm2_path, None, n_ctx=256, n_batch=16, n_threads=1) as engine:
        assert engine.complete(long_prompt, max_tokens=4, sampling=GREEDY)


_CRASHERS = textwrap.dedent("""
    import sys, threading, time
    from ivl_local import GREEDY
    from ivl_local.engine import Engine
    from ivl_local.errors import IVLError
    path = sys.argv[1]
    case = sys.argv[2]
    out = []
    if case == "close-mid-generate":
        e = Engine(path, None, n_ctx=256, n_threads=1)
        def run():
            try:
                for _ in e.generate("Once upon a time", max_tokens=200): pass
                out.append("done")
            except IVLError as err:
                out.append(type(err).__name__)
        t = threading.Thread(target=run); t.start(); time.sleep(0.3); e.close(); t.join()
    elif case == "two-threads":
        e = Engine(path, None, n_ctx=256, n_threads=1)
        def run():
            try:
                e.complete("Once upon a time", max_tokens=40); out.append("done")
            except IVLError as err:
                out.append(type(err).__name__)
        ts = [threading.Thread(target=run) for _ in range(2)]
        [t.start() for t in ts]; [t.join() for t in ts]
    elif case == "after-close":
        e = Engine(path, None, n_ctx=256, n_threads=1); e.close()
        for call in (lambda: e.tokenize("x"), lambda: e.complete("x"), lambda: e.n_ctx):
            try:
                out.append(repr(call()))
            except IVLError as err:
                out.append(type(err).__name__)
    elif case == "small-ctx":
        e = Engine(path, None, n_ctx=64, n_threads=1)
        try:
            e.complete("one two three four five six seven eight nine ten " * 10, max_tokens=4)
        except IVLError as err:
            out.append(type(err).__name__)
    print("result:", sorted(out))
""")


@pytest.mark.real
@pytest.mark.parametrize("case, expected", [
    ("close-mid-generate", {"['EngineClosedError']", "['done']"}),
    ("two-threads", {"['EngineBusyError', 'done']", "['done', 'done']"}),
    ("after-close", {"['256', 'EngineClosedError', 'EngineClosedError']"}),
    ("small-ctx", {"['ContextOverflowError']"}),
])
def test_former_native_crashes_in_a_subprocess(smollm2_path, case, expected):
    proc = subprocess.run([sys.executable, "-P", "-c", _CRASHERS, str(smollm2_path), case],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    result = proc.stdout.strip().splitlines()[-1].removeprefix("result: ")
    assert result in expected, proc.stdout
