"""`ivl compat` on the real Gemma 3 / SmolLM2 vocabularies and models, against independent
computations: token texts normalised here in Python, logits from llama-cpp-python's own
high-level API, greedy tokens from the Engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ivl_local.compat import STOP, compat_report, value_mass
from ivl_local.valuefile import read_gguf_header
from ivl_local.vocab import read_vocab

pytestmark = [pytest.mark.real,
              pytest.mark.filterwarnings("ignore::ivl_local.valuefile.RawValueModelWarning")]

SPM_SPACE = "\u2581"


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes are shifted to code points 256 and up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _normalise(text: bytes, kind: str, token_type: int) -> bytes:
    if token_type == 4:   # user-defined: literal text
        return text
    s = text.decode("utf-8", "surrogateescape")
    if kind == "spm":
        if len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            try:
                return bytes([int(s[3:5], 16)])
            except ValueError:
                pass
        return s.replace(SPM_SPACE, " ").encode("utf-8", "surrogateescape")
    table = _byte_level_table()
    return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8", "surrogateescape") for c in s)


def _exact_python(base, value, base_types=(1, 6)) -> tuple[np.ndarray, set[int]]:
    """Which base tokens (of `base_types`) have an exact counterpart, and the set of value
    ids that are one."""
    by_text: dict[bytes, int] = {}
    for j, (text, t) in enumerate(zip(value.tokens, value.types.tolist())):
        if t in (2, 3, 5):
            continue
        key = _normalise(text, value.kind, t)
        if key not in by_text or (t == 1 and value.types[by_text[key]] != 1):
            by_text[key] = j
    has = np.zeros(len(base), bool)
    counterparts = set()
    for i, (text, t) in enumerate(zip(base.tokens, base.types.tolist())):
        if t not in base_types:
            continue
        key = _normalise(text, base.kind, t)
        if key and key in by_text:
            has[i] = True
            counterparts.add(by_text[key])
    return has, counterparts


@pytest.fixture(scope="module")
def vocabs(gemma3_path, smollm2_path):
    return read_vocab(read_gguf_header(gemma3_path)), read_vocab(read_gguf_header(smollm2_path))


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    from ivl_local.datasets import data_path

    lines = data_path("arith_valid.jsonl").read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("compat") / "demos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def report(gemma3_path, smollm2_path, demos):
    """SmolLM2 (a raw value model: no training base, so the wish is its own top-1) on Gemma."""
    return compat_report(gemma3_path, smollm2_path, demos, limit=4, mass_tokens=64)


def test_coverage_both_ways_matches_a_python_normaliser(vocabs, report):
    gemma, smol = vocabs
    has, _ = _exact_python(gemma, smol)
    back, _ = _exact_python(smol, gemma)
    cov = report.coverage
    assert cov.base_exact == int(has.sum())
    assert cov.value_exact == int(back.sum())
    assert cov.base_normal == int(np.isin(gemma.types, (1, 6)).sum())
    # Gemma's 262k vocabulary is mostly words SmolLM2's 49k lacks; SmolLM2's mostly has Gemma's
    assert 0.1 < cov.base_share < 0.3 < 0.9 < cov.value_share
    assert sum(cov.rules.values()) == len(gemma)
    # the map's exact rule also covers user-defined tokens (type 4, compared as literal text)
    assert cov.rules["exact"] == int(_exact_python(gemma, smol, (1, 4, 6))[0].sum())
    assert cov.rules["end-by-role"] >= 1     # Gemma's <eos>/<end_of_turn> -> SmolLM2's turn end


def test_mapped_mass_matches_llama_cpp_logits(vocabs, smollm2_path, report):
    """The mass on exact counterparts, recomputed from llama-cpp-python's Llama(logits_all)
    over the same tokens, with the exact set from the Python normaliser."""
    import llama_cpp
    from ivl_local.backend import safe_llama_params

    from ivl_local import compat

    gemma, smol = vocabs
    _, counterparts = _exact_python(gemma, smol)
    text = b"The cat sat on the mat, and 17 + 25 = 42."
    with safe_llama_params():
        llm = llama_cpp.Llama(str(smollm2_path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    try:
        tokens = llm.tokenize(text, add_bos=True, special=True)
        llm.eval(tokens)
        logits = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = p[:, sorted(counterparts)].sum(axis=1).mean()

    side = compat._Side(smollm2_path, 1)
    try:
        exact_set = np.array(sorted(counterparts))
        mass = value_mass(side, [text], exact_set, np.arange(len(smol)), max_positions=1000)
    finally:
        side.close()
    assert mass.positions == len(tokens)
    assert mass.reached == pytest.approx(1.0, abs=1e-9)
    # batched vs one-by-one decode round differently, by CPU: 0.0023 apart on an AVX-512 Xeon
    assert mass.exact == pytest.approx(expected, abs=5e-3)
    assert 0.0 < report.mass.exact <= report.mass.reached <= 1.0


def test_first_step_is_the_engines_greedy_token(gemma3_path, smollm2_path, demos, report):
    """Step 0 of each demonstration: the fused top-1 is what the Engine generates first."""
    from ivl_local import GREEDY, Engine
    from ivl_local.train.data import read_jsonl

    first = {s.demo: s for s in report.steps if s.step == 0}
    assert len(first) == 4
    with Engine(gemma3_path, smollm2_path, alpha=1.0, n_ctx=512) as engine:
        for lineno, record in read_jsonl(demos):
            messages = record["messages"][:-1]
            engine.clear_cache()
            text = "".join(engine.generate_chat(messages, max_tokens=1, sampling=GREEDY))
            assert (STOP if engine.stats.finish_reason == "stop" and not text else text) == first[lineno].fused


def test_steps_cover_each_answer_and_its_end(report):
    by_demo: dict[int, list] = {}
    for s in report.steps:
        by_demo.setdefault(s.demo, []).append(s)
    for steps in by_demo.values():
        assert [s.step for s in steps] == list(range(len(steps)))
        assert steps[-1].reference == STOP
        assert all(s.reference != STOP for s in steps[:-1])
    summary = report.step_summary()
    assert summary["steps"] == len(report.steps)
    assert sum(summary["disagreements_by_rule"].values()) == sum(not s.agree for s in report.steps)
    for s in report.steps:
        assert s.agree == (s.fused == s.wish)
        if s.agree:
            assert s.wish_rank in (0, None) or s.wish_rank == 0


def test_same_vocabulary_is_identity_and_always_agrees(smollm2_path, demos):
    """Value = base (identity map): fused = 2x the same logits, so the top-1 is the value's."""
    r = compat_report(smollm2_path, smollm2_path, demos, limit=2, own_base="none", mass_tokens=16)
    assert r.builder == "identity"
    assert r.coverage.base_share == r.coverage.value_share == 1.0
    assert r.mass.exact == pytest.approx(1.0) and r.mass.reached == pytest.approx(1.0)
    assert r.steps and all(s.agree and s.fused == s.base_alone for s in r.steps)


def test_cli_json_and_errors(tmp_path, gemma3_path, smollm2_path):
    from typer.testing import CliRunner

    from ivl_local.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["compat", str(smollm2_path), str(smollm2_path), "--json", "--own-base", "none"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["coverage"]["base_share"] == 1.0 and data["steps"] == [] and data["mass"]["positions"] > 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for args, code, words in [
        (["--data", str(tmp_path / "missing.jsonl")], 2, "no such demonstration file"),
        (["--data", str(bad)], 1, "no assistant message"),
        (["--data", str(bad), "--limit", "0"], 2, "--limit must be at least 1"),
        (["--alpha", "-1"], 2, "alpha"),
        (["--map", str(bad)], 1, "not a token map file"),
    ]:
        result = runner.invoke(app, ["compat", str(gemma3_path), str(smollm2_path), *args])
        assert result.exit_code == code, (args, result.output)
        lines = result.stderr.splitlines()   # a raw value model adds its one-line warning
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0], (args, result.stderr)
        assert all(line.startswith(("error: ", "warning: ")) for line in lines), result.stderr


def test_store_alpha_reaches_the_engine(tmp_path, gemma3_path, smollm2_path, demos):
    """`ivl compat --store-alpha` writes this base's alpha into the map; an Engine given that map
    and no alpha uses it, an explicit alpha still wins; bad values are one error line."""
    import shutil

    from typer.testing import CliRunner

    from ivl_local.cli.main import app
    from ivl_local.engine import Engine
    from ivl_local.vocab import cached_map_path

    runner = CliRunner()
    map_file = tmp_path / "g2s.npz"
    compat_report(gemma3_path, smollm2_path, own_base="none", mass_tokens=4)   # builds the cached map
    shutil.copy(cached_map_path(read_vocab(read_gguf_header(gemma3_path)),
                                read_vocab(read_gguf_header(smollm2_path))), map_file)
    result = runner.invoke(app, ["compat", str(gemma3_path), str(smollm2_path), "--own-base", "none",
                                 "--map", str(map_file), "--store-alpha", "1.5", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stored_alpha"] == 1.5 and data["stored_map"] == str(map_file)
    with Engine(gemma3_path, smollm2_path, n_ctx=128, n_threads=1, token_map=map_file) as engine:
        assert engine.alpha == 1.5
    with Engine(gemma3_path, smollm2_path, 0.5, n_ctx=128, n_threads=1, token_map=map_file) as engine:
        assert engine.alpha == 0.5
    # compat itself reads it back as its default alpha
    assert compat_report(gemma3_path, smollm2_path, own_base="none", token_map=map_file,
                         mass_tokens=4).alpha == 1.5
    # calibrated: the value file's alpha (1 for a raw model; not the stored 1.5) times the
    # measured spread ratio, the same on a second run (no compounding)
    for _ in range(2):
        r = compat_report(gemma3_path, smollm2_path, demos, limit=1, own_base=smollm2_path,
                          token_map=map_file, mass_tokens=4, store_alpha="calibrated")
        assert r.stored_alpha == pytest.approx(r.step_summary()["spread_ratio"], abs=1e-4)
    with Engine(gemma3_path, smollm2_path, n_ctx=128, n_threads=1, token_map=map_file) as engine:
        assert engine.alpha == pytest.approx(r.stored_alpha)
    # stored for this base file: another base with the same vocabulary ignores it
    other = tmp_path / "other-gemma.gguf"
    other.symlink_to(gemma3_path)
    with Engine(other, smollm2_path, n_ctx=128, n_threads=1, token_map=map_file) as engine:
        assert engine.alpha == 1.0
    result = runner.invoke(app, ["compat", str(gemma3_path), str(smollm2_path), "--own-base", "none",
                                 "--map", str(map_file), "--store-alpha", "none"])
    assert result.exit_code == 0 and "removed the stored alpha" in result.stdout, result.output
    with Engine(gemma3_path, smollm2_path, n_ctx=128, n_threads=1, token_map=map_file) as engine:
        assert engine.alpha == 1.0   # the raw value file's default again
    for args, words in [
        (["--store-alpha", "big"], "--store-alpha must be a number, 'calibrated' or 'none'"),
        (["--store-alpha", "-2"], "--store-alpha must be"),
        (["--store-alpha", "calibrated"], "--store-alpha calibrated needs --data"),
    ]:
        result = runner.invoke(app, ["compat", str(gemma3_path), str(smollm2_path), "--map", str(map_file), *args])
        assert result.exit_code == 2, (args, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and words in errors[0], (args, result.stderr)
    result = runner.invoke(app, ["compat", str(smollm2_path), str(smollm2_path), "--own-base", "none",
                                 "--store-alpha", "1"])
    assert result.exit_code == 2 and "one vocabulary" in result.stderr, result.output


def test_own_base_margins_and_spread(gemma3_path, smollm2_path, demos):
    """With the value's own base equal to the value model, own + alpha * value is (1 + alpha)
    times one logit vector: the wish is its top-1, the value's share of the wish's lead is
    alpha times the own base's, and the spread ratio is Gemma's logit std over SmolLM2's."""
    r = compat_report(gemma3_path, smollm2_path, demos, limit=2, alpha=0.5, own_base=smollm2_path,
                      mass_tokens=8)
    assert r.own_base is not None and r.steps
    for s in r.steps:
        assert s.own_margin >= 0
        assert s.value_margin == pytest.approx(0.5 * s.own_margin, abs=1e-3)
        assert 0.3 < s.spread_ratio < 3.0
    summary = r.step_summary()
    assert summary["wish_carried_by_own_base"] == pytest.approx(
        sum(s.value_margin <= 0 for s in r.steps) / len(r.steps))
    assert summary["spread_ratio"] == pytest.approx(float(np.median([s.spread_ratio for s in r.steps])))
