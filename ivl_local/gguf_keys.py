"""The `ivl.*` metadata namespace of a value file, declared once, as data.

A value file (`*.ivl.gguf`) is an ordinary llama.cpp GGUF plus these keys. The writer
(`ivl_convert`) and the reader (`ivl_local.valuefile`) both take key names from here.
"""

from __future__ import annotations

# Major changes break readers; minor changes only add keys. A reader refuses a file whose
# major version is newer than FORMAT_MAJOR and accepts any minor version.
FORMAT_MAJOR = 1
FORMAT_MINOR = 1                # 1.1: ivl.value.source, ivl.value.source_detail


class Keys:
    FORMAT_VERSION = "ivl.format_version"              # str "MAJOR.MINOR"
    CONNECTION = "ivl.connection"                      # str: "residual" (the only one trained)
    DEFAULT_ALPHA = "ivl.default_alpha"                # float32
    BASE_NAME = "ivl.training_base.name"               # str: name or file of the training base
    BASE_VOCAB_FINGERPRINT = "ivl.training_base.vocab_fingerprint"  # str (see vocab_fingerprint)
    BASE_VOCAB_SIZE = "ivl.training_base.vocab_size"   # uint32
    INIT = "ivl.value.init"                            # str: pretrained | pruned:K | fresh
    SOURCE = "ivl.value.source"                        # str: ivl-train | foreign (an HF folder)
    SOURCE_DETAIL = "ivl.value.source_detail"          # str: e.g. "LlamaForCausalLM folder value"
    NORM_WEIGHT = "ivl.recipe.norm_weight"             # float32
    NORM_KIND = "ivl.recipe.norm_kind"                 # str: "mean_abs" (official code)
    STEPS = "ivl.recipe.steps"                         # uint32
    LEARNING_RATE = "ivl.recipe.learning_rate"         # float32
    DATA = "ivl.recipe.data"                           # str: data file name + sha256 prefix
    CREATED = "ivl.created"                            # str: ISO-8601 UTC time of conversion
    TOOL = "ivl.tool"                                  # str: "ivl-local X.Y.Z"


# Keys every conforming value file carries (a reader warns about missing optional ones).
REQUIRED = (Keys.FORMAT_VERSION, Keys.CONNECTION, Keys.DEFAULT_ALPHA,
            Keys.BASE_NAME, Keys.BASE_VOCAB_FINGERPRINT)

CONNECTIONS = ("residual",)


def parse_version(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)
