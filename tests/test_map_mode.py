"""map_mode "candidates" (issue 15): the value model's log-probability of a base token's whole
text where that text is several value tokens, on one scale with the single-token entries; and
map_mode "logprob" / "shared": the value's log-probabilities through the map (shared: base
tokens that map to one value token share its probability).

Fast tests check the settings and the CLI flags; `real` tests run Gemma 3 270M (base) with
SmolLM2 135M (its raw model as the value: another vocabulary) and SmolLM2 with itself (one
vocabulary).
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ivl_local.cli import chat as chat_mod
from ivl_local.cli.main import app
from ivl_local.config import GREEDY, SamplingConfig
from ivl_local.errors import ConfigError
from ivl_local.terms import CANDIDATES_K_MAX, ValueNet

PROMPT = "The museum in the old town was"
# Single Gemma tokens whose text is several SmolLM2 tokens: " manera" and " manus" share their
# first piece " man" (one scoring decode serves both), " Jahrhundert" is 4 pieces, " Übersetzung"
# 5 (its "Ü" split inside a UTF-8 character)
WORDS = [" manera", " manus", " unbelievable", " Jahrhundert", " Übersetzung", " environ", " enzym"]


# --- settings: one clear error each -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["", "Raw", "exact", None, 1, "candidates "])
def test_bad_map_mode_is_a_config_error(mode):
    with pytest.raises(ConfigError, match="map_mode must be one of raw, logprob, shared, candidates"):
        ValueNet("v.gguf", map_mode=mode)


@pytest.mark.parametrize("k", [0, -1, CANDIDATES_K_MAX + 1, 2.0, True, "8", None])
def test_bad_candidates_k_is_a_config_error(k):
    with pytest.raises(ConfigError, match="candidates_k must be an integer between 1 and 32"):
        ValueNet("v.gguf", candidates_k=k)


def test_good_settings_are_kept():
    spec = ValueNet("v.gguf", map_mode="candidates", candidates_k=CANDIDATES_K_MAX)
    assert (spec.map_mode, spec.candidates_k) == ("candidates", 32)
    assert ValueNet("v.gguf").map_mode == "raw"   # the default is today's behaviour


def test_engine_checks_before_loading(tmp_path):
    """Bad values (and candidates with drafts) fail before any file is opened."""
    from ivl_local.engine import Engine

    missing = tmp_path / "nothing.gguf"
    with pytest.raises(ConfigError, match="map_mode must be one of raw, logprob, shared, candidates"):
        Engine(missing, missing, map_mode="bytes")
    with pytest.raises(ConfigError, match="candidates_k must be an integer"):
        Engine(missing, missing, map_mode="candidates", candidates_k=0)
    with pytest.raises(ConfigError, match="does not combine with speculative decoding"):
        Engine(missing, missing, map_mode="candidates", draft="ngram")
    with pytest.raises(ConfigError, match="does not combine with speculative decoding"):
        Engine(missing, None, terms=[ValueNet(missing, map_mode="candidates")], draft="ngram")


# --- CLI flags ---------------------------------------------------------------------------------

@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("IVL_CACHE_DIR", str(tmp_path / "cache"))
    made: dict = {}

    class Engine:
        stats = None

        def chat_deltas(self, messages, max_tokens=256, sampling=None, stop=None):
            yield "ok"

        def close(self):
            pass

    def make_engine(base, value, alpha, **kwargs):
        made.clear()
        made.update(kwargs)
        return Engine()

    monkeypatch.setattr(chat_mod, "make_engine", make_engine)
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + b"\0" * 60)
    return made, base


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_cli_map_mode_reaches_the_engine(fake):
    made, base = fake
    r = CliRunner().invoke(app, ["chat", "--base", str(base), "--value", "none", "--map-mode", "candidates",
                                 "--candidates-k", "4", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert (made["map_mode"], made["candidates_k"]) == ("candidates", 4)
    r = CliRunner().invoke(app, ["chat", "--base", str(base), "--value", "none", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert "map_mode" not in made or made["map_mode"] == "raw"


@pytest.mark.parametrize("command", ["chat", "serve"])
@pytest.mark.parametrize("args, message", [
    (["--map-mode", "bytes"], "--map-mode must be one of raw, logprob, shared, candidates, got 'bytes'"),
    (["--map-mode", "candidates", "--candidates-k", "0"], "--candidates-k must be an integer between 1 and 32"),
    (["--candidates-k", "33"], "--candidates-k must be an integer between 1 and 32, got 33"),
    (["--map-mode", "candidates", "--draft", "ngram"],
     "--map-mode candidates does not combine with speculative decoding (--draft)"),
])
def test_cli_bad_map_mode_is_one_error_line(fake, command, args, message):
    if command == "serve":
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    _, base = fake
    extra = ["-p", "hi"] if command == "chat" else ["--port", "0"]
    r = CliRunner().invoke(app, [command, "--base", str(base), "--value", "none", *args, *extra])
    assert r.exit_code == 2, r.output
    assert message in one_error_line(r)


def test_projection_parts_from_a_small_map():
    """LogProbProjection: unmapped tokens read the mean log-probability (part U); in "shared"
    mode base tokens mapping to one value token split its probability as the base splits its
    own among them (part S); one-to-one: no part S."""
    from ivl_local.sync import LogProbProjection

    token_map = np.array([0, 0, 0, 1, -1, 2], dtype=np.int32)
    value = np.array([1.0, 2.0, 3.0, 0.5], dtype=np.float32)
    base = np.array([2.0, 0.0, -1.0, 5.0, 1.0, 0.0], dtype=np.float32)
    log_p = value.astype(np.float64) - np.log(np.exp(value.astype(np.float64)).sum())
    shared = LogProbProjection(token_map, len(value), shared=True)
    assert shared.n_extra == 2
    (ptr_u, n_u, map_u, w_u, weight_u, t_u), (ptr_s, n_s, map_s, w_s, weight_s, t_s) = \
        shared.extra_parts(value.ctypes.data, 0.5, base_ptr=base.ctypes.data)
    assert (n_u, w_u, weight_u, t_u) == (1, None, 0.5, "raw") and map_u.tolist() == [-1, -1, -1, -1, 0, -1]
    assert shared.neutral[0] == pytest.approx(log_p.mean(), abs=1e-6)
    assert (ptr_s, n_s, map_s, w_s, weight_s, t_s) == (shared.share.ctypes.data, 6, None, None, 0.5, "raw")
    group = np.exp(base[:3].astype(np.float64))
    np.testing.assert_allclose(shared.share, [*np.log(group / group.sum()), 0, 0, 0], rtol=0, atol=1e-6)
    # the projected probabilities: each value token's mass once over the base vocabulary,
    # split inside the group as the base's own probabilities are
    mapped = token_map >= 0
    projected = np.exp(log_p[token_map[mapped]] + shared.share[mapped])
    assert projected.sum() == pytest.approx(np.exp(log_p[:3]).sum(), abs=1e-6)
    assert projected[0] / projected[1] == pytest.approx(np.exp(2.0), rel=1e-5)
    # a -inf value logit (a banned token) does not ban the unmapped tokens with it
    banned = value.copy()
    banned[3] = -np.inf
    kept = banned[:3].astype(np.float64)
    assert shared.neutral_value(banned) == pytest.approx(kept.mean() - np.log(np.exp(kept).sum()), abs=1e-6)
    # a NaN base logit does not turn into a NaN share (the fuse reports the base's NaN)
    nan_base = base.copy()
    nan_base[1] = np.nan
    assert np.isfinite(shared.shares(nan_base)).all() and (shared.share <= 0).all()

    plain = LogProbProjection(token_map, len(value), shared=False)
    assert plain.share is None and plain.n_extra == 1 and len(plain.extra_parts(value.ctypes.data, 1.0)) == 1
    one_to_one = LogProbProjection(np.array([2, 0, 1], dtype=np.int32), 3, shared=True)
    assert one_to_one.share is None and one_to_one.map_u is None and one_to_one.n_extra == 0
    assert one_to_one.extra_parts(value.ctypes.data, 1.0) == []


# --- real models -------------------------------------------------------------------------------

def _engine(base, value, **kwargs):
    """An Engine with SmolLM2's plain GGUF as a raw value model (no ivl.* metadata: a warning)."""
    from ivl_local.engine import Engine
    from ivl_local.valuefile import RawValueModelWarning

    with pytest.warns(RawValueModelWarning):
        return Engine(base, value, 1.0, n_ctx=256, n_threads=2, **kwargs)


def _source(engine):
    return engine._value_term.sources[0]


def _multi_token_words(engine, n: int) -> list[int]:
    """Base tokens (single Gemma tokens) whose text is several SmolLM2 tokens."""
    scorer = _source(engine).scorer
    found = []
    for word in WORDS:
        ids = engine._base_vocab.tokenize(word, add_special=False, parse_special=False)
        if len(ids) == 1 and scorer.value_tokens(ids[0]) is not None:
            found.append(ids[0])
    assert len(found) >= n, f"only {len(found)} of the words are one Gemma token and several SmolLM2 tokens"
    return found[:n]


def _reference_logprob(model, context_tokens: list[int], pieces: tuple[int, ...]) -> float:
    """Σ_j log p(v_j | context, v_<j), one decode per token in a context of its own."""
    from ivl_local.backend import Context

    with Context(model, n_ctx=256, n_threads=2) as ctx:
        ctx.decode(context_tokens, 0)
        total, pos = 0.0, len(context_tokens)
        for j, piece in enumerate(pieces):
            row = np.asarray(ctx.logits_array(), dtype=np.float64)
            shift = row.max() + np.log(np.exp(row - row.max()).sum())
            total += row[piece] - shift
            if j + 1 < len(pieces):
                ctx.decode([piece], pos)
                pos += 1
    return total


def _crafted(n_base: int, top: list[int]) -> np.ndarray:
    """Base logits whose best tokens are `top`, in that order."""
    logits = np.zeros(n_base, dtype=np.float32)
    for rank, token in enumerate(top):
        logits[token] = 20.0 - rank
    return logits


@pytest.mark.real
def test_candidate_score_is_the_sum_of_value_token_logprobs(gemma3_path, smollm2_path):
    """(a) the scored log-probability of a multi-token word equals SmolLM2's own, computed
    without the engine, for several candidates in one step (shared prefixes included)."""
    from ivl_local.backend import Model

    with _engine(gemma3_path, smollm2_path, map_mode="candidates", candidates_k=8) as engine:
        source = _source(engine)
        scorer, follower = source.scorer, source.follower
        assert engine._value_term.parts[0][2] == "log_softmax"
        words = _multi_token_words(engine, 5)
        exact = engine._base_vocab.tokenize(" the", add_special=False, parse_special=False)
        assert len(exact) == 1 and scorer.value_tokens(exact[0]) is None   # one value token: the map
        follower.reset_to(PROMPT.encode())
        context = list(follower.tokens)
        before = np.array(follower.seq.ctx.logits_array())
        decodes = scorer.decodes
        n = scorer.score(_crafted(engine._base_vocab.n_tokens, [words[0], exact[0], *words[1:]]))
        assert n == len(words) and scorer.ids == words
        assert scorer.decodes - decodes == len(words) - 1   # " manera" and " manus" share one
        got = scorer.scores[:n].astype(np.float64)
        assert np.array_equal(np.asarray(scorer._current), before)   # the copy of the current logits
        scorer.restore()
        assert np.array_equal(scorer.map_a, source.mapping.token_map) and (scorer.map_b == -1).all()
        assert list(follower.tokens) == context and follower.seq.ctx.pos_max() == len(context) - 1

    with Model(smollm2_path) as model:
        want = [_reference_logprob(model, context, scorer.value_tokens(w)) for w in words]
    lengths = [len(scorer.value_tokens(w)) for w in words]
    assert max(lengths) >= 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.real
def test_candidate_contribution_is_on_the_single_token_scale(gemma3_path, smollm2_path):
    """In a real step the fused logit of a scored token is base + alpha * its whole-text
    log-probability, of a mapped token base + alpha * log_softmax(value)[map], and of a token
    the map leaves out base + alpha * the mean of log_softmax(value) (not + 0, which on this
    scale would rank it above every mapped token)."""
    from ivl_local import _core
    from ivl_local.backend import logits_view

    with _engine(gemma3_path, smollm2_path, map_mode="candidates", candidates_k=32) as engine:
        engine.alpha = 0.7
        seen = []
        original = engine._fuse_and_sample

        def spy(sampler, base_ptr, n_base, parts, mask, step, draft, rng):
            base = np.array(logits_view(base_ptr, n_base))
            fused = _core.fuse_terms(base, [(np.array(logits_view(p, n)), *rest) for p, n, *rest in parts], mask)
            scorer = _source(engine).scorer
            value = np.array(logits_view(parts[0][0], parts[0][1]), dtype=np.float64)
            log_p = value - (value.max() + np.log(np.exp(value - value.max()).sum()))
            scored = {t: float(scorer.scores[i]) for i, t in enumerate(scorer.ids)}
            token_map = _source(engine).mapping.token_map
            for t in np.argsort(-base)[:32].tolist():
                want = scored[t] if t in scored else (log_p[token_map[t]] if token_map[t] >= 0 else log_p.mean())
                assert fused[t] - base[t] == pytest.approx(0.7 * want, abs=1e-3)
            unmapped = np.flatnonzero(token_map < 0)
            assert unmapped.size > 1000    # Gemma's unused and control tokens
            np.testing.assert_allclose(fused[unmapped] - base[unmapped], 0.7 * log_p.mean(), atol=1e-3)
            seen.append(len(scored))
            return original(sampler, base_ptr, n_base, parts, mask, step, draft, rng)

        engine._fuse_and_sample = spy
        engine.complete("Describe a beautiful old cathedral in three sentences.", max_tokens=12, sampling=GREEDY)
    assert sum(seen) > 0, "no step scored a multi-token candidate"


@pytest.mark.real
def test_cache_after_scoring_equals_a_fresh_decode(gemma3_path, smollm2_path):
    """(d) after a scored step the value context holds exactly the accepted text: its next
    logits equal a fresh decode's (also when the next token releases no text)."""
    from ivl_local.backend import Context, Model

    with _engine(gemma3_path, smollm2_path, map_mode="candidates") as engine:
        source = _source(engine)
        scorer, follower = source.scorer, source.follower
        words = _multi_token_words(engine, 3)
        follower.reset_to(PROMPT.encode())
        before = np.array(follower.seq.ctx.logits_array())
        assert scorer.score(_crafted(engine._base_vocab.n_tokens, words)) == 3
        scorer.restore()
        follower.append(b"")            # no text released: the last token's logits come back
        np.testing.assert_allclose(np.array(follower.seq.ctx.logits_array()), before, rtol=0, atol=1e-3)
        assert scorer.score(_crafted(engine._base_vocab.n_tokens, words)) == 3
        scorer.restore()
        follower.append(b" very")       # the accepted text
        after = np.array(follower.seq.ctx.logits_array())
        tokens = list(follower.tokens)
        assert follower.seq.ctx.pos_max() == len(tokens) - 1
        # and through the engine: a greedy answer with scoring, then the same check
        decodes = scorer.decodes
        text = engine.complete("Describe a beautiful old cathedral.", max_tokens=16, sampling=GREEDY)
        assert text and scorer.decodes > decodes
        follower.append(b"")
        engine_tokens = list(follower.tokens)
        engine_logits = np.array(follower.seq.ctx.logits_array())
        assert follower.seq.ctx.pos_max() == len(engine_tokens) - 1
        assert engine_tokens == follower.tokenize(follower.text)

    with Model(smollm2_path) as model, Context(model, n_ctx=512, n_threads=2) as fresh:
        assert tokens == model.vocab.tokenize(PROMPT + " very", add_special=True, parse_special=True)
        fresh.decode(tokens, 0)
        np.testing.assert_allclose(after, fresh.logits_array(), rtol=0, atol=1e-3)
        fresh.clear()
        fresh.decode(engine_tokens, 0)
        np.testing.assert_allclose(engine_logits, fresh.logits_array(), rtol=0, atol=1e-3)


@pytest.mark.real
@pytest.mark.parametrize("mode,reverse", [("logprob", False), ("shared", False), ("shared", True)])
def test_projection_contribution_per_token(gemma3_path, smollm2_path, mode, reverse):
    """In a real step the fused logit of a mapped token is base + alpha * (log_softmax(value)
    [map] + log p_base(token | the base tokens mapped to that value token), "shared" only), and
    of a token the map leaves out base + alpha * the mean of log_softmax(value). Gemma 3 base
    with the SmolLM2 value, and (reverse) SmolLM2 base with the Gemma 3 value."""
    from ivl_local import _core
    from ivl_local.backend import logits_view

    base_path, value_path = (smollm2_path, gemma3_path) if reverse else (gemma3_path, smollm2_path)
    with _engine(base_path, value_path, map_mode=mode) as engine:
        engine.alpha = 0.7
        source = _source(engine)
        assert source.scorer is None and engine._value_term.parts[0][2] == "log_softmax"
        token_map = source.mapping.token_map
        mapped = token_map >= 0
        counts = np.bincount(token_map[mapped], minlength=source.ctx.n_vocab)
        grouped = mapped & (counts[np.maximum(token_map, 0)] >= 2)
        assert grouped.sum() > 1000   # e.g. Gemma words sharing a first SmolLM2 piece
        seen = []
        original = engine._fuse_and_sample

        def spy(sampler, base_ptr, n_base, parts, mask, step, draft, rng):
            base = np.array(logits_view(base_ptr, n_base))
            fused = _core.fuse_terms(base, [(np.array(logits_view(p, n)), *rest) for p, n, *rest in parts], mask)
            value = np.array(logits_view(parts[0][0], parts[0][1]), dtype=np.float64)
            log_p = value - (value.max() + np.log(np.exp(value - value.max()).sum()))
            share = np.zeros(n_base)
            if mode == "shared":   # log p_base(i | its group), by a loop over the groups' sums
                z = base.astype(np.float64)
                sums = np.zeros(len(counts))
                np.add.at(sums, token_map[grouped], np.exp(z[grouped] - z.max()))
                share[grouped] = z[grouped] - z.max() - np.log(sums[token_map[grouped]])
            want = np.where(mapped, log_p[np.maximum(token_map, 0)] + share, log_p.mean())
            np.testing.assert_allclose(fused - base, 0.7 * want, rtol=0, atol=2e-3)
            seen.append(step)
            return original(sampler, base_ptr, n_base, parts, mask, step, draft, rng)

        engine._fuse_and_sample = spy
        text = engine.complete("Describe a beautiful old cathedral in three sentences.", max_tokens=8,
                               sampling=GREEDY)
    assert text and len(seen) >= 2


@pytest.mark.real
def test_projection_modes_with_speculative_decoding(gemma3_path, smollm2_path):
    """logprob/shared need no scoring decode, so they combine with --draft: the same greedy
    answer with and without drafting."""
    prompt = "List the days of the week: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. " \
             "Again: Monday,"
    for mode in ("logprob", "shared"):
        with _engine(gemma3_path, smollm2_path, map_mode=mode) as plain:
            want = plain.complete(prompt, max_tokens=16, sampling=GREEDY)
        with _engine(gemma3_path, smollm2_path, map_mode=mode, draft="ngram") as drafted:
            assert drafted.complete(prompt, max_tokens=16, sampling=GREEDY) == want, mode
            assert drafted.stats.drafted > 0, mode


@pytest.mark.real
def test_same_vocabulary_candidates_is_raw(smollm2_path):
    """(b) one vocabulary: map_mode has no effect (no scorer, raw logits, the same tokens)."""
    prompt = "Write a short poem about the sea."
    out = {}
    for mode in ("raw", "logprob", "shared", "candidates"):
        with _engine(smollm2_path, smollm2_path, map_mode=mode) as engine:
            source = _source(engine)
            assert source.scorer is None and source.projection is None
            assert engine._value_term.parts[0][2] == "raw"
            out[mode] = engine.complete(prompt, max_tokens=24, sampling=GREEDY)
            out[mode + " tokens"] = list(engine._last_completion_tokens)
    for mode in ("logprob", "shared", "candidates"):
        assert out[mode + " tokens"] == out["raw tokens"] and out[mode] == out["raw"], mode


@pytest.mark.real
def test_candidates_mode_generates_greedy_and_sampled(gemma3_path, smollm2_path):
    """Greedy and sampled generation run with scoring; a seed reproduces a sampled answer;
    raw mode's tokens are unchanged by the option's existence (same as without it)."""
    prompt = "Describe a beautiful old cathedral."
    sampling = SamplingConfig(temperature=0.8, seed=3)
    with _engine(gemma3_path, smollm2_path, map_mode="candidates") as engine:
        greedy = engine.complete(prompt, max_tokens=12, sampling=GREEDY)
        engine.clear_cache()
        first = engine.complete(prompt, max_tokens=12, sampling=sampling)
        engine.clear_cache()
        second = engine.complete(prompt, max_tokens=12, sampling=sampling)
        assert _source(engine).scorer.decodes > 0
    assert greedy and first == second
    with _engine(gemma3_path, smollm2_path) as raw, _engine(gemma3_path, smollm2_path, map_mode="raw") as same:
        assert _source(raw).scorer is None and raw._value_term.parts[0][2] == "raw"
        assert raw.complete(prompt, max_tokens=12, sampling=GREEDY) == same.complete(prompt, max_tokens=12,
                                                                                     sampling=GREEDY)
