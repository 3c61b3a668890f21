#!/usr/bin/env bash
# The C++ core's test driver (csrc/tests: no Python, no pybind): every SIMD level compared
# with the scalar level, natively and for aarch64 (NEON) under qemu user-mode emulation.
#
#   scripts/test_core.sh            # both: native, then aarch64
#   scripts/test_core.sh native     # this CPU's levels (x86-64: scalar, avx2, avx512 as present)
#   scripts/test_core.sh aarch64    # cross-built, static, run by qemu-aarch64: scalar and neon
#
# The aarch64 step installs Debian's g++-aarch64-linux-gnu and qemu-user when missing (apt,
# as root or through sudo) and fails when it cannot: CI must never skip NEON silently.
# No binfmt_misc registration is needed: qemu-aarch64 is called explicitly.
# Builds go to build/core-tests/<arch>/; JOBS (default 2) parallel compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
OUT=build/core-tests
# The core's flags from CMakeLists.txt (gnu++17: CMake's default, extensions on).
CXXFLAGS=(-std=gnu++17 -O3 -Wall -Wextra -fno-math-errno -Icsrc)
SOURCES=(csrc/core/*.cpp csrc/tests/*.cpp)

# build CXX DIR [LDFLAGS...]: objects in parallel, then the driver DIR/driver.
build() {
  local cxx=$1 dir=$2
  shift 2
  mkdir -p "$dir"
  printf '%s\n' "${SOURCES[@]}" |
    xargs -P "$JOBS" -I{} sh -c "$cxx ${CXXFLAGS[*]} -c {} -o $dir/\$(basename {} .cpp).o"
  "$cxx" "$dir"/*.o -o "$dir/driver" "$@"
}

native() {
  local t0=$SECONDS
  echo "== core tests, native $(uname -m): building"
  rm -rf "$OUT/native"
  build "${CXX:-g++}" "$OUT/native"
  echo "   built in $((SECONDS - t0)) s; running"
  t0=$SECONDS
  "$OUT/native/driver"
  echo "   ran in $((SECONDS - t0)) s"
}

install_cross() {
  command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null && return
  local sudo=() packages=(g++-aarch64-linux-gnu qemu-user) t0=$SECONDS
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  command -v apt-get >/dev/null || {
    echo "error: the aarch64 test needs ${packages[*]} (Debian/Ubuntu apt); on this system" \
         "install an aarch64 cross g++ and qemu-aarch64, or run: scripts/test_core.sh native" >&2
    exit 1; }
  echo "   installing ${packages[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  local apt=("${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}")
  # A fresh image may have no package lists yet: update once, only when the install needs it.
  "${apt[@]}" >/dev/null 2>&1 || { "${sudo[@]}" apt-get update -qq && "${apt[@]}" >/dev/null; } || {
    echo "error: could not install ${packages[*]} with apt-get" >&2; exit 1; }
  command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || {
    echo "error: ${packages[*]} installed, but aarch64-linux-gnu-g++ or qemu-aarch64 is missing" >&2
    exit 1; }
  echo "   installed in $((SECONDS - t0)) s"
}

aarch64() {
  if [ "$(uname -m)" = aarch64 ]; then
    echo "== core tests, aarch64: this host is aarch64, the native run covers neon"
    native
    return
  fi
  echo "== core tests, aarch64 under qemu"
  install_cross
  local t0=$SECONDS
  rm -rf "$OUT/aarch64"
  # Static: qemu then needs no aarch64 loader or libraries (-L is kept as a fallback).
  CXXFLAGS+=(-Wno-psabi)  # GCC notes an ABI change of 10.1 for std::pair arguments
  build aarch64-linux-gnu-g++ "$OUT/aarch64" -static
  echo "   built in $((SECONDS - t0)) s; running under $(qemu-aarch64 --version | head -1)"
  t0=$SECONDS
  # The driver itself asserts that "auto" selects neon on aarch64.
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$OUT/aarch64/driver"
  echo "   ran in $((SECONDS - t0)) s"
}

case ${1:-all} in
  native) native ;;
  aarch64) aarch64 ;;
  all) native; aarch64 ;;
  *) echo "usage: scripts/test_core.sh [native|aarch64|all]" >&2; exit 2 ;;
esac
