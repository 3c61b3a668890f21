"""Build (once) and cache the files an evaluation needs: trained value nets, full fine-tunes,
re-quantized bases and aligned token maps.

    ws = Workspace(cache_dir() / "eval")
    path = ws.model(Trained("smollm2-135m"))      # -> value .ivl.gguf (trains on first use)
    path = ws.model(Requantized("smollm2-135m", "Q8_0"))
    ws.describe(path)                             # {"file": ..., "sha256": first 12 hex digits}

Every artifact lives in its own folder named after its recipe and a hash of the recipe plus
the files it is made from (training data, base model, corpus), so changing any of them builds
a new one. Training runs in a child process (`python -m ivl_local.eval.jobs`): torch never
enters the evaluating process, and its memory is returned before models are loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from ..atomic import atomic_temp
from ..config import default_threads
from ..errors import IVLError, ModelFileError
from ..models import resolve_model
from ..datasets import data_path
from .configs import DEMO_SETS, AlignedMap, ModelRef, Requantized, Trained
from .task import split_path

# llama_ftype values (llama.h) for the re-quantization targets we use
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9}


def sha256_of(path: Path, _cache: dict = {}) -> str:
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        _cache[key] = digest.hexdigest()
    return _cache[key]


def vocab_of(path: Path, _cache: dict = {}) -> str | None:
    """The vocabulary fingerprint of a GGUF file (None for a token map or a bad header)."""
    from ..valuefile import read_gguf_header
    from ..vocab import read_vocab

    path = Path(path)
    if path.suffix != ".gguf":
        return None
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _cache:
        try:
            _cache[key] = read_vocab(read_gguf_header(path)).fingerprint
        except (IVLError, KeyError, ValueError):
            _cache[key] = None
    return _cache[key]


def _recipe_hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text).strip("-").lower()


class ArtifactError(IVLError):
    """An evaluation artifact (training, conversion, quantization) could not be built."""


class Workspace:
    def __init__(self, root: Path, train_split: str = "train", log=print):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.train_split = train_split
        self.log = log

    def train_data(self, task: str) -> Path:
        return split_path(self.train_split, task)

    def demonstrations(self, ref: Trained) -> Path:
        """What `ref` learns: its task's train split, or its mix of shipped demonstration sets
        (one JSONL file, the sets concatenated in order; the trainer shuffles), written once
        under the workspace and named by its content."""
        if not ref.data:
            return self.train_data(ref.task)
        parts = []
        for name in ref.data:
            text = data_path(DEMO_SETS[name]).read_text(encoding="utf-8")
            parts.append(text if text.endswith("\n") or not text else text + "\n")
        mixed = "".join(parts).encode("utf-8")
        out = self.root / "data" / f"mix-{'+'.join(ref.data)}-{hashlib.sha256(mixed).hexdigest()[:12]}.jsonl"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_temp(out) as tmp:
                tmp.write_bytes(mixed)
        return out

    # --- public -----------------------------------------------------------------------------

    def model(self, ref: ModelRef) -> Path:
        """A GGUF file (or, for a non-llama full fine-tune, a torch checkpoint folder)."""
        if isinstance(ref, str):
            return resolve_model(ref)
        if isinstance(ref, Requantized):
            return self._requantize(ref)
        if isinstance(ref, Trained):
            return self._trained(ref)
        raise TypeError(f"not a model reference: {ref!r}")

    def token_map(self, spec: AlignedMap, progress: bool = False) -> Path:
        from ..align import build_aligned_map

        base, value = self.model(spec.base), self.model(spec.value)
        corpus = Path(spec.corpus)
        key = _recipe_hash(sha256_of(base), sha256_of(value), sha256_of(corpus), spec.max_bytes)
        out = self.root / "maps" / f"aligned-{key}.npz"
        if not out.exists():
            self.log(f"building aligned token map {base.name} <- {value.name} "
                     f"({spec.max_bytes or 'all'} bytes of {corpus.name})")
            build_aligned_map(base, value, corpus, out, progress=progress, max_bytes=spec.max_bytes)
        return out

    @staticmethod
    def describe(path: Path | None) -> dict | None:
        if path is None:
            return None
        path = Path(path)
        if path.is_dir():  # a torch checkpoint: hash its weights
            weights = path / "model.safetensors"
            return {"file": str(path), "sha256": sha256_of(weights)[:12] if weights.exists() else "?"}
        return {"file": str(path), "sha256": sha256_of(path)[:12], "bytes": path.stat().st_size,
                "vocab": vocab_of(path)}

    # --- builders ---------------------------------------------------------------------------

    def _requantize(self, ref: Requantized) -> Path:
        import llama_cpp

        if ref.qtype not in FTYPES:
            raise ArtifactError(f"unknown quantization {ref.qtype} (known: {', '.join(FTYPES)})")
        source = resolve_model(ref.source)
        out = self.root / "quant" / f"{source.stem}.{ref.qtype}-{_recipe_hash(sha256_of(source))}.gguf"
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[ref.qtype]
        params.allow_requantize = True   # the source is already quantized (Q4_1, Q4_K_M)
        params.nthread = os.cpu_count() or 1
        self.log(f"re-quantizing {source.name} -> {ref.qtype}")
        with atomic_temp(out) as tmp:
            rc = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(tmp), ctypes.byref(params))
            if rc != 0 or not tmp.exists():
                raise ArtifactError(f"llama.cpp could not quantize {source.name} to {ref.qtype} (code {rc})")
        return out

    def _trained(self, ref: Trained) -> Path:
        base = resolve_model(ref.base)
        data = self.demonstrations(ref)
        key = _recipe_hash(ref.recipe(), sha256_of(base), sha256_of(data))
        folder = self.root / "trained" / f"{_slug(ref.label)}-{key}"
        done = folder / "artifact.json"
        if done.exists():
            return Path(json.loads(done.read_text())["path"])
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder / ".lock", lambda: self.log(f"waiting for another run training {ref.label}")):
            if done.exists():      # another evaluation trained it while we waited
                return Path(json.loads(done.read_text())["path"])
            self.log(f"training {ref.label} ({ref.steps} steps) in {folder}")
            # Threads do not change the result (not in the recipe hash); 1 on a busy machine.
            job = {"recipe": asdict(ref), "data": str(data), "folder": str(folder),
                   "threads": default_threads()}
            result = run_job("train", job)
            tmp = done.with_name(done.name + ".tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            os.replace(tmp, done)
        return Path(result["path"])


@contextmanager
def _exclusive(path: Path, on_wait=lambda: None):
    """An advisory lock on `path` (POSIX flock), so two evaluations sharing a cache train an
    artifact once: the second waits, then finds it built. No-op where flock is missing."""
    try:
        import fcntl
    except ImportError:   # Windows: no concurrent-run protection
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _child_setup(parent: int, prctl) -> None:
    """In the forked job, before exec: nice 5, and on Linux die with the parent (SIGTERM).
    Without the latter, a killed evaluation left its training job running, unlocked: the next
    evaluation of the same recipe trained a second copy into the same folder. `prctl` is looked
    up in the parent: loading a library between fork and exec can deadlock."""
    os.nice(5)
    if prctl is not None:
        prctl(1, signal.SIGTERM)                       # PR_SET_PDEATHSIG
        if os.getppid() != parent:                     # the parent died before prctl took effect
            os._exit(1)


def _linux_prctl():
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def run_job(name: str, payload: dict) -> dict:
    """Run ivl_local.eval.jobs in a child process (nice'd, so an interactive shell stays usable)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), str(root / "convert"),
                                                    env.get("PYTHONPATH", "")) if p)
    out_file = Path(payload.get("folder") or payload["out_dir"]) / f"{name}-result.json"
    out_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "ivl_local.eval.jobs", name, json.dumps(payload), str(out_file)]
    proc = subprocess.run(cmd, env=env, preexec_fn=functools.partial(_child_setup, os.getpid(), _linux_prctl()))
    if proc.returncode != 0 or not out_file.exists():
        raise ArtifactError(f"evaluation job '{name}' failed (exit {proc.returncode}); see the log above")
    return json.loads(out_file.read_text())


__all__ = ["Workspace", "ArtifactError", "sha256_of", "run_job", "ModelFileError"]
