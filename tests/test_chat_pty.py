"""ivl-chat in a real pseudo-terminal, on the real small models (pexpect).

One session, typed like a person would: a prompt, a streamed answer, /alpha, /compare,
Ctrl-C in the middle of an answer (the session survives), /save, /quit. The assertions are
on what the terminal shows. SmolLM2-135M serves as both base and value network (same
vocabulary, so no token map to build) to keep the session well under a minute.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

pytestmark = pytest.mark.real

PROMPT = re.compile(r"you>.{0,20} ", re.S)   # the prompt, possibly wrapped in colour codes
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02\r]")


def screen(text: str) -> str:
    """What a reader sees: colour codes and readline markers removed."""
    return ANSI.sub("", text)


@pytest.fixture
def session(smollm2_path, tmp_path):
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40",
               IVL_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(
        sys.executable,
        ["-m", "ivl_local.cli.main", "chat", "--base", str(smollm2_path), "--value", str(smollm2_path),
         "--temperature", "0", "--max-tokens", "256", "--ctx", "1024", "--threads", "1"],
        env=env, cwd=str(tmp_path), dimensions=(40, 120), encoding="utf-8", timeout=60,
        # a terminal's default Ctrl-C: a script that runs the tests in the background (`cmd &`)
        # hands its children SIGINT ignored, and an ignored signal survives exec
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    yield child
    if child.isalive():
        child.terminate(force=True)


def answer_to(child, text: str) -> str:
    child.sendline(text)
    child.expect(PROMPT)
    return screen(child.before)


def test_interactive_session(session, tmp_path):
    child = session
    child.expect(PROMPT)
    banner = screen(child.before)
    assert "ivl-chat" in banner and "/help" in banner

    # A streamed answer: text arrives, then the prompt returns.
    shown = answer_to(child, "What is the capital of France?")
    answer = shown.split("What is the capital of France?", 1)[-1].strip()
    assert len(answer) > 3, shown
    assert "error" not in shown.lower()

    # Ctrl-C at the prompt drops the half-typed line; the next command runs alone.
    child.send("half typed")
    child.sendintr()
    child.expect(PROMPT)
    assert "half typed^C" in screen(child.before)   # shown like a shell shows it, then dropped
    assert "alpha = 0" in answer_to(child, "/alpha 0")

    shown = answer_to(child, "/compare")
    assert "with value (alpha 0)" in shown and "base alone" in shown

    # Ctrl-C during an answer: stops it, keeps the session. (--max-tokens 256 keeps this
    # answer going for seconds, so the Ctrl-C lands in it even on a loaded machine.)
    child.sendline("Count from 1 to 200, separated by commas.")
    child.expect(r"commas\.\r\n")      # the echo of the typed line...
    # ...then streamed numbers, so the answer loop surely runs (one CI run lost a Ctrl-C sent
    # at the first character; not reproduced in 5 runs since, cause not found)
    child.expect(r"\d+, \d+")
    child.sendintr()
    child.expect("interrupted")
    child.expect(PROMPT)
    shown = answer_to(child, "Say hello.")
    assert len(shown.split("Say hello.", 1)[-1].strip()) > 0

    save = tmp_path / "conv.json"
    assert "saved" in answer_to(child, f"/save {save}")
    data = json.loads(save.read_text())
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant"] * 3
    assert data["messages"][3].get("interrupted") is True
    assert data["settings"]["alpha"] == 0

    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (tmp_path / "cache" / "chat_history").read_text()
    assert "What is the capital of France?" in history and "half typed" not in history
