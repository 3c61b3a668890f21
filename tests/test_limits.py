"""Limits where input is unbounded, and validation at the boundary: each case is one typed
error (one `error:` line in the CLI) that leaves nothing behind, never a hang, a traceback or
a silent wrong result.

    chat templates    hostile or broken `tokenizer.chat_template` -> ConfigError, bounded
    training data     huge lines, non-UTF-8, deep JSON, empty answers -> DataError file:line
    token maps        dtype, shape and size checked from the .npy headers -> VocabMismatchError
    atomic writes     temp files of killed writes are removed by the next write
    the chat session  /alpha, /load and CLI flags share config's validators; /load is all-or-nothing
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ivl_local import chat_template
from ivl_local.chat_template import render_messages, split_for_training
from ivl_local.errors import ConfigError, DataError, VocabMismatchError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


# --- 1. chat templates -------------------------------------------------------------------------

HOSTILE_TEMPLATES = {
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a literal": "{% for a in 'xxxxxxxxxx' %}" * 9 + "{% endfor %}" * 9,
    "range too long": "{% for i in range(10**9) %}{% endfor %}",
    "string repetition": "{{ 'x' * 10**10 }}",
    "repetition of a repetition": "{% set n = 100000 %}{{ 'x' * n * n }}",
    "huge power": "{% set n = 100000 %}{{ 7 ** n ** 2 }}",
    "doubling in a loop": ("{% set ns = namespace(s='x') %}{% for i in range(60) %}"
                           "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}"),
    "center width": "{{ 'a' | center(1000000000) }}",
    "format width": "{{ '{:>999999999}'.format('a') }}",
    "percent width": "{{ '%999999999s' % 'a' }}",
    "format filter width": "{{ '%999999999s' | format('a') }}",
    "nested lists joined": ("{% set a = ['xxxxxxxxxx'] * 1000 %}{% set b = [a,a,a,a,a,a,a,a,a,a] %}"
                            "{% set c = [b,b,b,b,b,b,b,b,b,b] %}{% set d = [c,c,c,c,c,c,c,c,c,c] %}{{ d | join }}"),
    "nested lists printed": ("{% set a = ['xxxxxxxxxx'] * 1000 %}{% set b = [a,a,a,a,a,a,a,a,a,a] %}"
                             "{% set c = [b,b,b,b,b,b,b,b,b,b] %}{% set d = [c,c,c,c,c,c,c,c,c,c] %}{{ d }}"),
    "binary macro recursion": ("{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}"
                               "{% endmacro %}{{ f(60) }}"),
    "endless recursion": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "replace blow-up": "{% set s = 'x' * 1000 %}{{ (s * 1000).replace('x', s) }}",
    "indent blow-up": "{% set s = '\n' * 1000000 %}{{ s | indent(100000) }}",
    "quadratic sum": "{{ ([[1]] * 10000) | sum(start=[]) }}",
    "join blow-up": "{{ ('ab' * 1000000).join(['x'] * 100000) }}",
    "lipsum pages": "{{ lipsum(n=100000) }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(100000) }}",
    "output flood": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "syntax error": "{% for %}",
    "unclosed block": "{% if messages %}never closed",
    "unknown filter": "{{ messages | no_such_filter }}",
    "raise_exception": "{{ raise_exception('Conversation roles must alternate') }}",
    "undefined": "{{ foo.bar }}",
    "division by zero": "{{ 1 // 0 }}",
    "python internals": "{{ messages.__class__.__mro__ }}",
}


@pytest.fixture
def quick_budget(monkeypatch):
    """A smaller step/time budget, so the tests of runaway templates stay fast."""
    monkeypatch.setattr(chat_template, "RENDER_MAX_STEPS", 50_000)
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)


@pytest.mark.parametrize("name", list(HOSTILE_TEMPLATES))
def test_hostile_or_broken_template_is_one_config_error(name, quick_budget):
    with pytest.raises(ConfigError) as err:
        render_messages(MESSAGES, HOSTILE_TEMPLATES[name])
    message = str(err.value)
    assert message.startswith("chat template") and "\n" not in message


def test_budget_defaults_stop_nested_loops_without_the_test_budget():
    with pytest.raises(ConfigError, match="rendering budget"):
        render_messages(MESSAGES, HOSTILE_TEMPLATES["nested range loops"])


@pytest.mark.parametrize("template", [5, 2.5, ["{{ messages }}"], {"default": "x"}, b"{{ x }}", True])
def test_a_template_that_is_not_text_is_refused(template):
    with pytest.raises(ConfigError, match="chat template of the model is not text"):
        render_messages(MESSAGES, template)


def test_an_overlong_template_is_refused():
    with pytest.raises(ConfigError, match="characters long"):
        render_messages(MESSAGES, "x" * (chat_template.TEMPLATE_MAX_CHARS + 1))


def test_no_budget_is_left_behind_after_an_error(quick_budget):
    with pytest.raises(ConfigError):
        render_messages(MESSAGES, HOSTILE_TEMPLATES["nested range loops"])
    assert getattr(chat_template._active, "budget", None) is None
    assert render_messages(MESSAGES, None).endswith("Assistant:")


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
         "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
         "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
         "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
         "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
TOOLISH = ("{%- set ns = namespace(last=-1) -%}{%- for m in messages[::-1] -%}{%- if ns.last < 0 and m.role == 'user' -%}"
           "{%- set ns.last = messages | length - 1 - loop.index0 -%}{%- endif -%}{%- endfor -%}"
           "{%- for m in messages -%}{{ '<|' ~ m.role ~ '|>' }}{{ m.content.split('</think>')[-1].lstrip('\n') }}"
           "{%- if loop.index0 == ns.last %}{{ ' [last user]' }}{% endif %}{{ '%s/%d' | format('n', loop.length) }}"
           "{{ m | tojson }}{{ '{:>4}'.format(loop.index) }}{%- endfor -%}"
           "{{ strftime_now('%Y') | length }}")


@pytest.mark.parametrize("template", [CHATML, LLAMA3, GEMMA, TOOLISH, chat_template.FALLBACK_TEMPLATE])
def test_real_world_templates_render_as_plain_jinja_does(template):
    """The budget changes nothing for templates that stay inside it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = chat_template._raise
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    messages = MESSAGES[1:] if template == GEMMA else MESSAGES
    for gen in (True, False):
        kw = dict(bos_token="<s>", eos_token="</s>", add_generation_prompt=gen)
        expected = env.from_string(template).render(messages=messages, **kw)
        assert render_messages(messages, template, **kw) == expected


def test_a_conversation_far_past_any_context_is_refused_before_rendering():
    from ivl_local.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError, match="characters long"):
        render_messages([{"role": "user", "content": "x" * (chat_template.RENDER_MAX_CHARS // 4 + 1)}], None)


def test_training_split_reports_a_hostile_template_as_data_error(tmp_path, quick_budget):
    from ivl_local.train.data import load_examples

    class Base:  # what load_examples needs of a BaseGGUF
        chat_template = HOSTILE_TEMPLATES["nested range loops"]
        eos_text, eos_id = "</s>", 2

        def tokenize(self, text, add_bos):
            return [1] + [3] * len(text.split()) if add_bos else [3] * len(text.split())

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": MESSAGES[1:3]}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: chat template .* rendering budget"):
        load_examples(path, Base(), max_len=64)
    with pytest.raises(ConfigError):
        split_for_training(MESSAGES[1:3], HOSTILE_TEMPLATES["syntax error"])


def _gguf_with_template(source: Path, out: Path, template: str) -> Path:
    """A copy of `source` whose tokenizer.chat_template is `template`, padded with a Jinja
    comment to the original's byte length, so every offset in the file stays valid."""
    from gguf import GGUFReader

    field = GGUFReader(str(source)).fields["tokenizer.chat_template"]
    original = bytes(field.parts[field.data[0]])
    body = template.encode()
    pad = len(original) - len(body) - len("{##}")
    assert pad >= 0, "template longer than the original"
    new = body + b"{#" + b" " * pad + b"#}"
    data = bytearray(source.read_bytes())
    start = data.find(original)
    data[start:start + len(original)] = new
    out.write_bytes(bytes(data))
    return out


@pytest.mark.real
@pytest.mark.parametrize("name", ["nested range loops", "syntax error"])
def test_ivl_chat_with_a_hostile_template_in_the_base_is_one_error_line(smollm2_path, tmp_path, name):
    base = _gguf_with_template(smollm2_path, tmp_path / "hostile.gguf", HOSTILE_TEMPLATES[name])
    r = subprocess.run([sys.executable, "-P", "-m", "ivl_local.cli.main", "chat", "--base", str(base),
                        "--value", "none", "-p", "Hi", "--max-tokens", "4"],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "IVL_CACHE_DIR": str(tmp_path / "cache")})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: chat template"), r.stderr
    assert r.stdout == ""


# --- 2. training data ---------------------------------------------------------------------------

GOOD = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})


def _data(tmp_path: Path, second_line: bytes) -> Path:
    path = tmp_path / "demo.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + second_line + b"\n" + GOOD.encode() + b"\n")
    return path


@pytest.mark.parametrize("line, message", [
    (b'{"prompt": "caf\xe9", "response": "y"}', "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": ""}]}).encode(), "message 1 is an empty assistant message"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": " \n "}]}).encode(), "message 1 is an empty assistant message"),
    (json.dumps({"prompt": "q", "response": "  "}).encode(), "empty 'response'"),
    (b'{"prompt": "\\ud800", "response": "y"}', "'prompt' or 'response' is not UTF-8 text"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "a"}]}',
     "message 0 must be"),
    (b'{"prompt": "a", "response": "b", "n": ' + b"1" * 5000 + b"}", "not usable JSON"),
    (b'{"prompt": "' + b"x" * (2 << 20) + b'", "response": "y"}', "line longer than 1 MiB"),
])
def test_bad_demonstration_line_is_data_error_with_file_and_line(tmp_path, line, message):
    from ivl_local.train.data import read_jsonl

    with pytest.raises(DataError) as err:
        read_jsonl(_data(tmp_path, line))
    assert f"demo.jsonl:2: {message}" in str(err.value)


def test_a_line_just_under_the_limit_is_read_and_a_bom_is_skipped(tmp_path):
    from ivl_local.train.data import MAX_LINE_BYTES, read_jsonl

    head = b'{"prompt": "'
    tail = b'", "response": "y"}'
    line = head + b"x" * (MAX_LINE_BYTES - len(head) - len(tail)) + tail
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n" + line + b"\n")
    records = read_jsonl(path)
    assert [n for n, _ in records] == [1, 2] and len(records[1][1]["prompt"]) > 1_000_000


def test_a_50_mb_line_is_refused_without_reading_it_whole(tmp_path):
    """Measured in a child process: its peak memory grows by the bounded line, not 50 MB."""
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(GOOD.encode() + b"\n" + b'{"prompt": "')
        for _ in range(50):
            f.write(b"x" * (1 << 20))
        f.write(b'", "response": "y"}\n')
    code = f"""
import resource
from ivl_local.errors import DataError
from ivl_local.train.data import read_jsonl
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_jsonl({str(path)!r})
except DataError as e:
    print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    message, grown_mb = r.stdout.splitlines()
    assert "big.jsonl:2: line longer than 1 MiB" in message
    assert int(grown_mb) < 20, f"peak memory grew by {grown_mb} MB"


# --- 3. token map files ---------------------------------------------------------------------------

def _vocab(n: int, fp: str):
    from ivl_local.vocab import VocabData

    return VocabData([b"t%d" % i for i in range(n)], np.ones(n, np.int32), "llama", fp)


BASE, VALUE = _vocab(6, "base-fp"), _vocab(4, "value-fp")


def _good_arrays() -> dict:
    return dict(token_map=np.array([0, 1, 2, 3, -1, 0], np.int32),
                token_weights=np.array([1, 1, 0.5, 1, 0, 0.25], np.float32),
                base_fingerprint=np.str_("base-fp"), value_fingerprint=np.str_("value-fp"),
                builder=np.str_("exact-text/3"))


def _npz(path: Path, **changes) -> Path:
    arrays = {**_good_arrays(), **changes}
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, raw in members.items():
            zf.writestr(name + ".npy", raw)
    return path


def _raw(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _good_members(**changes) -> dict[str, bytes]:
    members = {k: _raw(v) for k, v in _good_arrays().items()}
    members.update(changes)
    return members


def test_a_good_map_loads_exactly(tmp_path):
    from ivl_local.vocab import load_map

    mapping = load_map(_npz(tmp_path / "m.npz"), BASE, VALUE)
    assert mapping.token_map.dtype == np.int32 and mapping.token_weights.dtype == np.float32
    assert mapping.token_map.tolist() == [0, 1, 2, 3, -1, 0]
    assert mapping.builder == "exact-text/3"


def test_exact_wider_dtypes_are_accepted_without_change(tmp_path):
    from ivl_local.vocab import load_map

    path = _npz(tmp_path / "m.npz", token_map=np.array([0, 1, 2, 3, -1, 0], ">i8"),
                token_weights=np.array([1, 1, 0.5, 1, 0, 0.25], np.float64))
    mapping = load_map(path, BASE, VALUE)
    assert mapping.token_map.tolist() == [0, 1, 2, 3, -1, 0]
    assert mapping.token_weights.tolist() == [1, 1, 0.5, 1, 0, 0.25]


@pytest.mark.parametrize("changes, needle", [
    (dict(token_map=np.array([0, 1, 2, 2**32 + 3, -1, 0], np.int64)), "points outside the value vocabulary"),
    (dict(token_map=np.array([0, 1, 2, 3, -2, 0], np.int64)), "points outside the value vocabulary"),
    (dict(token_map=np.array([0, 1, 2, 3, -1, 0], np.float32)), "'token_map' has dtype float32, expected integers"),
    (dict(token_map=np.zeros((6, 2), np.int32)), "'token_map' has shape (6, 2), expected a 1-D array of 6 entries"),
    (dict(token_map=np.zeros(5, np.int32)), "'token_map' has shape (5,)"),
    (dict(token_weights=np.array([1, 1, 0.1, 1, 0, 0.25], np.float64)), "float32 cannot hold exactly"),
    (dict(token_weights=np.array([1, 1, np.nan, 1, 0, 0.25], np.float32)), "NaN or infinite weights"),
    (dict(token_weights=np.array([1, 1, np.inf, 1, 0, 0.25], np.float32)), "NaN or infinite weights"),
    (dict(token_weights=np.array([1, 1, 2, 1, 0, 0.25], np.float32)), "weights outside [0, 1]"),
    (dict(token_weights=np.ones(6, np.int32)), "'token_weights' has dtype int32, expected floats"),
    (dict(token_weights=None), "missing token_weights"),
    (dict(base_fingerprint=None, value_fingerprint=None), "missing base_fingerprint, value_fingerprint"),
    (dict(base_fingerprint=np.str_("other")), "is for vocabularies other -> value-fp"),
    (dict(base_fingerprint=np.array(["base-fp", "x"])), "'base_fingerprint' has shape (2,), expected a scalar"),
    (dict(builder=np.int64(3)), "'builder' has dtype int64, expected text"),
])
def test_bad_map_contents_are_one_clear_error(tmp_path, changes, needle):
    from ivl_local.vocab import load_map

    with pytest.raises(VocabMismatchError) as err:
        load_map(_npz(tmp_path / "m.npz", **changes), BASE, VALUE)
    assert needle in str(err.value) and "\n" not in str(err.value)


def _header_member(descr: str, shape: tuple, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


@pytest.mark.parametrize("members, needle", [
    (_good_members(token_map=_header_member("<i4", (2**40,))), "'token_map' has shape (1099511627776,)"),
    (_good_members(token_map=_header_member("<i4", (6,), b"\0" * 8)), "'token_map' is truncated"),
    (_good_members(base_fingerprint=_header_member("<U100000000", ())), "longer than 1024 characters"),
    (_good_members(token_map=_header_member("|O", (6,))), "expected integers"),
    (_good_members(token_map=_raw(np.zeros(6, [("a", "<i4")]))), "expected integers"),
    (_good_members(token_map=b"not an npy member"), "not a token map file"),
])
def test_headers_are_checked_before_anything_is_allocated(tmp_path, members, needle):
    import tracemalloc

    from ivl_local.vocab import load_map

    path = _zip_with(tmp_path / "m.npz", members)
    tracemalloc.start()
    try:
        with pytest.raises(VocabMismatchError) as err:
            load_map(path, BASE, VALUE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert needle in str(err.value)
    assert peak < 10 << 20


@pytest.mark.parametrize("content, needle", [
    (b"", "empty file"),
    (_raw(np.zeros(6, np.int32)), "single .npy array"),
    (b"PK\x03\x04 truncated zip", "not a token map file"),
    (b"just text\n", "not an .npz (zip) file"),
])
def test_files_that_are_not_maps_are_one_clear_error(tmp_path, content, needle):
    from ivl_local.vocab import load_map

    path = tmp_path / "m.npz"
    path.write_bytes(content)
    with pytest.raises(VocabMismatchError, match="not a token map file") as err:
        load_map(path, BASE, VALUE)
    assert needle in str(err.value)
    with pytest.raises(VocabMismatchError, match="not a token map file"):
        load_map(tmp_path, BASE, VALUE)              # a folder


def test_save_map_round_trips_and_leaves_no_temp_file(tmp_path):
    from ivl_local.vocab import TokenMapping, load_map, save_map

    a = _good_arrays()
    mapping = TokenMapping(a["token_map"], a["token_weights"], "base-fp", "value-fp", "exact-text/3", 5)
    (tmp_path / "m.npz.tmp.npz").write_bytes(b"left by an old version")
    os.utime(tmp_path / "m.npz.tmp.npz", (0, 0))
    save_map(tmp_path / "m.npz", mapping, extra={"corpus_bytes": np.int64(7)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    loaded = load_map(tmp_path / "m.npz", BASE, VALUE)
    assert loaded.n_exact == 5 and loaded.token_map.tolist() == a["token_map"].tolist()


def test_empty_map_file_in_ivl_chat_is_an_error_line_not_a_silent_exit_130(monkeypatch, tmp_path):
    """The interactive session: the map is read on the loading thread; its EOFError used to
    reach click, which took it for Ctrl-D (exit 130, nothing printed)."""
    from typer.testing import CliRunner

    from ivl_local.cli import chat as chat_mod
    from ivl_local.cli.main import app

    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + b"\0" * 60)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")

    def make_engine(base, value, alpha, **kwargs):
        from ivl_local.vocab import load_map
        load_map(kwargs["token_map"], BASE, VALUE)

    def eof_from_numpy(*a, **k):   # what np.load raised for the empty file
        raise EOFError("No data left in file")

    monkeypatch.setenv("IVL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(chat_mod, "make_engine", make_engine)
    monkeypatch.setattr(chat_mod, "read_one_shot_prompt", lambda prompt: None)   # interactive
    r = CliRunner().invoke(app, ["chat", "--base", str(base), "--value", "none", "--map", str(empty)],
                           input="hello\n")
    assert r.exit_code == 1, r.output
    assert "error: " in r.stderr and "empty file" in r.stderr and "Traceback" not in r.output

    monkeypatch.setattr(chat_mod, "make_engine", eof_from_numpy)   # any stray EOFError
    r = CliRunner().invoke(app, ["chat", "--base", str(base), "--value", "none"], input="hello\n")
    assert r.exit_code == 1 and "error: unexpected end of a file" in r.stderr


@pytest.mark.real
def test_ivl_chat_with_an_empty_map_file_real(gemma3_path, smollm2_path, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    r = subprocess.run([sys.executable, "-P", "-m", "ivl_local.cli.main", "chat", "--base", str(gemma3_path),
                        "--value", str(smollm2_path), "--map", str(empty), "-p", "Hi", "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "IVL_CACHE_DIR": str(tmp_path / "cache")})
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and "not a token map file (empty file)" in lines[0], r.stderr


# --- 4. atomic writes ------------------------------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_next_write_removes_temps_of_killed_writes_only(tmp_path):
    from ivl_local.atomic import LEGACY_STALE_SECONDS, atomic_write

    dest = tmp_path / "v.ivl.gguf"
    dead = tmp_path / f".v.ivl.gguf.{_dead_pid()}.abc123.tmp"
    live = tmp_path / f".v.ivl.gguf.{os.getppid()}.def456.tmp"     # a writer still running
    old_legacy = tmp_path / ".v.ivl.gguf.k2j4h5g6.tmp"               # no pid, an hour old
    new_legacy = tmp_path / ".v.ivl.gguf.q8w7e6r5.tmp"
    other = tmp_path / ".other.gguf.1.abc.tmp"                       # another destination's
    for p in (dead, live, old_legacy, new_legacy, other):
        p.write_bytes(b"partial")
    os.utime(old_legacy, (0, 0))
    assert LEGACY_STALE_SECONDS < 1e9
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert dest.read_bytes() == b"whole"
    assert not dead.exists() and not old_legacy.exists()
    assert live.exists() and new_legacy.exists() and other.exists()


def test_a_writer_killed_mid_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    dest = tmp_path / "out.bin"
    code = f"""
import time
from pathlib import Path
from ivl_local.atomic import atomic_write
def write(tmp):
    Path(tmp).write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(60)
atomic_write({str(dest)!r}, write)
"""
    child = subprocess.Popen([sys.executable, "-P", "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.bin.") and not dest.exists()

    from ivl_local.atomic import atomic_write

    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(b"whole"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_exception_inside_the_write_removes_the_temp_file(tmp_path):
    from ivl_local.atomic import atomic_write

    def fail(tmp):
        Path(tmp).write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(tmp_path / "a.bin", fail)
    assert list(tmp_path.iterdir()) == []


# --- 5. the chat session and the chat flags -----------------------------------------------------------

def _session(monkeypatch, lines, engine=None):
    from rich.console import Console

    from ivl_local.cli.session import ChatSession
    from ivl_local.config import SamplingConfig

    class Engine:
        has_value, value_enabled, alpha, stats = True, True, 1.0, None

        def chat_deltas(self, messages, max_tokens=256, sampling=None, stop=None):
            yield " ok"

    engine = engine or Engine()
    session = ChatSession(engine, base_path=Path("/m/base.gguf"), value_path=Path("/m/v.ivl.gguf"),
                          system="sys", sampling=SamplingConfig(seed=1), max_tokens=32,
                          console=Console(file=io.StringIO(), width=120), use_readline=False)
    session.messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    queue = list(lines)

    def typed(prompt=""):
        if not queue:
            raise EOFError
        return queue.pop(0)

    monkeypatch.setattr("builtins.input", typed)
    session.run()
    return session


def _state(session) -> tuple:
    return (session.system, [dict(m) for m in session.messages], session.sampling, session.max_tokens,
            session.engine.alpha, session.engine.value_enabled)


@pytest.mark.parametrize("arg", ["nan", "-5", "1e999", "abc", "101", "inf"])
def test_slash_alpha_uses_the_one_alpha_rule(monkeypatch, capsys, arg):
    session = _session(monkeypatch, [f"/alpha {arg}"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and session.engine.alpha == 1.0


def _saved(settings=None, messages=None, **top) -> dict:
    data = {"format": "ivl-chat/1",
            "messages": messages if messages is not None else
            [{"role": "system", "content": "new system"}, {"role": "user", "content": "new q"},
             {"role": "assistant", "content": "new a", "interrupted": True}],
            "settings": settings if settings is not None else
            {"alpha": 0.5, "value_enabled": False, "max_tokens": 7,
             "sampling": {"temperature": 0.3, "seed": 9}}}
    data.update(top)
    return data


BAD_SAVES = {
    "alpha NaN": _saved({"alpha": float("nan")}),
    "alpha negative": _saved({"alpha": -5}),
    "alpha 1e999": json.loads('{"format": "ivl-chat/1", "messages": [], "settings": {"alpha": 1e999}}'),
    "alpha text": _saved({"alpha": "abc"}),
    "alpha bool": _saved({"alpha": True}),
    "seed 2^80": _saved({"sampling": {"seed": 2**80}}),
    "seed negative": _saved({"sampling": {"seed": -1}}),
    "value_enabled text": _saved({"value_enabled": "no"}),
    "value_enabled number": _saved({"value_enabled": 0}),
    "temperature text": _saved({"sampling": {"temperature": "hot"}}),
    "top_k float": _saved({"sampling": {"top_k": 4.5}}),
    "top_p list": _saved({"sampling": {"top_p": [1]}}),
    "sampling not an object": _saved({"sampling": [0.5]}),
    "max_tokens zero": _saved({"max_tokens": 0}),
    "max_tokens text": _saved({"max_tokens": "many"}),
    "settings a list": _saved(settings=[1, 2]),
    "base not text": _saved({"base": ["x"]}),
    "messages not a list": _saved(messages={"role": "user"}),
    "message without content": _saved(messages=[{"role": "user"}]),
    "message content a number": _saved(messages=[{"role": "user", "content": 5}]),
    "system content a number": _saved(messages=[{"role": "system", "content": 5}]),
    "unknown role": _saved(messages=[{"role": "robot", "content": "x"}]),
    "second system message": _saved(messages=[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]),
    "interrupted text": _saved(messages=[{"role": "assistant", "content": "x", "interrupted": "yes"}]),
    "other format": _saved(format="something/2"),
    "top level a list": [1, 2],
}


@pytest.mark.parametrize("name", list(BAD_SAVES) + ["not UTF-8", "deep JSON", "lone surrogate", "not JSON"])
def test_load_refuses_a_bad_file_whole_and_changes_nothing(monkeypatch, capsys, tmp_path, name):
    path = tmp_path / "conv.json"
    if name == "not UTF-8":
        path.write_bytes(json.dumps(_saved()).encode().replace(b"new q", b"caf\xe9"))
    elif name == "deep JSON":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif name == "lone surrogate":
        path.write_text(json.dumps(_saved()).replace("new q", "\\ud800"))
    elif name == "not JSON":
        path.write_text("{not json")
    else:
        path.write_text(json.dumps(BAD_SAVES[name]))
    before = _session(monkeypatch, [])
    session = _session(monkeypatch, [f"/load {path}"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
    assert _state(session) == _state(before)


def test_load_applies_a_good_file_whole(monkeypatch, capsys, tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(_saved()))
    session = _session(monkeypatch, [f"/load {path}"])
    assert capsys.readouterr().err == ""
    assert session.system == "new system" and session.max_tokens == 7
    assert session.messages == [{"role": "user", "content": "new q"},
                                {"role": "assistant", "content": "new a", "interrupted": True}]
    assert session.sampling.temperature == 0.3 and session.sampling.seed == 9
    assert session.engine.alpha == 0.5 and session.engine.value_enabled is False


@pytest.mark.parametrize("flags, needle", [
    (["--alpha", "nan"], "--alpha must be"),
    (["--alpha", "-5"], "--alpha must be"),
    (["--alpha", "1e999"], "--alpha must be"),
    (["--alpha", "101"], "--alpha must be"),
    (["--seed", str(2**80)], "--seed must be an integer in [0, 2^64 - 1]"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2^64 - 1]"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
])
def test_chat_flags_use_the_same_validators(monkeypatch, tmp_path, flags, needle):
    from typer.testing import CliRunner

    from ivl_local.cli import chat as chat_mod
    from ivl_local.cli.main import app

    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setattr(chat_mod, "make_engine", lambda *a, **k: pytest.fail("engine made"))
    r = CliRunner().invoke(app, ["chat", "--base", str(base), "--value", "none", "-p", "hi", *flags])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.stderr
