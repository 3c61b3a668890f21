"""`ivl align`: build the paper's corpus-aligned token map (a `.npz` for `--map`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError, ModelFileError
from ._common import one_line_warnings, user_errors


def align(
    base: Annotated[str, typer.Argument(help="Base model: a .gguf path or a known name.")],
    value: Annotated[str, typer.Argument(help="Value model: a .ivl.gguf / .gguf path or a known name.")],
    corpus: Annotated[Path | None, typer.Option(help="UTF-8 text to align (default: the shipped corpus).")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="Where to write the map (.npz).")] = Path("map.npz"),
    max_bytes: Annotated[int | None, typer.Option(help="Use only the corpus's first N bytes.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks for errors.")] = False,
) -> None:
    """Align a corpus under both tokenizers (DTW, edit-distance cost) and write a token map.

    Use it with `ivl chat --map FILE.npz` or `Engine(..., token_map=FILE.npz)`.
    """
    with user_errors(debug), one_line_warnings():
        from ..datasets import data_path

        corpus = corpus or data_path("corpus", "corpus.txt")
        if not corpus.is_file():
            raise ModelFileError(f"no such corpus file: {corpus}")
        if not out.parent.is_dir():
            raise ConfigError(f"output folder does not exist: {out.parent}")
        if max_bytes is not None and max_bytes <= 0:
            raise ConfigError("--max-bytes must be > 0")
        from ..align import build_aligned_map

        result = build_aligned_map(base, value, corpus, out, progress=sys.stderr.isatty(),
                                   max_bytes=max_bytes)
    print(result)
