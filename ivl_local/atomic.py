"""Atomic writes: a file appears whole at its name, or not at all.

    with atomic_temp(path) as tmp:     # .NAME.<pid>.<random>.tmp in path's folder
        write_everything_to(tmp)
    # on success tmp was moved over path; on any exception (Ctrl-C too) it is removed

Every writer of model files, value files, token maps and checkpoints goes through here, so
they share two things: the new file gets the mode any other new file would (mkstemp makes
0600 files), and a temporary file left by an earlier write that was killed (SIGKILL, a power
cut: nothing could clean up) is removed by the next write to the same destination. The
writer's process id is part of the temporary name, so a temp file of a writer that is still
running is left alone.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Temp files of earlier versions carry no process id; they count as stale after this long
# (no write of ours takes an hour).
LEGACY_STALE_SECONDS = 3600


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere it can only be read
    by setting it, and the umask is process-wide: two threads doing that at once could leave
    it at 0, so the set-and-restore is done under a lock."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def move_into_place(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """chmod `tmp` to the usual new-file mode, then rename it over `path` (atomic)."""
    os.chmod(tmp, 0o666 & ~current_umask())
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True   # someone else's process (or an impossible pid): leave its file alone
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files that interrupted writes of `path` left in its folder; returns them."""
    path = Path(path)
    ours = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^/]*\.tmp")
    legacy = re.compile(rf"\.{re.escape(path.name)}\.[^./]+\.tmp|{re.escape(path.name)}\.tmp\.npz")
    removed = []
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for candidate in candidates:
        name = candidate.name
        if (m := ours.fullmatch(name)) is not None:
            stale = int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1)))
        elif legacy.fullmatch(name):
            try:
                stale = time.time() - candidate.stat().st_mtime > LEGACY_STALE_SECONDS
            except OSError:
                continue
        else:
            continue
        if stale:
            try:
                candidate.unlink()
                removed.append(candidate)
            except OSError:
                pass   # gone already, or not ours to remove
    return removed


class TempFile:
    """The temporary file of one atomic write, for writers that cannot use `atomic_temp`'s
    block: `commit()` moves it over the destination, `discard()` removes it."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.dest = Path(path)
        remove_stale_temps(self.dest)
        fd, name = tempfile.mkstemp(dir=self.dest.parent, prefix=f".{self.dest.name}.{os.getpid()}.",
                                    suffix=".tmp")
        os.close(fd)
        self.path = Path(name)

    def commit(self) -> None:
        move_into_place(self.path, self.dest)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


@contextmanager
def atomic_temp(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file next to `path` that becomes `path` when the block ends without error."""
    temp = TempFile(path)
    try:
        yield temp.path
        temp.commit()
    except BaseException:
        temp.discard()
        raise


def atomic_write(path: str | os.PathLike, write) -> None:
    """`write(tmp_path)` then move it over `path`; see `atomic_temp`."""
    with atomic_temp(path) as tmp:
        write(str(tmp))
