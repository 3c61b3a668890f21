"""Typed errors raised at ivl-local's boundaries.

Library code raises these; only the CLI catches them, prints one line and exits non-zero.
Every message is written to be read by a user: it says what is wrong and, where it can,
what to do about it.
"""


class IVLError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 1


class ModelFileError(IVLError):
    """A model or value file is missing, truncated, not a GGUF, or unusable."""


class ModelNotFoundError(ModelFileError):
    """A model name resolves to nothing installed (with a hint on how to install it)."""


class FormatVersionError(ModelFileError):
    """A value file written by a newer, incompatible ivl format version."""


class VocabMismatchError(IVLError):
    """Base and value vocabularies cannot be mapped (or a map file is for other vocabularies)."""


class ContextOverflowError(IVLError):
    """The prompt (plus history) does not fit in the context window."""


class EmptyPromptError(IVLError):
    """The prompt is empty or only whitespace."""


class InvalidLogitsError(IVLError):
    """A model produced NaN logits; nothing is sampled from them."""


class ConfigError(IVLError):
    """A parameter value is out of range (temperature < 0, top_p outside (0, 1], ...)."""

    exit_code = 2


class DataError(IVLError):
    """A demonstration file is malformed (the message carries the file and line number)."""


class CheckpointError(IVLError):
    """A training checkpoint is incomplete or inconsistent (missing tensor, wrong shape)."""


class GenerationCancelled(IVLError):
    """Engine.cancel() stopped the generation (a server's client went away); the engine stays open."""


class EngineBusyError(IVLError):
    """Another thread's generation is in progress on this Engine (one generation at a time)."""


class EngineClosedError(IVLError):
    """The Engine was closed: it runs nothing more (a generation stops at the next token)."""


class GenerationSuperseded(IVLError):
    """A newer generate() on the same thread took over the engine from this unfinished one."""
