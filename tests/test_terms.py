"""Terms composed at decode time (ivl_local/terms.py) on the real small models: the identities
each method must satisfy, cross-vocabulary sync, one loaded copy of the base for CFG, and one
clear error for each kind of bad input."""

from __future__ import annotations

import warnings

import pytest

from ivl_local import GREEDY
from ivl_local.engine import Engine
from ivl_local.errors import ConfigError, ContextOverflowError, ModelFileError, VocabMismatchError
from ivl_local.terms import CFG, Contrastive, Proxy, ValueNet, check_weight

PROMPT = "The capital of France is"
N = 12
KW = dict(n_ctx=256, n_threads=1)


def tokens_of(engine: Engine, prompt: str = PROMPT) -> list[int]:
    engine.complete(prompt, max_tokens=N, sampling=GREEDY)
    return list(engine._last_completion_tokens)


def quiet_engine(*args, **kw) -> Engine:
    with warnings.catch_warnings():   # raw value models (no ivl.* keys) warn once each
        warnings.simplefilter("ignore")
        return Engine(*args, **{**KW, **kw})


@pytest.fixture(scope="module")
def smollm2_base_tokens(smollm2_path):
    with Engine(smollm2_path, None, **KW) as engine:
        return tokens_of(engine)


@pytest.fixture(scope="module")
def gemma3_base_tokens(gemma3_path):
    with Engine(gemma3_path, None, **KW) as engine:
        return tokens_of(engine)


# --- specs (no model) ---------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda: Proxy("e.gguf", None), lambda: Proxy("", "a.gguf"), lambda: Proxy("e", "a", weight=float("nan")),
    lambda: CFG(scale=float("inf")), lambda: CFG(scale=1.0, negative_prompt=3),
    lambda: Contrastive("a", beta=1e300), lambda: Contrastive("a", alpha=0.0), lambda: Contrastive("a", alpha=2),
    lambda: ValueNet(None), lambda: ValueNet("v", weight="0.5"), lambda: check_weight(True),
])
def test_bad_specs_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


# --- identities on real models ------------------------------------------------------------------

@pytest.mark.real
def test_proxy_with_expert_equal_to_anti_expert_gives_the_base(smollm2_path, smollm2_base_tokens):
    with quiet_engine(smollm2_path, terms=[Proxy(smollm2_path, smollm2_path, weight=2.0)]) as engine:
        assert tokens_of(engine) == smollm2_base_tokens
        assert len(engine._models) == 1 and len(engine._contexts) == 3   # one model file, three contexts


@pytest.mark.real
def test_cross_vocabulary_proxy_on_gemma_keeps_each_context_in_sync(gemma3_path, smollm2_path,
                                                                    gemma3_base_tokens, monkeypatch):
    with quiet_engine(gemma3_path, terms=[Proxy(smollm2_path, smollm2_path)]) as engine:
        expert, anti = engine.terms[0].sources
        checked = []
        real = engine._base_ctx.logits_ptr

        def logits_ptr(*args):
            for sync in (expert.follower, anti.follower):
                assert sync.tokens == sync.tokenize(sync.text)
            checked.append(1)
            return real(*args)

        monkeypatch.setattr(engine._base_ctx, "logits_ptr", logits_ptr)
        assert tokens_of(engine) == gemma3_base_tokens
        assert len(checked) >= N


@pytest.mark.real
def test_two_half_copies_of_a_value_net_equal_one_whole(smollm2_path):
    with quiet_engine(smollm2_path, smollm2_path, alpha=1.0) as one:
        whole = tokens_of(one)
    halves = [ValueNet(smollm2_path, 0.5), ValueNet(smollm2_path, 0.5)]
    with quiet_engine(smollm2_path, terms=halves) as two:
        assert tokens_of(two) == whole
        assert [t.weight for t in two.terms] == [0.5, 0.5]


@pytest.mark.real
def test_cfg_and_contrastive_at_zero_give_the_base_and_cfg_loads_the_base_once(
        smollm2_path, smollm2_base_tokens):
    with quiet_engine(smollm2_path, terms=[CFG(scale=0.0), Contrastive(smollm2_path, beta=0.0, alpha=0.1)]) as engine:
        assert tokens_of(engine) == smollm2_base_tokens
        assert len(engine._models) == 1                  # CFG's second context shares the weights
        engine.terms[0].weight = 3.0                     # live: the next generation uses it
        guided = tokens_of(engine)
        assert guided != smollm2_base_tokens
        engine.terms[0].weight = 0.0
        assert tokens_of(engine) == smollm2_base_tokens  # off again: the base, exactly


@pytest.mark.real
def test_contrastive_mask_keeps_only_plausible_tokens(smollm2_path, smollm2_base_tokens):
    """With an amateur equal to the base, the contrast cancels: only the mask acts, and the
    greedy token is always inside it, so the answer is the base's."""
    with quiet_engine(smollm2_path, terms=[Contrastive(smollm2_path, beta=1.0, alpha=0.5)]) as engine:
        assert tokens_of(engine) == smollm2_base_tokens


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.real
def test_term_errors_are_typed(smollm2_path, gemma3_path, tmp_path):
    with pytest.raises(VocabMismatchError, match="share one vocabulary"):
        quiet_engine(smollm2_path, terms=[Proxy(smollm2_path, gemma3_path)])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 4)
    with pytest.raises(ModelFileError):
        quiet_engine(smollm2_path, terms=[Contrastive(junk)])
    with pytest.raises(ConfigError, match="terms must be"):
        Engine(smollm2_path, terms=["value.gguf"], **KW)
    with quiet_engine(smollm2_path, terms=[CFG(scale=1.0)]) as engine:
        for bad in ("x", float("nan"), 1e9, None):
            with pytest.raises(ConfigError):
                engine.terms[0].weight = bad
        assert engine.terms[0].weight == 1.0


@pytest.mark.real
def test_ivl_chat_composes_from_flags(smollm2_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-P", "-m", "ivl_local.cli.main", "chat", "--base", str(smollm2_path),
           "--value", "none", "--cfg-scale", "1.5", "--negative-prompt", "Answer rudely.",
           "--expert", str(smollm2_path), "--anti-expert", str(smollm2_path),
           "-p", "Name a colour.", "--max-tokens", "6", "--temperature", "0", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Traceback" not in r.stderr


@pytest.mark.real
def test_concurrent_term_decodes_give_the_same_tokens(smollm2_path, gemma3_path):
    """Each term's context decodes on a worker while the base decodes: the same tokens as
    one after the other."""
    terms = [Proxy(smollm2_path, smollm2_path, weight=0.7), CFG(scale=0.5),
             Contrastive(smollm2_path, beta=0.3, alpha=0.05)]
    with quiet_engine(gemma3_path, terms=terms) as sequential:
        expected = tokens_of(sequential)
    with quiet_engine(gemma3_path, terms=terms, concurrent=True, n_threads=2) as concurrent:
        assert concurrent._pool is not None
        assert tokens_of(concurrent) == expected


@pytest.mark.real
def test_review_findings_on_terms(smollm2_path, tmp_path):
    """Too many parts is one clear error at load; one model per file however it is spelled;
    a value term's weight keeps alpha's range; CFG's negative prompt is sized at load."""
    with pytest.raises(ConfigError, match="at most 16"):
        quiet_engine(smollm2_path, terms=[Proxy(smollm2_path, smollm2_path)] * 9)
    link = tmp_path / "link.gguf"
    link.symlink_to(smollm2_path)
    with quiet_engine(smollm2_path, terms=[Contrastive(link), Proxy(smollm2_path, link)]) as engine:
        assert len(engine._models) == 1
    with quiet_engine(smollm2_path, terms=[ValueNet(smollm2_path, 0.5), CFG(1.0)]) as engine:
        with pytest.raises(ConfigError, match="between 0 and 100"):
            engine.terms[0].weight = -1.0
        engine.terms[1].weight = -1.0          # guidance may point away
    with pytest.raises(ConfigError):
        ValueNet(smollm2_path, -0.5)
    with pytest.raises(ContextOverflowError, match="negative prompt"):
        quiet_engine(smollm2_path, terms=[CFG(1.0, "word " * 300)])
    with quiet_engine(smollm2_path, terms=[CFG(1.0, "word " * 200)]) as engine:
        text = engine.complete("Count: one two", max_tokens=None, sampling=GREEDY)
        assert text and engine.stats.context_used <= 256
    # CFG's context holds the negative prompt plus at most n_ctx - 1 answer tokens: with the
    # default (one token) it is the base's size, not rounded up to the next 256 (its KV cache
    # is CFG's memory cost)
    with quiet_engine(smollm2_path, terms=[CFG(1.0)]) as engine:
        assert [c.n_ctx for c in engine._contexts] == [256, 256]
        text = engine.complete("1", max_tokens=None, sampling=GREEDY)   # the longest answer there is
        assert text and engine.stats.context_used <= 256
