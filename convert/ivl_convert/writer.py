"""ValueFileWriter: a GGUF written in a fixed order, atomically.

    with ValueFileWriter(out_path, arch="llama") as w:   # temp file in out_path's folder
        w.add_metadata(key, value, type)                # 1. metadata (any number)
        w.add_tensor(name, array, "q8_0")               # 2. tensors (declared, converted lazily)
        w.write(advance)                                # 3. header + data; file moved into place
    # any exception (or Ctrl-C) inside the block removes the temp file; nothing is left behind

Calls out of that order raise WriterStateError (a programming error, not a user error).
A folder that cannot be written to, or a disk that fills up, is a ModelFileError naming
out_path. Temp files of an earlier, killed write to out_path are removed
(ivl_local.atomic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ivl_local.atomic import TempFile
from ivl_local.errors import ModelFileError

OUT_TYPES = ("f32", "f16", "q8_0")
Q8_BLOCK = 32          # elements per q8_0 block
Q8_BLOCK_BYTES = 34    # f16 scale + 32 int8


class WriterStateError(RuntimeError):
    """A writer method was called out of order."""


def ggml_type_for(out_type: str, array: np.ndarray):
    """The GGML type a tensor is stored as: 1-D (norms) always f32; q8_0 needs rows that
    are a multiple of 32 (else f16)."""
    from gguf import GGMLQuantizationType as T

    if array.ndim == 1 or out_type == "f32":
        return T.F32
    if out_type == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return T.Q8_0
    return T.F16


def stored_bytes(array: np.ndarray, ggml_type) -> int:
    from gguf import GGMLQuantizationType as T

    if ggml_type == T.F32:
        return array.size * 4
    if ggml_type == T.F16:
        return array.size * 2
    return array.size // Q8_BLOCK * Q8_BLOCK_BYTES


def encode(array: np.ndarray, ggml_type) -> np.ndarray:
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if ggml_type == T.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if ggml_type == T.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return quantize(np.ascontiguousarray(array, dtype=np.float32), T.Q8_0)


class ValueFileWriter:
    def __init__(self, out_path: str | Path, arch: str = "llama"):
        self.out_path = Path(out_path)
        folder = self.out_path.parent
        if not folder.is_dir():
            raise ModelFileError(f"output folder {folder} does not exist; create it first")
        self.arch = arch
        self._stage = "metadata"
        self._tensors: list[tuple[str, np.ndarray, object]] = []
        self._temp: TempFile | None = None   # while the file is being written
        self._writer = None

    # -- 1. metadata -------------------------------------------------------------------
    def add_metadata(self, key: str, value, value_type, sub_type=None) -> None:
        self._expect("metadata", "add_metadata")
        self._gguf().add_key_value(key, value, value_type, sub_type=sub_type)

    # -- 2. tensors ----------------------------------------------------------------------
    def add_tensor(self, name: str, array: np.ndarray, out_type: str) -> None:
        if self._stage == "metadata":
            self._stage = "tensors"
        self._expect("tensors", "add_tensor")
        ggml_type = ggml_type_for(out_type, array)
        self._tensors.append((name, array, ggml_type))
        # Declared with its logical shape; data is converted one tensor at a time in write().
        self._gguf().add_tensor_info(name, array.shape, np.dtype(np.float32),
                                     stored_bytes(array, ggml_type), raw_dtype=ggml_type)

    # -- 3. write --------------------------------------------------------------------------
    def write(self, advance: Callable[[int], None] = lambda n: None) -> Path:
        self._expect("tensors", "write")
        self._stage = "writing"
        w = self._gguf()
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for name, array, ggml_type in self._tensors:
                data = encode(array, ggml_type)
                w.write_tensor_data(data)
                advance(data.nbytes)
            w.close()
            self._temp.commit()
        except OSError as e:                          # disk full, quota, I/O error
            self.__exit__(None, None, None)           # removes the temp file
            raise self._cannot_write(e) from None
        self._temp = None
        self._stage = "done"
        return self.out_path

    # -- internals ---------------------------------------------------------------------------
    def _expect(self, stage: str, call: str) -> None:
        if self._stage != stage:
            raise WriterStateError(f"{call}() called while {self._stage}; order is metadata, "
                                   "tensors, write")

    def _cannot_write(self, e: OSError) -> ModelFileError:
        return ModelFileError(f"cannot write {self.out_path}: {e.strerror or e}")

    def _gguf(self):
        if self._writer is None:
            import gguf

            try:
                self._temp = TempFile(self.out_path)
            except OSError as e:                      # a read-only folder
                raise self._cannot_write(e) from None
            self._writer = gguf.GGUFWriter(self._temp.path, self.arch)
        return self._writer

    def __enter__(self) -> "ValueFileWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError:
                pass                                  # the temp file is removed below anyway
        if self._temp is not None:                   # not completed: leave nothing behind
            self._temp.discard()
            self._temp = None
