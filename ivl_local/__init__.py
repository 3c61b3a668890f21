"""ivl-local: transferable post-training (inverse value learning) on a laptop.

    from ivl_local import Engine, GREEDY
    with Engine("gemma3-270m", "value.ivl.gguf") as engine:
        print(engine.complete("Q: 2+2=?\nA:", max_tokens=8, sampling=GREEDY))

Re-exports only. `Engine` is imported lazily, so `import ivl_local.config` (training,
conversion) does not load llama.cpp.
"""

from . import errors
from .config import GREEDY, SamplingConfig
from .errors import *  # noqa: F401,F403  (the typed errors are part of the public API)
from .terms import CFG, Contrastive, Proxy, ValueNet

__version__ = "0.1.0"

__all__ = ["Engine", "GenerationStats", "SamplingConfig", "GREEDY", "errors",
           "ValueNet", "Proxy", "CFG", "Contrastive",
           *[name for name in dir(errors) if name.endswith(("Error", "Cancelled"))]]


def __getattr__(name: str):
    if name in ("Engine", "GenerationStats"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'ivl_local' has no attribute {name!r}")
