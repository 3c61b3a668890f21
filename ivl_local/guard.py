"""The concurrency contract of an object that owns llama.cpp contexts (the Engine).

llama.cpp aborts (GGML_ASSERT) or crashes when two threads decode in one context, or when a
context is freed under a running decode. `Guard` turns both into typed errors:

    guard = Guard("this Engine")
    ticket = guard.claim()             # one generation at a time: EngineBusyError if another
    try:                               # thread's generation is in progress
        with guard.work(ticket):       # llama.cpp runs only inside work(); raises
            ...decode a token...       # EngineClosedError / GenerationSuperseded at entry
        yield text                     # never inside work(): close() may run meanwhile
    finally:
        guard.release(ticket)

    guard.cancel()                     # any thread: the generation in progress stops
    guard.close(free)                  # any thread, any time, idempotent

Rules:
- A generation is *in progress* from its first step until it finishes or its generator is
  closed. Another thread that starts one meanwhile gets EngineBusyError (it never waits: a
  wait could deadlock on a generator its own thread left open). The same thread starting a new
  generation supersedes its unfinished one, whose next step raises GenerationSuperseded; a
  generation whose thread has ended is superseded too.
- Only `close()` may be called from inside a step (a signal handler or callback running on the
  stepping thread); anything else raises EngineBusyError there.
- `cancel()` makes the generation in progress raise GenerationCancelled at its next
  `work()`; the owner stays open, and a later generation is not affected (a cancel names the
  ticket it stops). With no generation in progress it does nothing and returns False.
- `close()` marks the owner closed at once (every later `work()` raises EngineClosedError),
  waits for the `work()` block running on another thread to end — at most one token step or
  one prefill chunk — and then runs `free` exactly once. Called from inside a `work()` block
  on the same thread (a signal handler, a callback), it returns at once and `free` runs as
  that block ends: nothing is freed under a running decode.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import EngineBusyError, EngineClosedError, GenerationCancelled, GenerationSuperseded


class Guard:
    def __init__(self, name: str = "this Engine"):
        self.name = name
        # RLocks: a signal handler runs on the thread it interrupts, possibly inside a block
        # that holds them; it must not deadlock there.
        self._state = threading.RLock()   # the fields below; held for microseconds
        self._work = threading.RLock()    # held while llama.cpp runs on the owner's contexts
        self._worker: int | None = None   # ident of the thread inside work()
        self._depth = 0                   # nesting of work() on that thread
        self._closed = False
        self._free: Callable[[], None] | None = None  # pending until no work() runs
        self._generation = 0              # ticket of the newest generation
        self._owner: threading.Thread | None = None   # thread of the generation in progress
        self._cancelled = 0               # ticket of the generation cancel() stopped

    @property
    def closed(self) -> bool:
        return self._closed

    def check(self, ticket: int | None = None) -> None:
        """Raise EngineClosedError when closed, GenerationSuperseded when `ticket` is stale."""
        if self._closed:
            raise EngineClosedError(f"{self.name} is closed")
        if ticket is not None and ticket == self._cancelled:
            raise GenerationCancelled("the generation was cancelled")
        if ticket is not None and ticket != self._generation:
            raise GenerationSuperseded("a newer generation started on this thread; this one was "
                                       "stopped (finish or close a generator before starting another)")

    def check_available(self) -> None:
        """check(), plus EngineBusyError while another live thread's generation is in
        progress, or when called from inside a running step on this thread."""
        self.check()
        self._check_not_nested()
        self.check_not_owned_elsewhere()

    def check_not_owned_elsewhere(self) -> None:
        """EngineBusyError while another live thread's generation is in progress."""
        owner = self._owner
        if owner is not None and owner is not threading.current_thread() and owner.is_alive():
            raise EngineBusyError(
                f"{self.name} is generating on thread {owner.name!r}: one generation at a time "
                f"per Engine; wait for it to finish (or close its generator), or use another Engine")

    def claim(self) -> int:
        """Start a generation on this thread; returns its ticket."""
        with self._state:
            self.check_available()
            self._generation += 1
            self._owner = threading.current_thread()
            return self._generation

    def _check_not_nested(self) -> None:
        if self._depth and self._worker == threading.get_ident():
            raise EngineBusyError(f"{self.name} was called from inside one of its own steps (a signal "
                                  f"handler or callback): only close() may be called there")

    def release(self, ticket: int) -> None:
        """End the generation `ticket` (no-op if a newer one took over)."""
        with self._state:
            if ticket == self._generation:
                self._owner = None

    @contextmanager
    def work(self, ticket: int | None = None) -> Iterator[None]:
        """Hold the owner's llama.cpp state: close() waits for this block to end."""
        self._check_not_nested()   # a re-entered step would race the one it interrupted
        try:
            with self._work:
                self._depth += 1
                previous, self._worker = self._worker, threading.get_ident()
                try:
                    self.check(ticket)
                    yield
                finally:
                    self._depth -= 1
                    self._worker = previous
        finally:   # also when the block raised: a close() deferred inside it frees now
            if self._free is not None:
                self._run_free()

    def cancel(self) -> bool:
        """Stop the generation in progress at its next work() block; False if none is."""
        with self._state:
            if self._owner is None:
                return False
            self._cancelled = self._generation
            return True

    def close(self, free: Callable[[], None]) -> None:
        """Refuse all further work; run `free` once no work() block is running."""
        with self._state:
            already = self._closed
            self._closed = True
            self._generation += 1          # an unfinished generation stops at its next step
            self._owner = None
            if not already:
                self._free = free
        if self._worker == threading.get_ident():
            return                         # inside work() on this thread: freed as it ends
        self._run_free()

    def _run_free(self) -> None:
        with self._work:                   # waits for work() on other threads
            if self._depth:
                return                     # a nested block on this thread: its end frees
            with self._state:
                free, self._free = self._free, None
            if free is not None:
                free()
