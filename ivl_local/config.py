"""Configuration dataclasses: one place for every default.

Frozen dataclasses, validated on construction, so a bad value fails where it is written,
not deep inside the decode loop.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
from dataclasses import dataclass, field, replace

from .errors import ConfigError

# --- one rule per user-settable value (API, CLI flags, /alpha, /load all call these) ----------

# Value logits are O(10); at alpha 100 the value network already drowns the base, and far
# beyond it fused float32 logits overflow to inf (alpha 1e38 sampled garbage).
ALPHA_MAX = 100.0
SEED_MAX = 2**64 - 1   # the C++ sampler's seed is a uint64
CTX_MAX = 2**24        # tokens of context / batch: far above any model here, far below uint32 wrap
THREADS_MAX = 1024
# Drafted tokens verified per step: each costs a position with logits in every model, while
# the chance that all are accepted falls geometrically; past a few dozen nothing is gained.
DRAFT_MAX = 32


def _shown(value) -> str:
    """repr() for an error message, short even for a 10**5000 (whose repr() raises)."""
    try:
        text = repr(value)
    except ValueError:
        return "a very large integer"
    return text if len(text) <= 40 else text[:37] + "..."


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _f32(value: float) -> float:
    """`value` as the C++ sampler sees it (a float): 1e300 is inf there, 1e-320 is 0."""
    try:
        return struct.unpack("f", struct.pack("f", float(value)))[0]
    except OverflowError:   # past a float's range, or an int past a double's (10**400)
        return math.inf if value > 0 else -math.inf


def check_number(value, name: str, low: float, high: float) -> float:
    """A real number (not a bool, not text) in [low, high], as a float."""
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:   # an int past float range (10**400)
        number = math.inf
    if not (math.isfinite(number) and low <= number <= high):
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {_shown(value)}")
    return number


def check_alpha(value, name: str = "alpha") -> float:
    """A value network's scale: a number in [0, ALPHA_MAX]."""
    return check_number(value, name, 0.0, ALPHA_MAX)


def check_seed(value, name: str = "seed") -> int:
    """A sampling seed: an integer in [0, 2^64 - 1]."""
    if not _is_int(value) or not 0 <= value <= SEED_MAX:
        raise ConfigError(f"{name} must be an integer in [0, 2^64 - 1], got {_shown(value)}")
    return int(value)


def check_flag(value, name: str) -> bool:
    """A switch: True or False, nothing that merely looks like one ('no' is truthy)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


def check_max_tokens(value, name: str = "max_tokens") -> int | None:
    """How many tokens an answer may have: None (up to the context window) or an int >= 1."""
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {_shown(value)}")
    return int(value)


def check_draft_max(value, name: str = "draft_max") -> int:
    """How many tokens speculative decoding may draft per step: an integer in [1, DRAFT_MAX]."""
    if not _is_int(value) or not 1 <= value <= DRAFT_MAX:
        raise ConfigError(f"{name} must be an integer from 1 to {DRAFT_MAX}, got {_shown(value)}")
    return int(value)


@dataclass(frozen=True)
class SamplingConfig:
    """Parameters of the sampler chain, applied in this order (as in llama.cpp):
    penalties -> top-k -> temperature -> top-p -> min-p -> draw.

    temperature == 0 means greedy (argmax of the fused logits, no RNG used).
    """

    temperature: float = 0.8
    top_k: int = 40            # 0 disables; 40 is llama.cpp's default
    top_p: float = 0.95        # 1.0 disables
    min_p: float = 0.05        # 0.0 disables; llama.cpp's default
    repeat_penalty: float = 1.0  # 1.0 disables; >1 discourages tokens seen in the window
    repeat_last_n: int = 64    # window of past tokens the penalties look at
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None    # None: a fresh seed per Engine; an int: reproducible draws

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"):
            if not _is_number(getattr(self, name)):
                raise ConfigError(f"invalid sampling setting: {name} must be a number, "
                                  f"got {getattr(self, name)!r}")
        for name in ("top_k", "repeat_last_n"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"invalid sampling setting: {name} must be an integer, "
                                  f"got {getattr(self, name)!r}")
        if self.seed is not None:
            check_seed(self.seed)
        # The sampler takes floats: each rule holds for the value and for its float, so a
        # 1e300 penalty or a 1e-300 top_p is this error, not the sampler's at the first token.
        # (An int is taken as its float: math.isfinite(10**400) raises OverflowError.)
        values = {name: getattr(self, name) for name in
                  ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty")}
        f = {name: (_f32(v) if isinstance(v, numbers.Integral) else v, _f32(v)) for name, v in values.items()}
        checks = [
            (all(math.isfinite(v) and v >= 0 for v in f["temperature"]), "temperature must be >= 0 (and < 3.4e38)"),
            (0 <= self.top_k < 2**31, "top_k must be in [0, 2^31) (0 disables it)"),
            (all(0.0 < v <= 1.0 for v in f["top_p"]), "top_p must be in (0, 1] (and >= 1e-45)"),
            (all(0.0 <= v < 1.0 for v in f["min_p"]), "min_p must be in [0, 1) (and 1 - min_p >= 3e-8)"),
            (all(math.isfinite(v) and v > 0 for v in f["repeat_penalty"]),
             "repeat_penalty must be > 0 (and in [1e-45, 3.4e38])"),
            (0 <= self.repeat_last_n < 2**31, "repeat_last_n must be in [0, 2^31)"),
            (all(math.isfinite(v) for v in f["presence_penalty"]), "presence_penalty must be finite (|p| < 3.4e38)"),
            (all(math.isfinite(v) for v in f["frequency_penalty"]), "frequency_penalty must be finite (|p| < 3.4e38)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid sampling setting: {message}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes) -> "SamplingConfig":
        return replace(self, **changes)


GREEDY = SamplingConfig(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0)


# What a value model with another vocabulary reads in chat: the conversation in its own chat
# format (the one it was trained on) or the base's rendering.
VALUE_PROMPTS = ("own", "base")


def default_threads() -> int:
    """One thread per *free* core: the core count minus the 1-minute load average (rounded),
    at least 1. llama.cpp's (and torch's) threads wait for each other at every layer, so a
    thread on a core another process holds stalls the rest: on a shared 2-core machine two
    threads decoded 5-14x slower than one (measured). An idle laptop gets every core."""
    cpus = max(1, os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):   # no load average on this platform (Windows)
        return cpus
    return max(1, min(cpus, cpus - int(load + 0.5)))


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 2048          # tokens of context for each model
    n_batch: int = 512         # prefill batch size
    n_threads: int = field(default_factory=default_threads)
    alpha: float = 1.0         # scale of the value network's logits; 0 = base alone
    seed: int = 0
    draft_max: int = 8         # speculative decoding: most tokens drafted per step (adaptive below it)
    draft_min: int = 0         # ... and fewest while drafts exist (draft_min == draft_max: fixed k)

    def __post_init__(self) -> None:
        for name, top in (("n_ctx", CTX_MAX), ("n_batch", CTX_MAX), ("n_threads", THREADS_MAX)):
            value = getattr(self, name)
            if not _is_int(value):
                raise ConfigError(f"{name} must be an integer, got {_shown(value)}")
            if value > top:   # llama.cpp takes uint32 and would wrap it silently
                raise ConfigError(f"{name} must be at most {top:,}, got {_shown(value)}")
        check_alpha(self.alpha)
        check_seed(self.seed)
        if self.n_ctx < 16:
            raise ConfigError("n_ctx must be at least 16")
        if self.n_batch < 1:
            raise ConfigError("n_batch must be >= 1")
        if self.n_threads < 1:
            raise ConfigError("n_threads must be >= 1")
        check_draft_max(self.draft_max)
        if not _is_int(self.draft_min) or not 0 <= self.draft_min <= self.draft_max:
            raise ConfigError(f"draft_min must be an integer from 0 to draft_max ({self.draft_max}), "
                              f"got {_shown(self.draft_min)}")
