#!/usr/bin/env bash
# The wheels an image installs, downloaded on the host and checked against their lock's sha256.
#
#   deploy/docker/wheelhouse.sh cpu|gpu     # → build/image/wheels/{<target>,codegen}/ (BUILD_DIR: build/image)
#
# A target's wheelhouse holds the wheels of its lock (requirements-<target>.txt), and for gpu also cuda/,
# those of requirements-cuda.txt (the NVIDIA wheels, installed in a layer of their own); codegen/ holds those
# of requirements-codegen.txt (grpcio-tools, for the build stage that generates the gRPC code). The Dockerfile
# copies them into its build stages and installs with `pip install --no-index --require-hashes`: the build
# needs no package index, and a wheel that is not the locked one fails it. A rerun checks the wheels already
# there against the locks and downloads only what is missing.
set -euo pipefail

TARGET=${1:?usage: $0 cpu|gpu}
HERE=$(cd "$(dirname "$0")" && pwd)
WHEELS=${BUILD_DIR:-build/image}/wheels
names=("$TARGET" codegen)
[ "$TARGET" = gpu ] && names+=(cuda)
for name in "${names[@]}"; do
  dest=$WHEELS/$name
  mkdir -p "$dest"
  pip=("${PYTHON:-python3}" -m pip --isolated --disable-pip-version-check download --quiet --no-deps
       --only-binary=:all: --require-hashes --dest "$dest" -r "$HERE/requirements-$name.txt")
  "${pip[@]}" --no-index --find-links "$dest" 2>/dev/null || "${pip[@]}"
  echo "wheelhouse $dest: $(find "$dest" -name '*.whl' | wc -l) wheels, $(du -sh "$dest" | cut -f1)"
done
