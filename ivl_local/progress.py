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
                  disable=not stderr_isatty(), transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


def stderr_isatty() -> bool:
    """False for a stderr that is not a terminal, or none at all (pythonw)."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Heartbeat:
    """A plain progress line at most every `every` seconds, for a stderr that is not a terminal
    (a study run under nohup or in CI, where a Rich bar draws nothing for an hour):
    `evaluating: 40/160 (25 %), 12 min elapsed, about 36 min left`, and one line at the end
    (`close`). The time left comes from the rate after the first update, so set-up before it
    (training a value net before the first answer) and steps done before (a resumed run,
    `done`) do not skew it. A stderr that fails (closed, a broken pipe) turns it off: progress
    never stops the work."""

    def __init__(self, label: str, total: int, every: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], object] | None = None, done: int = 0):
        self.label, self.total, self.every, self.clock = label, total, every, clock
        self._write = write or _stderr_write
        self.done = done
        self.t_created = self.t_last = clock()
        self.rate_from: tuple[float, int] | None = None    # (time, done) at the first update
        self.finished = False

    def advance(self, n: int = 1, extra: str = "") -> None:
        self.update(self.done + n, extra)

    def update(self, done: int, extra: str = "") -> None:
        now = self.clock()
        self.done = done
        if self.rate_from is None:   # what came before the first step (set-up) is not its rate
            self.rate_from = (now, done)
        if self.total <= 0 or self.finished:   # nothing to measure against; or said already
            return
        final = done >= self.total
        if not final and now - self.t_last < self.every:
            return
        self.t_last, self.finished = now, final
        line = f"{self.label}: {done}/{self.total} ({100 * done // self.total} %), {_minutes(now - self.t_created)} elapsed"
        t0, done0 = self.rate_from
        if not final and done > done0 and now > t0:
            line += f", about {_minutes((now - t0) * (self.total - done) / (done - done0))} left"
        self.write(line + (f", {extra}" if extra else ""))

    def close(self) -> None:
        """The closing line, unless the last update said 100 %: work that ended early (skipped
        groups, a time limit, Ctrl-C) says where it ended."""
        if self.total > 0 and not self.finished:
            self.finished = True
            self.write(f"{self.label}: ended at {self.done}/{self.total}, "
                       f"{_minutes(self.clock() - self.t_created)} elapsed")

    def write(self, line: str) -> None:
        try:
            self._write(line + "\n")
        except (OSError, ValueError):   # a closed stderr, or a reader gone (broken pipe)
            self._write = lambda text: None


def _stderr_write(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def _minutes(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


@contextmanager
def step_progress(label: str, total: int | None, every: float = 60.0,
                  clock: Callable[[], float] = time.monotonic) -> Iterator[Callable[..., None]]:
    """Yield `advance(n=1, **fields)` for counted steps: a Rich bar on a terminal; otherwise,
    when there is a total, a plain line at most every `every` seconds and one at the end."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.console import Console

    tty = stderr_isatty()
    beat = None if tty or not total else Heartbeat(label, total, every, clock)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                  disable=not tty) as progress:
        task = progress.add_task(label, total=total)

        def advance(n: int = 1, **fields) -> None:
            progress.update(task, advance=n, **fields)
            if beat is not None:
                beat.advance(n)

        try:
            yield advance
        finally:
            if beat is not None:
                beat.close()
