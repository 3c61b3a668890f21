"""Bounded fuzzing of three boundaries (hypothesis, fixed budgets, derandomized):

    load_map       mutated .npz bytes and forged .npy headers -> a valid map or VocabMismatchError
    chat templates random templates from a small Jinja grammar, random conversations
                   -> a string or ConfigError, within the rendering budget
    /load          random settings -> applied whole and valid, or refused whole with one error line

Every failure found became a named regression test at the bottom of this file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from ivl_local import chat_template  # noqa: E402
from ivl_local.errors import ConfigError, ContextOverflowError, VocabMismatchError  # noqa: E402

_FUZZ = dict(derandomize=True, deadline=None, database=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAP_FUZZ = settings(max_examples=600, **_FUZZ)
TEMPLATE_FUZZ = settings(max_examples=1000, **_FUZZ)
LOAD_FUZZ = settings(max_examples=1000, **_FUZZ)


# --- token map files ------------------------------------------------------------------------------

def _vocab(n: int, fp: str):
    from ivl_local.vocab import VocabData

    return VocabData([b"t%d" % i for i in range(n)], np.ones(n, np.int32), "llama", fp)


BASE, VALUE = _vocab(6, "base-fp"), _vocab(4, "value-fp")
GOOD_ARRAYS = dict(token_map=np.array([0, 1, 2, 3, -1, 0], np.int32),
                   token_weights=np.array([1, 1, 0.5, 1, 0, 0.25], np.float32),
                   base_fingerprint=np.str_("base-fp"), value_fingerprint=np.str_("value-fp"),
                   builder=np.str_("exact-text/3"), n_exact=np.int64(4))


def _good_npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **GOOD_ARRAYS)
    return buf.getvalue()


SEED_MAP = _good_npz()


def _load_bytes(raw: bytes):
    from ivl_local.vocab import load_map

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.npz"
        path.write_bytes(raw)
        return load_map(path, BASE, VALUE)


def _assert_valid_or_refused(raw: bytes) -> None:
    try:
        mapping = _load_bytes(raw)
    except VocabMismatchError as e:
        assert "\n" not in str(e)
        kinds = ("header", "dtype", "shape", "truncated", "zip", "missing", "outside", "NaN",
                 "weights", "vocabularies", "CRC")
        event("refused: " + next((k for k in kinds if k in str(e)), "other"))
        return
    event("loaded")
    assert mapping.token_map.dtype == np.int32 and mapping.token_map.shape == (len(BASE),)
    assert mapping.token_weights.dtype == np.float32 and mapping.token_weights.shape == (len(BASE),)
    assert mapping.token_map.min() >= -1 and mapping.token_map.max() < len(VALUE)
    assert np.all(np.isfinite(mapping.token_weights))
    assert mapping.token_weights.min() >= 0 and mapping.token_weights.max() <= 1


mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                     st.integers(0, len(SEED_MAP) - 1), st.integers(0, 255), st.integers(1, 64))


def _mutate(raw: bytes, ops) -> bytes:
    data = bytearray(raw)
    for op, pos, byte, n in ops:
        pos = pos % max(1, len(data))
        if op == "flip" and data:
            data[pos] ^= 1 << (byte % 8)
        elif op == "set" and data:
            data[pos] = byte
        elif op == "insert":
            data[pos:pos] = bytes([byte]) * n
        elif op == "delete":
            del data[pos:pos + n]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@MAP_FUZZ
@given(st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_map_bytes(ops):
    _assert_valid_or_refused(_mutate(SEED_MAP, ops))


DESCRS = ["<i4", "<i8", ">i8", "<u8", "|i1", "<f4", "<f8", ">f4", "<f2", "|O", "|b1", "<c8", "|V8",
          "<M8[s]", "<U8", "<U100000000", "|S4", "[('a', '<i4')]", "<i0", "x"]
shapes = st.one_of(st.just(()), st.tuples(st.integers(0, 2**62)), st.tuples(st.integers(0, 8), st.integers(0, 8)),
                   st.just((6,)), st.just((2**40,)))


def _member(descr: str, shape: tuple, fortran: bool, data: bytes) -> bytes:
    header = "{'descr': %s, 'fortran_order': %r, 'shape': %r, }" % (
        descr if descr.startswith("[") else repr(descr), fortran, shape)
    header = header.ljust(((len(header) + 11) // 64 + 1) * 64 - 11) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + data


@MAP_FUZZ
@given(name=st.sampled_from(sorted(GOOD_ARRAYS)), descr=st.sampled_from(DESCRS), shape=shapes,
       fortran=st.booleans(), data=st.binary(max_size=64))
def test_fuzz_forged_npy_headers(name, descr, shape, fortran, data):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, array in GOOD_ARRAYS.items():
            raw = io.BytesIO()
            np.save(raw, array)
            zf.writestr(key + ".npy", _member(descr, shape, fortran, data) if key == name else raw.getvalue())
    _assert_valid_or_refused(buf.getvalue())


@MAP_FUZZ
@given(header=st.text(alphabet="{}()[]'\",:- 01ab<i4f8shapedcr_", max_size=300))
def test_fuzz_garbage_npy_header_text(header):
    text = header + "\n"
    member = b"\x93NUMPY\x01\x00" + len(text.encode()).to_bytes(2, "little") + text.encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, array in GOOD_ARRAYS.items():
            raw = io.BytesIO()
            np.save(raw, array)
            zf.writestr(key + ".npy", member if key == "token_map" else raw.getvalue())
    _assert_valid_or_refused(buf.getvalue())


# --- chat templates -------------------------------------------------------------------------------

FUZZ_STEPS, FUZZ_SECONDS = 20_000, 0.3   # a smaller budget keeps runaway examples short

ints = st.sampled_from(["0", "1", "3", "-1", "100", "100000", "10**6", "2**70", "loop.index"])
texts = st.sampled_from(["'x'", "'ab\\n'", "''", "m.content", "m['role']", "bos_token", "eos_token",
                         "'{:>9}'", "'%s-%d'", "ns.s"])
atoms = st.one_of(ints, texts, st.sampled_from(["messages", "messages[0]", "messages[-1].content", "range(3)",
                                                "[1, 'a']", "none", "true", "add_generation_prompt",
                                                "dict(a=1)", "m", "undefined_name"]))
BINOPS = [" ~ ", " + ", " * ", " % ", " ** ", " // ", " == ", " and ", " in ", " - "]
FILTERS = ["length", "join", "upper", "trim", "list", "tojson", "string", "first", "last", "reverse",
           "sum", "unique", "default('d')", "center({})", "indent({})", "replace('x', {})", "format({})",
           "batch({})", "truncate({})", "wordwrap({})", "join({})", "attr('content')", "map('upper')",
           "selectattr('role', 'equalto', 'user')", "items", "int", "float", "abs", "round"]
METHODS = ["split('x')", "strip()", "startswith('a')", "upper()", "format({})", "join({})",
           "replace('a', {})", "center({})", "count('x')", "items()", "get('role')", "keys()"]


def _expr(children):
    return st.one_of(
        st.tuples(children, st.sampled_from(BINOPS), children).map(lambda t: f"({t[0]}{t[1]}{t[2]})"),
        st.tuples(children, st.sampled_from(FILTERS), children).map(
            lambda t: f"({t[0]} | {t[1].format(t[2])})"),
        st.tuples(children, st.sampled_from(METHODS), children).map(lambda t: f"({t[0]}).{t[1].format(t[2])}"),
        st.tuples(children, children).map(lambda t: f"[{t[0]}, {t[1]}]"),
        st.tuples(children, children, children).map(lambda t: f"({t[0]} if {t[1]} else {t[2]})"),
        children.map(lambda e: f"range({e})"),
        children.map(lambda e: f"f({e})"),
    )


exprs = st.recursive(atoms, _expr, max_leaves=6)


def _block(children):
    body = st.lists(children, min_size=0, max_size=3).map("".join)
    return st.one_of(
        st.tuples(st.sampled_from(["messages", "range(100000)", "'abcdefgh'", "ns.s", "m.content",
                                   "messages|reverse", "[1, 2, 3]"]), body, exprs).map(
            lambda t: "{% for m in " + t[0] + " %}" + t[1] + "{% endfor %}"),
        st.tuples(exprs, body, body).map(lambda t: "{% if " + t[0] + " %}" + t[1] + "{% else %}" + t[2] + "{% endif %}"),
        st.tuples(body, exprs).map(lambda t: "{% macro g(k) %}" + t[0] + "{% endmacro %}{{ g(" + t[1] + ") }}"),
    )


statements = st.recursive(
    st.one_of(st.sampled_from(["<|im_start|>", "\n", "text", "{%", "}}", "{# c #}"]),
              exprs.map(lambda e: "{{ " + e + " }}"),
              exprs.map(lambda e: "{% set ns.s = " + e + " %}"),
              exprs.map(lambda e: "{{ raise_exception(" + e + ") }}")),
    _block, max_leaves=8)
templates = st.lists(statements, min_size=1, max_size=4).map(
    lambda parts: "{% set ns = namespace(s='') %}{% macro f(n) %}{{ n }}{% endmacro %}" + "".join(parts))
conversations = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": st.text(max_size=30)}), min_size=1, max_size=4)


@TEMPLATE_FUZZ
@given(template=templates, messages=conversations, generation=st.booleans())
def test_fuzz_templates_render_to_text_or_one_config_error(template, messages, generation):
    saved = chat_template.RENDER_MAX_STEPS, chat_template.RENDER_SECONDS
    chat_template.RENDER_MAX_STEPS, chat_template.RENDER_SECONDS = FUZZ_STEPS, FUZZ_SECONDS
    try:
        started = time.monotonic()
        try:
            out = chat_template.render_messages(messages, template, bos_token="<s>", eos_token="</s>",
                                                add_generation_prompt=generation)
        except (ConfigError, ContextOverflowError) as e:
            assert str(e) and "\n" not in str(e).strip() or "syntax error" in str(e)
            event("budget exceeded" if "budget" in str(e) else
                  "refused: " + ("syntax" if "syntax" in str(e) else "raise_exception" if "error:" in str(e)
                                 else "render error"))
        else:
            event("rendered")
            assert isinstance(out, str) and len(out) <= chat_template.RENDER_MAX_CHARS
        # a hang guard, not a benchmark: the budget is 0.3 s; one step may overrun it a little
        assert time.monotonic() - started < FUZZ_SECONDS + 5
    finally:
        chat_template.RENDER_MAX_STEPS, chat_template.RENDER_SECONDS = saved
        assert getattr(chat_template._active, "budget", None) is None


# --- /load -----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=6)
near_valid = {
    "alpha": st.one_of(st.floats(-1, 120), st.integers(-3, 150), json_values),
    "value_enabled": st.one_of(st.booleans(), json_values),
    "max_tokens": st.one_of(st.integers(-2, 10**6), st.none(), json_values),
    "base": st.one_of(st.text(max_size=10), json_values),
}
sampling_values = st.dictionaries(
    st.sampled_from(["temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n",
                     "presence_penalty", "frequency_penalty", "seed", "unknown"]),
    st.one_of(st.floats(-1, 3), st.integers(-1, 2**65), json_values), max_size=5)
settings_values = st.one_of(
    st.fixed_dictionaries({}, optional={**near_valid, "sampling": st.one_of(sampling_values, json_values)}),
    json_values)
messages_values = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "robot"]),
                                    "content": st.one_of(st.text(max_size=10), json_values)},
                                   optional={"interrupted": st.one_of(st.booleans(), json_values)}),
             max_size=4),
    json_values)


class _Engine:
    has_value, value_enabled, alpha, stats = True, True, 1.0, None


def _new_session():
    from rich.console import Console

    from ivl_local.cli.session import ChatSession
    from ivl_local.config import SamplingConfig

    session = ChatSession(_Engine(), base_path=Path("/m/base.gguf"), value_path=None, system="sys",
                          sampling=SamplingConfig(seed=1), max_tokens=32,
                          console=Console(file=io.StringIO(), width=100), use_readline=False)
    session.messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    return session


def _state(session) -> tuple:
    return (session.system, json.dumps(session.messages), session.sampling, session.max_tokens,
            session.engine.alpha, session.engine.value_enabled)


@LOAD_FUZZ
@given(settings_value=settings_values, messages=messages_values, drop_settings=st.booleans())
def test_fuzz_load_is_all_or_nothing(settings_value, messages, drop_settings):
    from ivl_local.config import ALPHA_MAX, SamplingConfig

    data = {"format": "ivl-chat/1", "messages": messages}
    if not drop_settings:
        data["settings"] = settings_value
    session = _new_session()
    before = _state(session)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "conv.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert session.dispatch(f"/load {path}") is False
    lines = err.getvalue().splitlines()
    event("refused" if lines else "applied")
    if lines:   # refused: one line, nothing changed
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert _state(session) == before
        return
    # applied: everything the session now holds is valid
    engine = session.engine
    assert isinstance(engine.alpha, float) and math.isfinite(engine.alpha) and 0 <= engine.alpha <= ALPHA_MAX \
        or engine.alpha == 1.0
    assert isinstance(engine.value_enabled, bool)
    assert session.max_tokens is None or (isinstance(session.max_tokens, int) and session.max_tokens >= 1)
    assert isinstance(session.sampling, SamplingConfig)
    assert session.system is None or isinstance(session.system, str)
    for m in session.messages:
        assert m["role"] in ("user", "assistant") and isinstance(m["content"], str)
        assert isinstance(m.get("interrupted", False), bool)
    saved = data.get("settings") or {}
    if isinstance(saved.get("alpha"), (int, float)):
        assert engine.alpha == saved["alpha"]


# --- regressions found by the fuzzers ----------------------------------------------------------------

def _map_with_token_map_member(member: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, array in GOOD_ARRAYS.items():
            raw = io.BytesIO()
            np.save(raw, array)
            zf.writestr(key + ".npy", member if key == "token_map" else raw.getvalue())
    return buf.getvalue()


@pytest.mark.parametrize("header", ["[", "{'descr': '<i4', 'shape': (", "(((", "'''"])
def test_unterminated_npy_header_text_is_refused(header):
    """Found by test_fuzz_garbage_npy_header_text: numpy reads a v1.0 header through
    tokenize, whose TokenError ('EOF in multi-line statement') escaped as a traceback."""
    text = header + "\n"
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode()
    with pytest.raises(VocabMismatchError, match="not a token map file"):
        _load_bytes(_map_with_token_map_member(member))
