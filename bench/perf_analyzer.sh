#!/usr/bin/env bash
# Triton's perf_analyzer (2.60.0), set up from nothing and run on this Debian 12 machine (bench/oip.py,
# `make bench-oip`).
#
#   bench/perf_analyzer.sh --setup          # fetch and unpack what it needs (quick once done); says what it fetches
#   bench/perf_analyzer.sh -m vae-mnist-decoder -i grpc -u 127.0.0.1:50051 --input-data zero ...   # run it
#
# What it fetches, into build/perf-analyzer/ (gitignored; `make clean` removes it), and why:
# 1. a virtual environment, build/perf-analyzer/venv, with bench/perf_analyzer-requirements.txt (pinned
#    `tritonclient[all]==2.60.0`, from PyPI): the last tritonclient wheel that ships the perf_analyzer binary.
#    Its own venv, because tritonclient pins protobuf < 6 and the server protobuf 7.
# 2. three Debian 13 (trixie) packages from deb.debian.org, pinned by version and SHA-256, unpacked (not
#    installed: dpkg-deb -x) into build/perf-analyzer/root: libc6 2.41, libstdc++6 and libgcc-s1 14.2. The
#    binary needs GLIBC_2.38 and GLIBCXX_3.4.32; Debian 12 has glibc 2.36 and GCC 12's libstdc++. The binary
#    runs under trixie's dynamic loader with trixie's libraries first on the library path; the rest (libz,
#    libssl3, libcrypto3) comes from the machine's /lib/x86_64-linux-gnu. Nothing outside build/ changes.
# When a pinned .deb has left deb.debian.org's pool (a point release replaced it), the download fails with 404:
# update the version and hash below from https://packages.debian.org/trixie/<package>.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/build/perf-analyzer"
VENV="$HERE/venv"
LIBS="$HERE/root/usr/lib/x86_64-linux-gnu"
REQUIREMENTS="$ROOT/bench/perf_analyzer-requirements.txt"
STAMP="$HERE/.installed"
PYTHON="${PYTHON:-python3.11}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# pool path, SHA-256 (of trixie's packages, 2026-12-03)
DEBS=(
  "pool/main/g/glibc/libc6_2.41-12+deb13u5_amd64.deb b59b0625cd1a791375d40dab23a4d5d3d0641e3d0a773501becdc3725b7f99cf"
  "pool/main/g/gcc-14/libstdc++6_14.2.0-19_amd64.deb ab1fa05837aa7a92aae748fd07a18a35f7d18bb4a71c4724fe2bbf0e32089de0"
  "pool/main/g/gcc-14/libgcc-s1_14.2.0-19_amd64.deb 3c71917b490d1a17aed43196a2787a256ecf060526cdb20216a74bedc061b150"
)

download() {  # URL FILE
  if command -v curl >/dev/null; then curl -fsSL -o "$2" "$1"; else wget -q -O "$2" "$1"; fi
}

setup() {
  if [ -f "$STAMP" ] && [ "$STAMP" -nt "$REQUIREMENTS" ] && [ "$STAMP" -nt "${BASH_SOURCE[0]}" ]; then
    return 0
  fi
  if [ "$(uname -m)" != x86_64 ]; then
    echo "error: perf_analyzer ships for x86_64 Linux only (this is $(uname -m))" >&2
    exit 1
  fi
  mkdir -p "$HERE/debs"
  echo "perf_analyzer: installing pinned tritonclient[all]==2.60.0 (ships the binary) into $VENV (from PyPI)"
  test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
  echo "perf_analyzer: the binary needs glibc >= 2.38: fetching Debian trixie's libc6, libstdc++6, libgcc-s1" \
    "from $MIRROR, unpacking (not installing) them into $HERE/root"
  rm -rf "$HERE/root"
  for entry in "${DEBS[@]}"; do
    read -r path sha <<<"$entry"
    deb="$HERE/debs/$(basename "$path")"
    if ! echo "$sha  $deb" | sha256sum --check --status 2>/dev/null; then
      download "$MIRROR/$path" "$deb.part"
      mv "$deb.part" "$deb"
      echo "$sha  $deb" | sha256sum --check --quiet
    fi
    dpkg-deb -x "$deb" "$HERE/root"
  done
  version="$(run --version 2>&1)"
  echo "perf_analyzer: $version, run through bench/perf_analyzer.sh"
  touch "$STAMP"
}

run() {
  exec "$LIBS/ld-linux-x86-64.so.2" --library-path "$LIBS:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
    "$VENV/bin/perf_analyzer" "$@"
}

if [ "${1:-}" = --setup ]; then
  setup
else
  setup
  run "$@"
fi
