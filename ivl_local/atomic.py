"""Finishing an atomic write: a temporary file from tempfile.mkstemp becomes the real file.

mkstemp creates files readable only by their owner (0600); a model or checkpoint file should
get the mode any other new file would (0666 minus the umask) before it is moved into place.
"""

from __future__ import annotations

import os


def move_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """chmod `tmp` to the usual new-file mode, then rename it over `path` (atomic)."""
    mask = os.umask(0)   # the umask can only be read by setting it
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
