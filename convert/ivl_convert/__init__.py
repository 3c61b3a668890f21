"""ivl_convert: training checkpoint -> `.ivl.gguf` value file (gguf + numpy + safetensors;
never torch, so converting needs no training stack).

    from ivl_convert import convert_checkpoint, inspect_value_file
    path = convert_checkpoint("runs/value", "value.ivl.gguf", out_type="q8_0")
    inspect_value_file(path)["ivl"]     # {"ivl.format_version": "1.0", ...}
"""

from .checkpoint import CONVERTIBLE_ARCHS
from .convert import convert_checkpoint, inspect_value_file, permute_for_llama_cpp
from .writer import OUT_TYPES, ValueFileWriter, WriterStateError

__all__ = ["CONVERTIBLE_ARCHS", "convert_checkpoint", "inspect_value_file", "permute_for_llama_cpp", "OUT_TYPES",
           "ValueFileWriter", "WriterStateError"]
