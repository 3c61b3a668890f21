"""Where the shipped demonstrations and corpora live.

In an installed wheel they are package data (`ivl_local/data/`, installed by CMake); in a
source checkout they are the repository's `data/` folder. Every module asks here, so both
layouts work and nothing hard-codes a path relative to a source file.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).resolve().parent / "data"
_CHECKOUT = Path(__file__).resolve().parents[1] / "data"


def data_dir() -> Path:
    """The folder holding the shipped JSONL demonstrations (and `corpus/`)."""
    if _PACKAGED.is_dir():
        return _PACKAGED
    return _CHECKOUT


def data_path(*parts: str) -> Path:
    """A shipped data file, e.g. data_path("arith_test.jsonl") or data_path("corpus", "corpus.txt")."""
    return data_dir().joinpath(*parts)
