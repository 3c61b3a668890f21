"""Ctrl-C at the prompt, read as a key (ivl_local.cli.prompt_keys), in a real pseudo-terminal.

The failure this guards against: with Ctrl-C as a signal, one that arrives between the
prompt being drawn and readline's select() is swallowed and the prompt hangs (seen in CI
under load; 7 of 200 tries on a loaded machine). Here the keys are sent the instant the
prompt shows, many times over, and every try must come back as a dropped line.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

pexpect = pytest.importorskip("pexpect")

CHILD = textwrap.dedent("""
    import readline, sys, termios
    from ivl_local.cli.prompt_keys import CTRL_C_MARK, bind_ctrl_c, ctrl_c_as_key, forget_last_history_item
    bound = bind_ctrl_c(readline)
    vintr = termios.tcgetattr(0)[6][termios.VINTR]
    print("bound", bound, flush=True)
    while True:
        try:
            with ctrl_c_as_key(sys.stdin, bound):
                line = input("you> ")
        except EOFError:
            break
        restored = termios.tcgetattr(0)[6][termios.VINTR] == vintr
        if line.endswith(CTRL_C_MARK):
            forget_last_history_item(CTRL_C_MARK)
            print(f"dropped {line[:-1]!r} restored={restored}", flush=True)
        else:
            print(f"line {line!r} restored={restored}", flush=True)
    n = readline.get_current_history_length()
    print("history", [readline.get_history_item(i + 1) for i in range(n)], flush=True)
""")


def test_ctrl_c_at_the_prompt_is_never_lost():
    child = pexpect.spawn(sys.executable, ["-c", CHILD], encoding="utf-8", timeout=10,
                          env={"TERM": "xterm", "PATH": "/usr/bin:/bin", "INPUTRC": "/dev/null",   # no user key bindings
                               "PYTHONPATH": ":".join(sys.path)})
    child.delaybeforesend = 0
    child.expect("bound (True|False)")
    assert child.match.group(1) == "True"
    for i in range(40):
        child.expect("you> ")
        child.send(f"half {i}")
        child.sendintr()
        child.expect(r"dropped '([^']*)' restored=(\w+)")
        assert child.match.group(1) == f"half {i}"
        assert child.match.group(2) == "True"    # the terminal's Ctrl-C is back after the prompt
    child.expect("you> ")
    child.sendline("kept")
    child.expect(r"line 'kept' restored=True")
    child.expect("you> ")
    child.sendeof()
    child.expect(r"history \[(.*)\]")
    assert child.match.group(1) == "'kept'"      # dropped lines stay out of the history
    child.expect(pexpect.EOF)
