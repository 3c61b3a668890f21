"""Thin owning wrappers over llama.cpp's C API, reached through llama-cpp-python's ctypes layer.

llama-cpp-python is pinned (pyproject.toml): its low-level bindings mirror `llama.h` of one
llama.cpp revision and change between releases. Everything here is a few lines over one C
call; return codes become typed exceptions, and each owning object frees its C resource
exactly once (`close()`, context manager, or garbage collection as a last resort).

    model = Model(path)                           # llama_model_load_from_file
    ctx = Context(model, n_ctx=512, n_threads=2)  # llama_init_from_model (+ a llama_batch)
    ids = model.vocab.tokenize("Hello")           # llama_tokenize
    ctx.decode(ids, start_pos=0)                  # llama_decode, in n_batch chunks
    ptr = ctx.logits_ptr()                        # float* of the last token's logits, as an int
    ctx.truncate(3)                               # llama_memory_seq_rm(mem, 0, 3, -1)

Callers validate the file with `valuefile.read_gguf_header` before `Model(...)`: llama.cpp
itself trusts the file's tensor extents.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from pathlib import Path

import numpy as np

import llama_cpp as C
from gguf.constants import TokenType

from .errors import ConfigError, ContextOverflowError, IVLError, ModelFileError

SEQ = 0  # one sequence per context

# Token types as GGUF stores them (tokenizer.ggml.token_type) and their llama.cpp attributes.
_ATTR_TO_TYPE = ((C.LLAMA_TOKEN_ATTR_CONTROL, TokenType.CONTROL), (C.LLAMA_TOKEN_ATTR_UNKNOWN, TokenType.UNKNOWN),
                 (C.LLAMA_TOKEN_ATTR_UNUSED, TokenType.UNUSED), (C.LLAMA_TOKEN_ATTR_BYTE, TokenType.BYTE),
                 (C.LLAMA_TOKEN_ATTR_USER_DEFINED, TokenType.USER_DEFINED),
                 (C.LLAMA_TOKEN_ATTR_NORMAL, TokenType.NORMAL))


class DecodeError(IVLError):
    """llama_decode failed for a reason other than a full context."""


# --- process-wide setup -------------------------------------------------------------------

_init_lock = threading.Lock()
_initialised = False


@C.llama_log_callback
def _silent_log(level, text, user_data):  # kept alive at module level: C holds the pointer
    pass


def set_verbose(verbose: bool) -> None:
    """Route llama.cpp's log to stderr (verbose) or nowhere. Process-wide."""
    if verbose:
        from llama_cpp._logger import llama_log_callback, set_verbose as lcp_set_verbose

        lcp_set_verbose(True)
        C.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
    else:
        C.llama_log_set(_silent_log, ctypes.c_void_p(0))


@functools.cache
def extra_buffers_allowed() -> bool:
    """Whether models may load into llama.cpp's extra weight buffers (AMX, CPU repack).

    Off when this llama.cpp build has Intel AMX kernels: on AMX CPUs under Linux, llama-cpp-python
    0.3.36's AMX matmul dies with SIGILL at the first decode (measured on a Xeon with amx_int8,
    `tilezero` in ggml_backend_amx_mul_mat; an open upstream fix requests the tile permission
    per thread and keeps the tile configuration from being optimised away). Without extra
    buffers the weights stay in llama.cpp's plain CPU buffers: same results, and the AVX-512 /
    AVX2 kernels run them. IVL_LLAMA_EXTRA_BUFFERS=1 turns them back on (a fixed build),
    =0 turns them off anywhere."""
    forced = os.environ.get("IVL_LLAMA_EXTRA_BUFFERS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return b"AMX_INT8 = 1" not in C.llama_print_system_info()


def model_params(**fields) -> "C.llama_model_params":
    """llama.cpp's default model parameters, with the fields given and extra buffers as
    `extra_buffers_allowed()` says."""
    params = C.llama_model_default_params()
    params.use_extra_bufts = extra_buffers_allowed()
    for name, value in fields.items():
        setattr(params, name, value)
    return params


_llama_lock = threading.Lock()


@contextlib.contextmanager
def safe_llama_params():
    """For code that builds llama-cpp-python's high-level `llama_cpp.Llama` itself (tests'
    independent references, benchmarks' baselines): within the block, the Llama objects
    created get `model_params()`'s defaults, so they do not crash on AMX CPUs either.
    Llama has no parameter for it; its constructor reads llama_model_default_params()."""
    import llama_cpp.llama_cpp as low

    with _llama_lock:
        original = low.llama_model_default_params
        low.llama_model_default_params = lambda: model_params()
        try:
            yield
        finally:
            low.llama_model_default_params = original


def init_backend(verbose: bool = False) -> None:
    global _initialised
    with _init_lock:
        set_verbose(verbose)
        if not _initialised:
            C.llama_backend_init()
            _initialised = True


# --- vocabulary ---------------------------------------------------------------------------

class _Scratch(threading.local):
    """Vocab's scratch buffers, one set per thread (built on a thread's first use). Server
    slots share one model, hence one Vocab, and llama.cpp writes into these with the GIL
    released: one shared buffer handed a request another request's piece ("Two andHell")."""

    def __init__(self):
        self.piece = ctypes.create_string_buffer(256)
        self.tokens = (C.llama_token * 512)()


class Vocab:
    """A view of a loaded model's vocabulary (valid while its Model is open)."""

    def __init__(self, model: "Model"):
        self._model = model  # keeps the model alive
        self.ptr = C.llama_model_get_vocab(model.ptr)
        self.n_tokens: int = C.llama_vocab_n_tokens(self.ptr)
        self.bos: int = C.llama_vocab_bos(self.ptr)
        self.eos: int = C.llama_vocab_eos(self.ptr)
        self.eot: int = C.llama_vocab_eot(self.ptr)
        self.add_bos: bool = bool(C.llama_vocab_get_add_bos(self.ptr))
        self.vocab_type: int = C.llama_vocab_type(self.ptr)
        self._scratch = _Scratch()

    def text(self, token: int) -> bytes:
        """The token's text as stored in the GGUF (with '▁' / 'Ġ' markers)."""
        return C.llama_vocab_get_text(self.ptr, token) or b""

    @property
    def eos_text(self) -> str:
        """EOS as text (for chat templates that write it); '' when there is no EOS."""
        return self.text(self.eos).decode("utf-8", "replace") if self.eos >= 0 else ""

    def attr(self, token: int) -> int:
        return C.llama_vocab_get_attr(self.ptr, token)

    def token_type(self, token: int) -> int:
        """The GGUF token type (1 normal, 3 control, ...) recovered from llama.cpp's attributes."""
        attr = self.attr(token)
        for bit, ttype in _ATTR_TO_TYPE:
            if attr & bit:
                return ttype
        return 0

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.ptr, token))

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = True) -> list[int]:
        try:
            data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        except UnicodeEncodeError as e:   # a lone surrogate ('\ud800') is no text
            raise ConfigError(f"the text is not valid Unicode ({e.reason} at position {e.start})") from None
        scratch = self._scratch
        buf = scratch.tokens
        n = C.llama_tokenize(self.ptr, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:  # buffer too small: -n is the count needed
            buf = (C.llama_token * (-n))()
            n = C.llama_tokenize(self.ptr, data, len(data), buf, len(buf), add_special, parse_special)
            if n < 0:
                raise IVLError(f"tokenization failed ({n})")
            scratch.tokens = buf
        return buf[:n]

    def piece(self, token: int, special: bool = False) -> bytes:
        """Bytes this token contributes to the text (control tokens are empty unless special)."""
        buf = self._scratch.piece
        n = C.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.ptr, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        """Concatenated pieces; a leading space after BOS is dropped, as llama-cpp-python does."""
        out = b"".join(self.piece(t, special) for t in tokens)
        if tokens and tokens[0] == self.bos and out[:1] == b" ":
            out = out[1:]
        return out


def logits_view(address: int, n: int) -> np.ndarray:
    """float32[n] over llama.cpp's logits at `address` (no copy; valid until the next decode)."""
    ptr = ctypes.cast(address, ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(ptr, shape=(n,))


# --- model --------------------------------------------------------------------------------

class _Owned:
    """An owner of one C resource: subclasses define close(); it runs exactly once, from a
    `with` block, an explicit call or garbage collection, whichever comes first."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __del__(self, _finalizing=sys.is_finalizing):
        # While the interpreter shuts down llama_cpp's functions may be gone already (an Engine
        # left open printed "Exception ignored in __del__ ... 'NoneType' object is not
        # callable" at exit); the process is ending, so nothing is freed by hand then. The check
        # is a default argument because shutdown also sets this module's globals to None.
        if not _finalizing():
            self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Model(_Owned):
    """An owning llama_model handle."""

    def __init__(self, path: str | os.PathLike, *, n_gpu_layers: int = 0, use_mmap: bool = True,
                 vocab_only: bool = False, verbose: bool = False):
        init_backend(verbose)
        self.path = Path(path)
        params = model_params(n_gpu_layers=n_gpu_layers, use_mmap=use_mmap, vocab_only=vocab_only)
        self.ptr = C.llama_model_load_from_file(os.fsencode(self.path), params)
        if not self.ptr:
            self.ptr = None
            raise ModelFileError(f"llama.cpp could not load {self.path} (unsupported architecture or "
                                 f"corrupt file); rerun with verbose=True for llama.cpp's reason")
        self.vocab = Vocab(self)
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self.ptr)
        self.size_bytes: int = C.llama_model_size(self.ptr)

    def meta(self, key: str) -> str | None:
        """A metadata value rendered as a string by llama.cpp, or None if absent."""
        size = 4096
        while True:
            buf = ctypes.create_string_buffer(size)
            n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, size)
            if n < 0:
                return None
            if n < size:
                return buf.value.decode("utf-8", errors="replace")
            size = n + 1

    def close(self) -> None:
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            C.llama_model_free(ptr)



# --- batch + context ----------------------------------------------------------------------

class Batch(_Owned):
    """An owning llama_batch of up to `capacity` tokens, one sequence."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._batch = C.llama_batch_init(capacity, 0, 1)
        self._live = True

    def fill(self, tokens: list[int], start_pos: int, logits_last: bool,
             logits_all: bool = False) -> C.llama_batch:
        b, n = self._batch, len(tokens)
        assert n <= self.capacity
        b.n_tokens = n
        for i, tok in enumerate(tokens):
            b.token[i] = tok
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = SEQ
            b.logits[i] = int(logits_all)
        if logits_last and n:
            b.logits[n - 1] = 1
        return b

    def close(self) -> None:
        if getattr(self, "_live", False):
            self._live = False
            C.llama_batch_free(self._batch)


class Context(_Owned):
    """An owning llama_context with its batch; tracks nothing but the C state."""

    def __init__(self, model: Model, *, n_ctx: int, n_batch: int = 512, n_threads: int = 1,
                 swa_full: bool = True):
        self.model = model
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        # Full-size sliding-window caches (Gemma 3): rolling back to any earlier position
        # (prefix reuse, value-side re-tokenization) needs every position still cached.
        params.swa_full = swa_full
        self.ptr = C.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            self.ptr = None
            raise ModelFileError(f"llama.cpp could not create a context of {n_ctx} tokens for "
                                 f"{model.path.name} (out of memory?)")
        # What llama.cpp allocated, not what was asked: it rounds n_ctx up (to 256) and caps
        # n_batch at the n_ctx asked for; a decode of more than n_batch tokens aborts it.
        self.n_ctx: int = C.llama_n_ctx(self.ptr)
        self.n_batch: int = min(n_batch, C.llama_n_batch(self.ptr))
        self.n_vocab = model.vocab.n_tokens
        self.n_threads = n_threads
        self._mem = C.llama_get_memory(self.ptr)
        self._batch = Batch(self.n_batch)   # llama_batch_init does not check its allocation

    def set_threads(self, n_threads: int) -> None:
        self.n_threads = n_threads
        C.llama_set_n_threads(self.ptr, n_threads, n_threads)

    def decode(self, tokens: list[int], start_pos: int, logits_last: bool = True,
               logits_all: bool = False) -> None:
        """Decode tokens at positions start_pos.. in n_batch chunks; logits for the last one,
        or (`logits_all`, one chunk at most: speculative verification) for every one, read
        with logits_ptr(i) for the i-th token."""
        if self.ptr is None:
            raise IVLError("this context was freed")
        if logits_all and len(tokens) > self.n_batch:
            raise ConfigError(f"{len(tokens)} tokens with logits each exceed the batch of {self.n_batch}")
        if start_pos < 0 or start_pos + len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{start_pos + len(tokens)} tokens do not fit in the context "
                                       f"window of {self.n_ctx}")
        for lo in range(0, len(tokens), self.n_batch):
            chunk = tokens[lo:lo + self.n_batch]
            last = lo + len(chunk) == len(tokens)
            batch = self._batch.fill(chunk, start_pos + lo, logits_last and last, logits_all)
            rc = C.llama_decode(self.ptr, batch)
            if rc == 1:
                raise ContextOverflowError(f"no room left in the context window of {self.n_ctx} tokens")
            if rc != 0:
                raise DecodeError(f"llama_decode failed with code {rc}")

    def logits_ptr(self, i: int = -1) -> int:
        """Address of the logits (float32[n_vocab]) of output i of the last decode; zero-copy."""
        if self.ptr is None:
            raise IVLError("this context was freed")
        ptr = C.llama_get_logits_ith(self.ptr, i)
        address = ctypes.cast(ptr, ctypes.c_void_p).value
        if not address:
            raise DecodeError("no logits available (nothing decoded yet)")
        return address

    def logits_array(self, i: int = -1) -> np.ndarray:
        """A numpy view of the same buffer; valid until the next decode."""
        return logits_view(self.logits_ptr(i), self.n_vocab)

    def truncate(self, n_keep: int) -> bool:
        """Drop every cached position >= n_keep; False if llama.cpp cannot (caller clears)."""
        return bool(C.llama_memory_seq_rm(self._mem, SEQ, n_keep, -1))

    def clear(self) -> None:
        C.llama_memory_clear(self._mem, True)

    def pos_max(self) -> int:
        """Largest cached position, -1 when empty."""
        return C.llama_memory_seq_pos_max(self._mem, SEQ)

    def close(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            batch.close()
        ptr, self.ptr = getattr(self, "ptr", None), None
        if ptr:
            C.llama_free(ptr)

