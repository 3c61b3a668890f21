"""Small Rich progress helpers shared by long-running steps (assembly, conversion, maps)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def byte_progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n_bytes)`; draws a bar on stderr only when it is a terminal."""
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    from rich.console import Console

    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                  disable=not sys.stderr.isatty(), transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


class Heartbeat:
    """A plain progress line at most every `every` seconds, for a stderr that is not a terminal
    (a study run under nohup or in CI, where a Rich bar draws nothing for an hour):
    `evaluating: 40/160 (25 %), 12 min elapsed, about 36 min left`. `start` is work already
    done when it began (a resumed run), left out of the rate."""

    def __init__(self, label: str, total: int, every: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], object] | None = None, start: int = 0):
        self.label, self.total, self.every, self.clock = label, total, every, clock
        self.write = write or (lambda text: (sys.stderr.write(text), sys.stderr.flush()))
        self.done = self.first = start
        self.start = self.last = clock()
        self.finished = False

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.update(self.done + n, extra)

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        if self.total <= 0:   # nothing to measure against
            return
        now = self.clock()
        final = done >= self.total
        if self.finished or (not final and now - self.last < self.every):
            return
        self.last, self.finished = now, final    # the final line once
        elapsed = now - self.start
        line = f"{self.label}: {done}/{self.total} ({100 * done // self.total} %), {_minutes(elapsed)} elapsed"
        if self.first < done < self.total:
            line += f", about {_minutes(elapsed * (self.total - done) / (done - self.first))} left"
        self.write(line + (f", {extra}" if extra else "") + "\n")


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 60 else f"{seconds / 60:.0f} min"


@contextmanager
def step_progress(label: str, total: int | None, every: float = 60.0,
                  clock: Callable[[], float] | None = None) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)` for counted steps: a Rich bar on a terminal; otherwise,
    when there is a total, a plain line at most every `every` seconds and one at the end."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.console import Console

    tty = sys.stderr.isatty()
    beat = None if tty or not total else Heartbeat(label, total, every, clock or time.monotonic)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  disable=not tty) as progress:
        task = progress.add_task(label, total=total)

        def advance(n: int = 1, **fields) -> None:
            progress.update(task, advance=n, **fields)
            if beat is not None:
                beat.advance(n)

        yield advance
