#!/usr/bin/env bash
# Build a server image offline: wheelhouse, base image, then `docker build --network none`.
#
#   deploy/docker/build.sh cpu|gpu [TAG] [MODEL]     # TAG: vae-server:<target>; MODEL: a model repository
#                                                   # inside the checkout, e.g. models/vae-mnist, baked in
# What `make image` runs and what tests/system/test_image.py builds with. BASE_IMAGE overrides the base
# (default: what deploy/docker/base-image.sh picks); the docker CLI's builder is used (BuildKit or legacy).
# Prints the build time and the image size last.
set -euo pipefail
DOCKER=${DOCKER:-docker}

TARGET=${1:?usage: $0 cpu|gpu [TAG] [MODEL]}
TAG=${2:-vae-server:$TARGET}
MODEL=${3:-}
HERE=$(dirname "$0")

# The legacy builder builds every stage before the target: the gpu target's build passes the cpu stages.
[ "$TARGET" = gpu ] && "$HERE/wheelhouse.sh" cpu
"$HERE/wheelhouse.sh" "$TARGET"
BASE_IMAGE=${BASE_IMAGE:-$("$HERE/base-image.sh")}

SECONDS=0
"$DOCKER" build --network none -f "$HERE/Dockerfile" --target "$TARGET" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  ${MODEL:+--build-arg "MODEL=$MODEL"} --tag "$TAG" .
bytes=$("$DOCKER" image inspect --format '{{.Size}}' "$TAG")
echo "built $TAG (target $TARGET, base $BASE_IMAGE) in $SECONDS s: $((bytes / 1000000)) MB"
