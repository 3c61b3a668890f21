"""Load the models on a thread while the user types the first prompt.

Loading two GGUF files takes seconds; typing a question takes longer. The interactive
session shows its prompt at once and waits for the engine only when the first line is
entered (with a spinner if it is still loading).

    loader = BackgroundLoad(lambda: make_engine(...))
    ...
    engine = loader.result(console)   # waits; re-raises a loading error in this thread
    loader.close()                    # joins the thread, closes the engine
"""

from __future__ import annotations

import sys
import threading
import warnings
from typing import Any, Callable


class BackgroundLoad:
    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._engine: Any = None
        self._error: BaseException | None = None
        self._warnings: list[str] = []
        self._thread = threading.Thread(target=self._run, name="ivl-load", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Warnings (a raw value model, ...) are kept and shown when the engine is handed
        # over, not printed into the line the user is typing. The main thread sits in
        # input() meanwhile, so swapping the process-wide warning state here is safe.
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("ignore")
                warnings.simplefilter("default", UserWarning)
                self._engine = self._factory()
            self._warnings = [str(w.message) for w in caught]
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, console=None):
        """The engine, waiting for it if needed; raises what loading raised."""
        if not self.done:
            if console is not None and console.is_terminal:
                with console.status("loading models...", spinner="dots"):
                    self._thread.join()
            else:
                self._thread.join()
        for message in self._warnings:
            print(f"warning: {message}", file=sys.stderr, flush=True)
        self._warnings = []
        if self._error is not None:
            raise self._error
        return self._engine

    def close(self) -> None:
        self._thread.join()  # never leave llama.cpp loading while the interpreter exits
        if self._engine is not None:
            self._engine.close()
            self._engine = None
