"""Ctrl-C at the chat prompt, read as a key instead of a signal.

Python's readline loop waits in select() and looks for signals only when select() is
interrupted. A SIGINT that lands in the short gap between drawing the prompt and entering
select() (a loaded machine makes the gap long) only sets Python's flag: select() then
waits for the next key, the typed line is lost with the interrupt, and the prompt looks
frozen. So while the prompt waits, the terminal's interrupt character is switched off and
readline gets Ctrl-C as an ordinary key, bound to "go to the end of the line and accept it
with a ^C mark". The mark is a literal \\x03, which a user cannot type without Ctrl-V, and
the terminal shows "you> half typed^C" the way a shell does. Outside the prompt (while an
answer streams) Ctrl-C is a signal again.

    bound = bind_ctrl_c(readline)          # once; False for libedit or no terminal
    with ctrl_c_as_key(sys.stdin, bound):
        line = input(prompt)
    if line.endswith(CTRL_C_MARK): ...     # Ctrl-C: drop the line
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import IO, Iterator

try:
    import termios
except ImportError:  # Windows
    termios = None

CTRL_C_MARK = "\x03"
# end-of-line, quoted-insert of ^C, accept-line: the line comes back with the mark at its end
_BINDING = r'"\C-c": "\C-e\C-v\C-c\C-m"'


def bind_ctrl_c(readline) -> bool:
    """Bind Ctrl-C in GNU readline's emacs keymap; False where that binding syntax is
    not understood (libedit, as in macOS's system Python) and Ctrl-C stays a signal."""
    if "libedit" in (getattr(readline, "__doc__", None) or ""):
        return False
    readline.parse_and_bind(_BINDING)
    return True


@contextmanager
def ctrl_c_as_key(stream: IO, enabled: bool = True) -> Iterator[None]:
    """Switch the terminal's interrupt character off for the duration, and restore it.

    Does nothing where `stream` is not a terminal or termios is missing (Windows)."""
    saved = _interrupt_off(stream) if enabled else None
    try:
        yield
    finally:
        if saved is not None:
            fd, attrs = saved
            try:
                termios.tcsetattr(fd, termios.TCSANOW, attrs)
            except (termios.error, OSError):
                pass


def _interrupt_off(stream: IO) -> tuple[int, list] | None:
    """Turn VINTR off on `stream`'s terminal; returns (fd, previous attributes) or None."""
    if termios is None:
        return None
    try:
        fd = stream.fileno()
        attrs = termios.tcgetattr(fd)
        changed = [*attrs[:6], list(attrs[6])]
        changed[6][termios.VINTR] = bytes([os.fpathconf(fd, "PC_VDISABLE") & 0xFF])
        termios.tcsetattr(fd, termios.TCSANOW, changed)
    except (termios.error, OSError, ValueError, AttributeError):  # not a terminal / closed
        return None
    return fd, attrs


@contextmanager
def ctrl_c_cancels(engine) -> Iterator[None]:
    """While an answer streams, a Ctrl-C also cancels the engine's generation, then raises
    KeyboardInterrupt as Python's own handler does. The cancel is what stops the answer when the
    KeyboardInterrupt is raised where Python swallows it (it runs signal handlers at the next
    bytecode, which can be a __del__ or a ctypes callback: "Exception ignored in ..."); the
    engine then stops at its next token with GenerationCancelled. A no-op off the main thread
    and where an application installed its own SIGINT handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def on_sigint(signum, frame):
        try:
            engine.cancel()
        except Exception:  # noqa: BLE001 - a closed or foreign engine: the KeyboardInterrupt alone
            pass
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def forget_last_history_item(mark: str) -> None:
    """Remove the newest readline history entry if it ends with `mark` (input() adds every
    non-empty line, the Ctrl-C'd ones included)."""
    readline = sys.modules.get("readline")
    if readline is None:
        return
    n = readline.get_current_history_length()
    if n and (readline.get_history_item(n) or "").endswith(mark):
        readline.remove_history_item(n - 1)
