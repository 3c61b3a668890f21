"""Bounded fuzzing of the GGUF reader: whatever the bytes, `read_gguf_header` returns a header or
raises ModelFileError -- no other exception, no hang -- and a file it accepts does not crash
llama.cpp.

The corpus is tests/data/fuzz_seed_*.gguf (tests/gguf_craft.write_fuzz_seeds): a tiny llama
model, the same as a value file, and a metadata-rich GGUF v2. Mutations: byte flips,
truncations, splices of two seeds, rewrites of the header's integer fields (counts, lengths,
types, dimensions, offsets) with boundary values, and hostile-but-well-formed hyperparameters.
Every budget is fixed (derandomized, no example database), so CI time is predictable.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

import pytest
from gguf.constants import GGUFValueType as VT
from hypothesis import HealthCheck, given, settings, strategies as st

from ivl_local.errors import ModelFileError
from ivl_local.valuefile import read_gguf_header, value_info_from_header

sys.path.insert(0, str(Path(__file__).parent))
from gguf_craft import rewrite, write_fuzz_seeds  # noqa: E402

DATA = Path(__file__).parent / "data"
SEED_NAMES = ("fuzz_seed_llama.gguf", "fuzz_seed_value.gguf", "fuzz_seed_meta.gguf")
SEEDS = [(DATA / name).read_bytes() for name in SEED_NAMES]
WORK = Path(tempfile.mkdtemp(prefix="ivl-gguf-fuzz-"))
PER_EXAMPLE_S = 5      # a 10 KB header parses in milliseconds; this only catches hangs
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _remove_work_folder():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_or_refuse(data: bytes) -> str:
    """'read' or 'refused'; anything else (another exception, a hang) fails the example."""
    path = WORK / "mutant.gguf"
    path.write_bytes(data)
    with time_limit(PER_EXAMPLE_S):
        try:
            header = read_gguf_header(path)
        except ModelFileError:
            return "refused"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a raw value model warns
            try:
                value_info_from_header(header)
            except ModelFileError:
                pass
    return "read"


# --- the header's integer fields, located by walking a valid seed ---------------------------

_SIZES = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4, VT.FLOAT32: 4,
          VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


def integer_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every count, length, type code, dimension and offset in the header."""
    fields, pos = [(4, 4), (8, 8), (16, 8)], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def field(size):
        nonlocal pos
        fields.append((pos, size))
        value = int.from_bytes(data[pos:pos + size], "little")
        pos += size
        return value

    def string():
        nonlocal pos
        length = field(8)
        pos += length

    def value(vtype):
        nonlocal pos
        if vtype == VT.STRING:
            string()
        elif vtype == VT.ARRAY:
            elem, count = field(4), field(8)
            for _ in range(count):
                value(elem)
        elif vtype in (VT.UINT32, VT.INT32, VT.UINT64, VT.INT64):
            field(_SIZES[VT(vtype)])
        else:
            pos += _SIZES[VT(vtype)]

    for _ in range(n_kv):
        string()
        value(field(4))
    for _ in range(n_tensors):
        string()
        for _ in range(field(4)):
            field(8)
        field(4)
        field(8)
    return fields


FIELDS = [integer_fields(seed) for seed in SEEDS]
DATA_END = [max(h.data_offset + t.offset + t.n_bytes for t in h.tensors)
            for h in (read_gguf_header(DATA / name) for name in SEED_NAMES)]
BOUNDARY = [0, 1, 2, 3, 7, 8, 9, 31, 32, 63, 64, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
            2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


# --- properties -----------------------------------------------------------------------------

def test_seeds_are_valid_and_reproducible(tmp_path):
    for name, seed, fields in zip(SEED_NAMES, SEEDS, FIELDS):
        assert read_or_refuse(seed) == "read" and len(seed) < 20_000 and len(fields) > 20, name
    for path in write_fuzz_seeds(tmp_path):
        assert path.read_bytes() == (DATA / path.name).read_bytes(), f"regenerate {path.name}"


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from(range(len(SEEDS))), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)),
                                                     min_size=1, max_size=16))
def test_byte_flips(seed, flips):
    data = bytearray(SEEDS[seed])
    for where, byte in flips:
        data[where % len(data)] = byte
    read_or_refuse(bytes(data))


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(range(len(SEEDS))), st.integers(0, 20_000))
def test_truncations(seed, keep):
    data = SEEDS[seed]
    keep %= len(data)
    outcome = read_or_refuse(data[:keep])
    assert outcome == "refused" or keep >= DATA_END[seed]   # only trailing padding may go


@settings(FUZZ, max_examples=600)
@given(st.sampled_from(range(len(SEEDS))), st.sampled_from(range(len(SEEDS))),
       st.integers(0, 2**31), st.integers(0, 2**31), st.integers(1, 4096), st.booleans())
def test_splices(a, b, at, start, length, insert):
    target, source = SEEDS[a], SEEDS[b]
    at, start = at % len(target), start % len(source)
    chunk = source[start:start + length]
    end = at if insert else at + len(chunk)
    read_or_refuse(target[:at] + chunk + target[end:])


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from(range(len(SEEDS))),
       st.lists(st.tuples(st.integers(0, 2**31), st.one_of(st.sampled_from(BOUNDARY), st.integers(-3, 3))),
                min_size=1, max_size=3))
def test_integer_fields(seed, rewrites):
    data, fields = bytearray(SEEDS[seed]), FIELDS[seed]
    for which, value in rewrites:
        pos, size = fields[which % len(fields)]
        if value <= 3:     # small values nudge the stored one
            value = int.from_bytes(data[pos:pos + size], "little") + value
        data[pos:pos + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    read_or_refuse(bytes(data))


# --- hostile but well-formed hyperparameters ------------------------------------------------

A = "llama."
U32_KEYS = [A + k for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                            "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                            "attention.key_length", "attention.value_length", "expert_count",
                            "expert_used_count", "expert_group_count", "expert_group_used_count",
                            "nextn_predict_layers", "attention.sliding_window", "vocab_size")] + [
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.seperator_token_id"]
F32_KEYS = [A + k for k in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon", "rope.freq_base",
                            "rope.scaling.factor", "rope.scaling.attn_factor", "attention.scale",
                            "logit_scale", "final_logit_softcapping", "attn_logit_softcapping")]
STR_KEYS = {"general.architecture": ["llama", "qwen2", "gemma3", "gemma2", "mamba", "bert", "t5", "nonsense", ""],
            "tokenizer.ggml.model": ["llama", "gpt2", "bert", "t5", "rwkv", "none", "no_vocab", "bogus", ""],
            "tokenizer.ggml.pre": ["default", "llama3", "qwen2", "bogus", ""],
            A + "rope.scaling.type": ["none", "linear", "yarn", "longrope"],
            A + "pooling_type": ["x"]}
BOOL_KEYS = ["tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
             A + "attention.causal", A + "use_parallel_residual"]
U32_VALUES = [0, 1, 2, 3, 4, 5, 8, 16, 53, 54, 55, 64, 512, 513, 1024, 1025, 2**16, 2**31, 2**32 - 1]
F32_VALUES = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-38, 1e-5, 1.0, 1e38]
TYPES = [VT.UINT8, VT.INT32, VT.UINT64, VT.FLOAT32, VT.FLOAT64, VT.BOOL, VT.STRING]


def hparam_mutation(rng: random.Random) -> tuple[dict, tuple]:
    """1-3 changes to the tiny llama's metadata: values out of range, wrong types, keys dropped."""
    changes, drop = {}, []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.35:
            changes[rng.choice(U32_KEYS)] = (rng.choice(U32_VALUES), VT.UINT32)
        elif kind < 0.55:
            changes[rng.choice(F32_KEYS)] = (rng.choice(F32_VALUES), VT.FLOAT32)
        elif kind < 0.7:
            key = rng.choice(list(STR_KEYS))
            changes[key] = (rng.choice(STR_KEYS[key]), VT.STRING)
        elif kind < 0.75:
            changes[rng.choice(BOOL_KEYS)] = (rng.random() < 0.5, VT.BOOL)
        elif kind < 0.85:   # a known key with a value of another type
            key, vtype = rng.choice(U32_KEYS + F32_KEYS), rng.choice(TYPES)
            value = {VT.STRING: "7", VT.BOOL: True, VT.FLOAT32: 2.0, VT.FLOAT64: 2.0}.get(vtype, 2)
            changes[key] = (value, vtype)
        elif kind < 0.92:   # per-layer arrays of the right or wrong length
            key = rng.choice([A + "attention.head_count", A + "attention.head_count_kv", A + "feed_forward_length",
                              A + "expert_used_count"])
            changes[key] = ([rng.choice([0, 1, 2, 16]) for _ in range(rng.choice([1, 2, 3]))], VT.ARRAY, VT.INT32)
        else:
            drop.append(rng.choice([A + "attention.head_count", A + "attention.head_count_kv",
                                    A + "rope.dimension_count", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                                    "tokenizer.ggml.bos_token_id", A + "attention.layer_norm_rms_epsilon"]))
    return changes, tuple(drop)


@settings(FUZZ, max_examples=800)
@given(st.integers(0, 2**32 - 1))
def test_hparam_mutations(seed):
    changes, drop = hparam_mutation(random.Random(seed))
    path = rewrite(DATA / SEED_NAMES[0], WORK / "hparams.gguf", set=changes, drop=drop)
    read_or_refuse(path.read_bytes())


# --- what the validator accepts, llama.cpp survives -----------------------------------------

N_THROUGH_LLAMA_CPP = 300  # accepted mutants loaded and run by llama.cpp, one subprocess

RUN_MUTANTS = textwrap.dedent("""
    import sys
    from ivl_local import GREEDY
    from ivl_local.engine import Engine
    from ivl_local.errors import IVLError
    for path in sys.argv[1:]:
        print("START", path, flush=True)
        try:
            with Engine(path, n_ctx=64, n_threads=1) as engine:
                engine.complete("hi it is", max_tokens=2, sampling=GREEDY)
            print("RAN", path, flush=True)
        except IVLError as e:
            print("REFUSED", path, type(e).__name__, str(e).replace(chr(10), " "), flush=True)
""")


def test_accepted_mutants_do_not_crash_llama_cpp(tmp_path):
    """Mutants the validator lets through are loaded and decoded by llama.cpp in a subprocess:
    a GGML_ASSERT there is exit 134, a segfault 139, and the last START line names the file."""
    accepted, rng = [], random.Random(20261130)
    while len(accepted) < N_THROUGH_LLAMA_CPP:
        changes, drop = hparam_mutation(rng)
        path = rewrite(DATA / SEED_NAMES[0], tmp_path / f"m{len(accepted)}.gguf", set=changes, drop=drop)
        if read_or_refuse(path.read_bytes()) == "read":
            accepted.append((path, changes, drop))
    proc = subprocess.run([sys.executable, "-P", "-c", RUN_MUTANTS, *(str(p) for p, _, _ in accepted)],
                          capture_output=True, text=True, timeout=600)
    started = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("START")]
    culprit = next(((c, d) for p, c, d in accepted if started and str(p) == started[-1]), None)
    assert proc.returncode == 0, (f"exit {proc.returncode} on a mutant the validator accepted: {culprit}\n"
                                  f"{proc.stderr[-1500:]}")
    assert proc.stdout.count("START") == len(accepted)
