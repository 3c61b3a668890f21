"""The apps behind the console scripts (see pyproject's [project.scripts]).

    ivl chat | serve | train | convert | inspect | align | compat | models     # `app`
    ivl-chat / ivl-train / ivl-convert                # the same commands, standalone

    python -m ivl_local.cli.main chat -p "Hello"      # without installed scripts
"""

from __future__ import annotations

import typer

from ._common import OneLineErrorsCommand, OneLineErrorsGroup
from .align_cmd import align
from .chat import chat
from .compat_cmd import compat
from .models_cmd import models_app
from .produce import convert, inspect, train
from .serve import serve

_APP_SETTINGS = dict(
    pretty_exceptions_enable=False,        # bugs get a plain traceback; user errors one line
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)

app = typer.Typer(
    cls=OneLineErrorsGroup, no_args_is_help=True,
    help="ivl-local: steer a local model with a small value network (inverse value learning).",
    **_APP_SETTINGS)
app.command("chat")(chat)
app.command("serve")(serve)
app.command("train")(train)
app.command("convert")(convert)
app.command("inspect")(inspect)
app.command("align")(align)
app.command("compat")(compat)
app.add_typer(models_app, name="models")


def _standalone(command, name: str) -> typer.Typer:
    single = typer.Typer(**_APP_SETTINGS)
    single.command(name, cls=OneLineErrorsCommand)(command)
    return single


chat_app = _standalone(chat, "ivl-chat")
train_app = _standalone(train, "ivl-train")
convert_app = _standalone(convert, "ivl-convert")


def chat_entry() -> None:
    chat_app(prog_name="ivl-chat")


def train_entry() -> None:
    train_app(prog_name="ivl-train")


def convert_entry() -> None:
    convert_app(prog_name="ivl-convert")


if __name__ == "__main__":
    app(prog_name="ivl")
