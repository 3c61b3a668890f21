"""Loaded llama.cpp models shared between Engines: one model per file, freed by its last user.

    models = ModelRegistry()
    a = Engine("smollm2-135m", models=models)     # loads the weights
    b = Engine("smollm2-135m", models=models)     # borrows them: one load, two contexts
    a.close()                                     # b keeps working
    b.close()                                     # the last user: the model is freed

An Engine given no registry uses a private one (its models are freed when it closes). The
server (`ivl serve`) gives every generation slot the same registry, so N slots cost N sets of
contexts (KV caches) but one copy of each model's weights.

Thread-safe: loading and freeing hold one lock (loading is rare, so one lock for all files
keeps two threads from loading the same file twice). A model is never freed while a user
holds it; users free their contexts on it before they release it.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .backend import Model


class ModelRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[Path, Model] = {}
        self._users: dict[Path, int] = {}
        self.loads = 0        # llama.cpp model loads so far (tests, stats)

    @staticmethod
    def key(path) -> Path:
        return Path(path).resolve()   # one model per file, however its path is spelled

    def acquire(self, path, *, verbose: bool = False) -> Model:
        """The loaded model of `path` (loaded now if no one holds it); release() it when done."""
        key = self.key(path)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = Model(path, verbose=verbose)
                self._models[key] = model
                self.loads += 1
            self._users[key] = self._users.get(key, 0) + 1
            return model

    def release(self, model: Model) -> None:
        """One user less; the last one frees the model. Releasing a model this registry does
        not hold (or no longer holds) is an error: it would free weights someone still uses."""
        key = self.key(model.path)
        with self._lock:
            if self._models.get(key) is not model:
                raise ValueError(f"{key.name} is not held in this registry")
            self._users[key] -= 1
            if self._users[key] > 0:
                return
            del self._users[key], self._models[key]
        model.close()

    def users(self, path) -> int:
        """How many users hold the model of `path` (0: not loaded)."""
        with self._lock:
            return self._users.get(self.key(path), 0)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)
