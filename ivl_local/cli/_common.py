"""What every command shares: one-line errors, exit codes, consoles.

    with user_errors(debug):          # IVLError -> "error: ..." on stderr, exit code
        ...

Click's own usage errors (unknown option, "abc" for a float) are turned into the same
one-line form by `OneLineErrorsGroup` / `OneLineErrorsCommand`, which the apps in `main.py`
use as their click classes.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import typer
from typer.core import TyperCommand, TyperGroup

try:  # Typer >= 0.2x carries its own copy of click
    from typer._click import exceptions as _click_exceptions
except ImportError:  # older Typer: the click package
    from click import exceptions as _click_exceptions

_ABORTS = tuple({typer.Abort, getattr(_click_exceptions, "Abort", typer.Abort)})

from ..errors import IVLError

EXIT_INTERRUPTED = 130  # what shells report for SIGINT (128 + 2)


def print_error(message: str, hint: str | None = None) -> None:
    """The one line a user sees for a mistake (plus an optional hint on the same line)."""
    line = f"error: {message}"
    if hint:
        line += f" ({hint})"
    print(line, file=sys.stderr, flush=True)


def print_note(message: str) -> None:
    """Informational line on stderr (never mixed into an answer on stdout)."""
    print(message, file=sys.stderr, flush=True)


def describe_os_error(e: OSError) -> str:
    """'No space left on device: out.gguf' rather than '[Errno 28] ...'."""
    text = e.strerror or str(e) or type(e).__name__
    return f"{text}: {e.filename}" if e.filename else text


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Translate library errors into one line and an exit code; tracebacks only with --debug.

    Also one line: an OSError (a full disk, a folder that cannot be written) and an EOFError
    that reaches this far (a truncated file read by a library: click would otherwise take it
    for Ctrl-D and exit 130 without a word; the session handles the real Ctrl-D itself)."""
    try:
        yield
    except IVLError as e:
        if debug:
            traceback.print_exc()
        print_error(str(e))
        raise typer.Exit(e.exit_code) from None
    except OSError as e:
        if debug:
            traceback.print_exc()
        print_error(describe_os_error(e))
        raise typer.Exit(1) from None
    except EOFError as e:
        if debug:
            traceback.print_exc()
        print_error(f"unexpected end of a file{': ' + str(e) if str(e) else ''}")
        raise typer.Exit(1) from None


@contextmanager
def one_line_warnings() -> Iterator[None]:
    """Library warnings meant for users (UserWarning: a raw value model, ...) as one
    `warning: ...` line on stderr each; other warnings (deprecations) are not for them."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("default", UserWarning)
        warnings.showwarning = show
        yield


def _run_one_line(parent_main, args: Sequence[str] | None,
                  prog_name: str | None, complete_var: str | None, standalone_mode: bool,
                  extra: dict[str, Any]) -> Any:
    try:
        rv = parent_main(args=args, prog_name=prog_name, complete_var=complete_var,
                         standalone_mode=False, **extra)
        code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except _click_exceptions.ClickException as e:  # usage errors and bad option values
        if type(e).__name__ == "NoArgsIsHelpError":  # `ivl` alone: its help, as click does
            if e.format_message().strip():
                e.show()
            code = e.exit_code
            return code if not standalone_mode else sys.exit(code)
        hint = None
        ctx = getattr(e, "ctx", None)
        if isinstance(e, _click_exceptions.UsageError) and ctx is not None:
            hint = f"see '{ctx.command_path} --help'"
        print_error(e.format_message(), hint)
        code = e.exit_code
    except _ABORTS:  # Ctrl-D / Ctrl-C in a click prompt
        code = EXIT_INTERRUPTED
    if not standalone_mode:
        return code
    sys.exit(code)


class OneLineErrorsGroup(TyperGroup):
    """A Typer group whose usage errors print as one `error: ...` line."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        return _run_one_line(super().main, args, prog_name, complete_var, standalone_mode, extra)


class OneLineErrorsCommand(TyperCommand):
    """A single-command Typer app (`ivl-chat`, ...) with the same one-line usage errors."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        return _run_one_line(super().main, args, prog_name, complete_var, standalone_mode, extra)
