"""The Engine on real models: exactness against llama-cpp-python, cross-vocabulary sync,
prefix reuse, stop strings, chat, errors, interruption.

Real-model runs are kept short (n_ctx 256, one thread, a dozen tokens).
"""

from __future__ import annotations

import numpy as np
import pytest

from ivl_local import GREEDY, SamplingConfig
from ivl_local.engine import Engine, _StopStrings
from ivl_local.errors import (ConfigError, ContextOverflowError, EmptyPromptError, EngineClosedError,
                              FormatVersionError, GenerationSuperseded, InvalidLogitsError,
                              ModelFileError, VocabMismatchError)
from ivl_local.valuefile import RawValueModelWarning

PROMPT = "The capital of France is"
N = 12
KW = dict(n_ctx=256, n_threads=1)


def on_each_step(monkeypatch, engine: Engine, hook) -> None:
    """Run hook(engine, step) before each token is sampled: the seam is the base context's
    logits read, which every step makes exactly once."""
    real = engine._base_ctx.logits_ptr
    step = {"n": 0, "in_hook": False}

    def logits_ptr(*args):
        if not step["in_hook"]:          # the hook itself may read the logits
            step["in_hook"] = True
            try:
                hook(engine, step["n"])
            finally:
                step["in_hook"] = False
            step["n"] += 1
        return real(*args)

    monkeypatch.setattr(engine._base_ctx, "logits_ptr", logits_ptr)


def engine_with_raw_value(base, value, **kw) -> Engine:
    with pytest.warns(RawValueModelWarning):
        return Engine(base, value, **{**KW, **kw})


def llama_cpp_greedy(path, prompt: str, n: int) -> list[int]:
    """llama-cpp-python's own greedy decode of the base model (the reference)."""
    import llama_cpp
    from ivl_local.backend import safe_llama_params

    with safe_llama_params():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        out = []
        for token in llm.generate(tokens, temp=0.0, repeat_penalty=1.0):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) == n:
                break
            out.append(token)
        return out
    finally:
        llm.close()


# --- stop strings (no model) --------------------------------------------------------------

@pytest.mark.parametrize("cpus, load, expected", [(8, 0.0, 8), (8, 2.6, 5), (2, 1.2, 1), (2, 0.3, 2),
                                                   (2, 7.0, 1), (4, 0.49, 4)])
def test_default_threads_counts_free_cores(monkeypatch, cpus, load, expected):
    import os

    from ivl_local.config import default_threads

    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert default_threads() == expected

    def no_loadavg():
        raise OSError("no load average")
    monkeypatch.setattr(os, "getloadavg", no_loadavg)
    assert default_threads() == cpus


def test_stop_strings_hold_back_partial_matches():
    s = _StopStrings(["\nUser:"])
    assert s.feed("Hello") == ("Hello", False)
    assert s.feed(" there\n") == (" there", False)   # "\n" may start the stop string
    assert s.feed("Us") == ("", False)
    assert s.feed("e") == ("", False)
    assert s.feed("r: hi") == ("", True)


def test_stop_strings_release_false_alarms_and_flush():
    s = _StopStrings(["###"])
    assert s.feed("a #") == ("a ", False)
    assert s.feed("b") == ("#b", False)
    assert s.feed("##") == ("", False)
    assert s.flush() == "##"


def test_stop_strings_earliest_match_wins():
    s = _StopStrings(["cd", "b"])
    assert s.feed("abcde") == ("a", True)


# --- exactness ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_engine(smollm2_path):
    with Engine(smollm2_path, None, **KW) as engine:
        yield engine


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_engine):
    text = smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY)
    return text, list(smollm2_engine._last_completion_tokens)


@pytest.mark.real
@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_base_alone_matches_llama_cpp_python_greedy(model, request):
    path = request.getfixturevalue(model)
    expected = llama_cpp_greedy(path, PROMPT, N)
    with Engine(path, None, **KW) as engine:
        text = engine.complete(PROMPT, max_tokens=N, sampling=GREEDY)
        assert engine._last_completion_tokens == expected
        assert text == engine._base_vocab.detokenize(expected).decode()
        assert engine.stats.completion_tokens == N and engine.stats.finish_reason == "length"


@pytest.mark.real
def test_same_model_as_value_alpha0_and_alpha1_keep_base_greedy_tokens(smollm2_path, smollm2_reference):
    """base + 1*base has the same argmax as base; alpha 0 is the base alone."""
    _, expected = smollm2_reference
    with engine_with_raw_value(smollm2_path, smollm2_path) as engine:
        assert engine.identity_vocab and engine.alpha == 1.0
        for alpha in (1.0, 0.0, 0.5):
            engine.alpha = alpha
            engine.complete(PROMPT, max_tokens=N, sampling=GREEDY)
            assert engine._last_completion_tokens == expected, alpha
        engine.alpha = 1.0
        engine.value_enabled = False
        engine.complete(PROMPT, max_tokens=N, sampling=GREEDY)
        assert engine._last_completion_tokens == expected


@pytest.mark.real
def test_value_changes_the_distribution(smollm2_path, gemma3_path, monkeypatch):
    """A value model with a large alpha does change what is sampled (the fusion is live)."""
    with engine_with_raw_value(smollm2_path, gemma3_path, alpha=0.0) as engine:
        base_text = engine.complete(PROMPT, max_tokens=8, sampling=GREEDY)
        engine.alpha = 5.0
        sync = engine._value  # Gemma as the value side: SentencePiece with an added BOS

        def check(eng, step):
            assert sync.tokens == sync.tokenize(sync.text) and sync.tokens[0] == eng._value_model.vocab.bos

        on_each_step(monkeypatch, engine, check)
        fused_text = engine.complete(PROMPT, max_tokens=8, sampling=GREEDY)
    assert base_text != fused_text
    assert sync.full_retokenizations == 0


@pytest.mark.real
def test_prefix_reuse_gives_the_same_tokens_as_a_fresh_engine(smollm2_path, smollm2_engine):
    first = smollm2_engine.complete(PROMPT, max_tokens=6, sampling=GREEDY)
    follow_up = PROMPT + first + " And the capital of Italy is"
    smollm2_engine.complete(follow_up, max_tokens=6, sampling=GREEDY)
    assert smollm2_engine.stats.reused_prompt_tokens >= len(smollm2_engine.tokenize(PROMPT)) + 4
    reused = list(smollm2_engine._last_completion_tokens)
    with Engine(smollm2_path, None, **KW) as fresh:
        fresh.complete(follow_up, max_tokens=6, sampling=GREEDY)
        assert fresh._last_completion_tokens == reused
        assert fresh.stats.reused_prompt_tokens == 0


@pytest.mark.real
def test_seeded_sampling_is_reproducible(smollm2_engine):
    sampling = SamplingConfig(temperature=1.0, seed=7)
    a = smollm2_engine.complete(PROMPT, max_tokens=N, sampling=sampling)
    b = smollm2_engine.complete(PROMPT, max_tokens=N, sampling=sampling)
    assert a == b


# --- cross-vocabulary -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cross_engine(gemma3_path, smollm2_path):
    with engine_with_raw_value(gemma3_path, smollm2_path, alpha=1.0) as engine:
        yield engine


@pytest.mark.real
def test_cross_vocab_value_context_equals_retokenized_text(cross_engine, monkeypatch):
    engine = cross_engine
    assert not engine.identity_vocab
    sync = engine._value
    checked = []

    def check(eng, step):
        assert sync.tokens == sync.tokenize(sync.text), f"step {step}"
        assert eng._value_ctx.pos_max() == len(sync.tokens) - 1
        assert eng._base_ctx.pos_max() == len(eng._base.tokens) - 1
        checked.append(step)

    on_each_step(monkeypatch, engine, check)
    try:
        prompt = "Numbers: 12345, 3.14159; café — naïve 🚀\nList:"
        sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3)
        text = engine.complete(prompt, max_tokens=24, sampling=sampling)
        # the value model has read everything but the last token (never decoded: we stopped)
        last = engine._base_vocab.piece(engine._last_completion_tokens[-1])
        assert (prompt + text).encode() == sync.text + last
        # a follow-up that extends the conversation reuses the value cache too
        text2 = engine.complete(prompt + text + " and", max_tokens=8, sampling=sampling)
        last = engine._base_vocab.piece(engine._last_completion_tokens[-1])
        assert (prompt + text + " and" + text2).encode() == sync.text + last
    finally:
        monkeypatch.undo()
    assert len(checked) >= 24 + 1
    print(f"\nvalue side: {len(sync.tokens)} SmolLM2 tokens for {len(engine._base.tokens)} Gemma "
          f"tokens; full re-tokenizations: {sync.full_retokenizations}")


@pytest.mark.real
def test_cross_vocab_chat_value_reads_its_own_chat_format(cross_engine):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    own, base = cross_engine.render_value_chat(messages), cross_engine.render_chat(messages)
    assert "<|im_start|>assistant" in own and "Assistant:" in base and own != base
    sync = cross_engine._value
    try:
        for mode, expected in (("own", own), ("base", base)):
            cross_engine.value_prompt = mode
            answer = "".join(cross_engine.chat_deltas(messages, max_tokens=6, sampling=GREEDY))
            assert answer and sync.text.startswith(expected.encode()), mode
            assert sync.tokens == sync.tokenize(sync.text)
    finally:
        cross_engine.value_prompt = "own"


def test_value_prompt_mode_is_checked():
    with pytest.raises(ConfigError, match="value_prompt must be one of own, base"):
        Engine("no-such-model.gguf", value_prompt="theirs")


@pytest.mark.real
def test_cross_vocab_alpha0_matches_base_alone(cross_engine, gemma3_path):
    expected = llama_cpp_greedy(gemma3_path, PROMPT, N)
    cross_engine.alpha = 0.0
    try:
        cross_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY)
    finally:
        cross_engine.alpha = 1.0
    assert cross_engine._last_completion_tokens == expected


@pytest.mark.real
def test_concurrent_decoding_gives_the_same_tokens(gemma3_path, smollm2_path, cross_engine):
    cross_engine.clear_cache()  # Gemma's logits depend on how the prompt was batched
    cross_engine.complete(PROMPT, max_tokens=8, sampling=GREEDY)
    expected = list(cross_engine._last_completion_tokens)
    with engine_with_raw_value(gemma3_path, smollm2_path, concurrent=True, n_threads=2) as engine:
        assert engine.concurrent
        engine.complete(PROMPT, max_tokens=8, sampling=GREEDY)
        assert engine._last_completion_tokens == expected
        assert engine.stats.value_decode_s > 0


@pytest.mark.real
def test_token_map_for_other_vocabularies_is_refused(gemma3_path, smollm2_path, tmp_path):
    path = tmp_path / "wrong.npz"
    np.savez(path, token_map=np.zeros(262144, np.int32), token_weights=np.ones(262144, np.float32),
             base_fingerprint=np.str_("0" * 16), value_fingerprint=np.str_("1" * 16),
             builder=np.str_("test"))
    with pytest.warns(RawValueModelWarning), pytest.raises(VocabMismatchError, match="rebuild"):
        Engine(gemma3_path, smollm2_path, token_map=path, **KW)


# --- stop strings, chat -------------------------------------------------------------------------

@pytest.mark.real
def test_stop_string_is_not_emitted(smollm2_engine, smollm2_reference):
    text, _ = smollm2_reference
    cut = text.index(".") if "." in text else len(text) // 2
    stop = text[cut:cut + 2]
    deltas = list(smollm2_engine.generate(PROMPT, max_tokens=N, sampling=GREEDY, stop=[stop]))
    assert "".join(deltas) == text[:text.index(stop)]
    assert smollm2_engine.stats.finish_reason == "stop"


@pytest.mark.real
def test_chat_with_the_models_template(smollm2_engine):
    messages = [{"role": "user", "content": "Say hello."}]
    assert "<|im_start|>user" in smollm2_engine.render_chat(messages)
    result = smollm2_engine.chat(messages, max_tokens=8, sampling=GREEDY)
    assert result["object"] == "chat.completion"
    content = result["choices"][0]["message"]["content"]
    assert content and result["usage"]["completion_tokens"] >= 1
    chunks = list(smollm2_engine.chat(messages, stream=True, max_tokens=8, sampling=GREEDY))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == content
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.real
def test_chat_fallback_template_and_multi_turn_reuse(gemma3_path):
    with Engine(gemma3_path, None, **KW) as engine:
        messages = [{"role": "user", "content": "What is 2+2?"}]
        prompt = engine.render_chat(messages)
        assert prompt.endswith("Assistant:")
        answer = "".join(engine.chat_deltas(messages, max_tokens=16, sampling=GREEDY))
        assert "\nUser:" not in answer and not answer.startswith(" ")
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And 3+3?"}]
        "".join(engine.chat_deltas(messages, max_tokens=4, sampling=GREEDY))
        assert engine.stats.reused_prompt_tokens >= len(engine.tokenize(prompt)) - 1


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.real
def test_bad_files_fail_before_llama_cpp(smollm2_path, tmp_path):
    with pytest.raises(ModelFileError, match="no such"):
        Engine(tmp_path / "missing.gguf")
    truncated = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        truncated.write_bytes(f.read(5_000_000))
    with pytest.raises(ModelFileError, match="truncated"):
        Engine(truncated, **KW)
    junk = tmp_path / "junk.gguf"
    junk.write_text("hello")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        Engine(smollm2_path, junk, **KW)


@pytest.mark.real
def test_newer_value_format_is_refused(smollm2_path, tmp_path):
    import gguf

    path = tmp_path / "future.ivl.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("ivl.format_version", "99.0")
    w.add_tensor("t", np.zeros(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(FormatVersionError, match="99.0"):
        Engine(smollm2_path, path, **KW)


@pytest.mark.real
def test_empty_prompt(smollm2_engine):
    for prompt in ("", "   \n"):
        with pytest.raises(EmptyPromptError):
            smollm2_engine.generate(prompt)


@pytest.mark.real
def test_context_overflow(smollm2_engine):
    long_prompt = "word " * 300
    with pytest.raises(ContextOverflowError, match="context window"):
        smollm2_engine.generate(long_prompt, max_tokens=8)
    with pytest.raises(ContextOverflowError, match="max_tokens"):
        smollm2_engine.generate("word " * 200, max_tokens=100)


@pytest.mark.real
def test_generation_stops_at_a_full_context(smollm2_engine, smollm2_reference):
    prompt = "count: " + "1 2 3 4 5 6 7 8 9 " * 11
    n_prompt = len(smollm2_engine.tokenize(prompt))
    text = smollm2_engine.complete(prompt, max_tokens=None, sampling=GREEDY)
    assert smollm2_engine.stats.finish_reason in ("length", "stop")
    if smollm2_engine.stats.finish_reason == "length":
        # the cache is full; the last token was sampled from its logits, never decoded
        assert smollm2_engine.stats.context_used == smollm2_engine.n_ctx
        assert n_prompt + smollm2_engine.stats.completion_tokens == smollm2_engine.n_ctx + 1
    assert text
    assert smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY) == smollm2_reference[0]


@pytest.mark.real
def test_nan_logits_raise_and_the_engine_recovers(smollm2_engine, smollm2_reference, monkeypatch):
    def poison(engine, step):
        if step == 2:
            engine._base_ctx.logits_array()[5] = np.nan

    on_each_step(monkeypatch, smollm2_engine, poison)
    with pytest.raises(InvalidLogitsError, match="NaN"):
        smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY)
    monkeypatch.undo()
    assert smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY) == smollm2_reference[0]


# --- interruption -----------------------------------------------------------------------------------

@pytest.mark.real
def test_keyboard_interrupt_mid_generation_then_generate_again(smollm2_engine, smollm2_reference,
                                                               monkeypatch):
    def ctrl_c(engine, step):
        if step == 3:
            raise KeyboardInterrupt

    on_each_step(monkeypatch, smollm2_engine, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        smollm2_engine.complete(PROMPT + " (a)", max_tokens=N, sampling=GREEDY)
    monkeypatch.undo()
    assert smollm2_engine.stats.finish_reason == "interrupted"
    assert smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY) == smollm2_reference[0]


@pytest.mark.real
def test_interrupt_after_a_decode_finished_in_c(smollm2_path, smollm2_reference, monkeypatch):
    """Ctrl-C lands after llama_decode returned but before the bookkeeping: the next call
    trims the unrecorded position and still decodes exactly."""
    with engine_with_raw_value(smollm2_path, smollm2_path) as engine:
        calls = {"n": 0}
        real_decode = engine._value_ctx.decode

        def decode_then_interrupt(*args, **kwargs):
            real_decode(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt

        monkeypatch.setattr(engine._value_ctx, "decode", decode_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            engine.complete(PROMPT + " (b)", max_tokens=N, sampling=GREEDY)
        assert engine._value_ctx.pos_max() == len(engine._value.tokens)  # one unrecorded position
        assert engine.complete(PROMPT, max_tokens=N, sampling=GREEDY) == smollm2_reference[0]
        assert engine._value_ctx.pos_max() == len(engine._value.tokens) - 1


@pytest.mark.real
def test_leaving_the_stream_early_keeps_the_engine_usable(smollm2_engine, smollm2_reference):
    stream = smollm2_engine.generate(PROMPT + " (c)", max_tokens=N, sampling=GREEDY)
    next(stream)
    stream.close()
    assert smollm2_engine.stats.finish_reason == "interrupted"
    assert smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY) == smollm2_reference[0]


@pytest.mark.real
def test_a_newer_generation_supersedes_an_unfinished_one(smollm2_engine, smollm2_reference):
    old = smollm2_engine.generate(PROMPT + " (d)", max_tokens=N, sampling=GREEDY)
    next(old)
    assert smollm2_engine.complete(PROMPT, max_tokens=N, sampling=GREEDY) == smollm2_reference[0]
    with pytest.raises(GenerationSuperseded):
        list(old)


@pytest.mark.real
def test_closed_engine(smollm2_path):
    engine = Engine(smollm2_path, None, **KW)
    stream = engine.generate(PROMPT, max_tokens=N, sampling=GREEDY)
    next(stream)
    engine.close()
    with pytest.raises(EngineClosedError, match="closed"):
        list(stream)
    with pytest.raises(EngineClosedError, match="closed"):
        engine.generate(PROMPT)
