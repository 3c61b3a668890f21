"""Engines sharing loaded weights through a ModelRegistry, and Engine.cancel(): what the
server's generation slots rely on."""

from __future__ import annotations

import threading

import pytest

from ivl_local import GREEDY
from ivl_local.engine import Engine
from ivl_local.errors import ConfigError, GenerationCancelled
from ivl_local.registry import ModelRegistry
from ivl_local.terms import CFG

PROMPT = "The capital of France is"
KW = dict(n_ctx=256, n_threads=1)


@pytest.mark.real
def test_two_engines_share_one_load_and_closing_one_leaves_the_other_working(smollm2_path):
    with Engine(smollm2_path, None, **KW) as alone:
        expected = alone.complete(PROMPT, max_tokens=8, sampling=GREEDY)
    models = ModelRegistry()
    a = Engine(smollm2_path, None, models=models, terms=[CFG(0.0)], **KW)   # CFG: a 2nd context, same model
    b = Engine(str(smollm2_path), None, models=models, **KW)
    try:
        assert models.loads == 1 and len(models) == 1 and models.users(smollm2_path) == 2
        assert a._base_model is b._base_model
        assert a.complete(PROMPT, max_tokens=8, sampling=GREEDY) == expected
        a.close()
        assert models.users(smollm2_path) == 1 and b._base_model.ptr is not None   # still loaded
        assert b.complete(PROMPT, max_tokens=8, sampling=GREEDY) == expected
    finally:
        a.close()
        b.close()
    assert len(models) == 0 and models.users(smollm2_path) == 0     # the last user freed it
    c = Engine(smollm2_path, None, models=models, **KW)             # loads again
    c.close()
    assert models.loads == 2


@pytest.mark.real
def test_a_private_registry_frees_the_model_at_close(smollm2_path):
    engine = Engine(smollm2_path, None, **KW)
    model = engine._base_model
    engine.close()
    assert model.ptr is None


def test_a_registry_refuses_what_it_does_not_hold_and_engines_check_the_type():
    class Fake:
        path = __file__
    with pytest.raises(ValueError, match="not held"):
        ModelRegistry().release(Fake())
    with pytest.raises(ConfigError, match="ModelRegistry"):
        Engine("unused.gguf", models={})


@pytest.mark.real
def test_cancel_stops_the_generation_in_progress_and_the_engine_stays_usable(smollm2_path):
    with Engine(smollm2_path, None, **KW) as engine:
        expected = engine.complete(PROMPT, max_tokens=6, sampling=GREEDY)
        engine.clear_cache()
        assert engine.cancel() is False                      # nothing in progress
        gen = engine.generate(PROMPT, max_tokens=200, sampling=GREEDY)
        got, error = [], []

        def consume():
            try:
                for delta in gen:
                    got.append(delta)
                    if len(got) == 2:
                        assert engine.cancel() is True       # here, or from any thread
            except GenerationCancelled as e:
                error.append(e)

        worker = threading.Thread(target=consume)
        worker.start()
        worker.join(60)
        assert not worker.is_alive() and error, "the generation was not cancelled"
        assert engine.stats.finish_reason == "interrupted"
        assert engine.stats.completion_tokens <= 3           # stopped at the next token
        # a stale cancel does not touch the next generation; the caches are consistent
        engine.clear_cache()
        assert engine.complete(PROMPT, max_tokens=6, sampling=GREEDY) == expected


@pytest.mark.real
def test_threads_sharing_one_model_each_get_their_own_pieces_and_tokens(smollm2_path):
    """Slots share one Vocab; llama.cpp writes pieces and token ids into a scratch buffer with
    the GIL released. With one buffer for all threads, a streamed answer read another
    request's piece ("Two andHell" for "Two and two"); each thread now has its own."""
    models = ModelRegistry()
    model = models.acquire(smollm2_path)
    try:
        vocab = model.vocab
        tokens = range(100, 2100)
        pieces = {t: vocab.piece(t) for t in tokens}
        texts = [f"Thread {i} writes a haiku about rain, number {i * 7}." for i in range(8)]
        ids = {s: vocab.tokenize(s) for s in texts}
        wrong: list = []

        def work(i: int) -> None:
            for _ in range(10):
                wrong.extend(t for t in tokens[i::8] if vocab.piece(t) != pieces[t])
                if vocab.tokenize(texts[i]) != ids[texts[i]]:
                    wrong.append(texts[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert wrong == []
    finally:
        models.release(model)
