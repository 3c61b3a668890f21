#!/usr/bin/env bash
# Developer build: compile ivl_local/_core in place (no reinstall), for PYTHONPATH=. runs.
#   scripts/dev_build.sh && PYTHONPATH=.:convert python -m pytest tests -k kernels
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$($PY -c 'import sys; print(sys.executable)')" \
  -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >/dev/null
cmake --build build/dev
for so in build/dev/_core*.so; do cp "$so" "ivl_local/.$(basename "$so").tmp" && mv -f "ivl_local/.$(basename "$so").tmp" "ivl_local/$(basename "$so")"; done  # atomic: running processes keep the old file
