#!/usr/bin/env bash
# The base image for a build: the official one where it can be pulled, else the same built from Debian packages.
#
#   deploy/docker/base-image.sh         # prints the image to build on (BASE_IMAGE of the Dockerfile)
#
# The Dockerfile's default base is the official python slim image pinned by digest; this script pulls it. Where
# that fails (an air-gapped build, Docker Hub out of reach), it builds the equivalent from Debian bookworm,
# vae-base:bookworm-python3.11: `debootstrap --variant=minbase` with Debian's python3.11 and its venv module,
# trimmed of apt lists, docs and locales, then `docker import`. The root filesystem tarball is cached under
# build/image/base/, so a rerun only imports it (or does nothing when the image exists). Needs root
# (debootstrap) and a Debian mirror: DEBIAN_MIRROR (default http://deb.debian.org/debian, what this machine's
# apt uses). Progress goes to stderr; stdout is the image reference alone.
set -euo pipefail
DOCKER=${DOCKER:-docker}
exec 3>&1 1>&2

OFFICIAL=$(sed -n 's/^ARG BASE_IMAGE=//p' "$(dirname "$0")/Dockerfile")
if "$DOCKER" image inspect "$OFFICIAL" >/dev/null 2>&1 || "$DOCKER" pull --quiet "$OFFICIAL" >/dev/null 2>&1; then
  echo "$OFFICIAL" >&3
  exit 0
fi
TAG=vae-base:bookworm-python3.11
echo "cannot pull $OFFICIAL: building $TAG from Debian packages"
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv  # python3.11 and its ensurepip (pip for the venv the Dockerfile makes)
CACHE=${BUILD_DIR:-build/image}/base
TARBALL=$CACHE/$SUITE-python3.11.tar

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG" >&3
  exit 0
fi

if [ ! -s "$TARBALL" ]; then
  [ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root (or a cached $TARBALL)" >&2; exit 1; }
  command -v debootstrap >/dev/null || { echo "error: debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
  mkdir -p "$CACHE"
  rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  # What the official slim image leaves out too: package lists and caches, docs, man pages, locales.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache
  tar --numeric-owner --sort=name -C "$rootfs" -cf "$TARBALL.part" .
  mv "$TARBALL.part" "$TARBALL"
fi

"$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $SUITE + $PACKAGES ($MIRROR)" \
  "$TARBALL" "$TAG" >/dev/null
echo "imported $TARBALL ($(du -h "$TARBALL" | cut -f1)) as $TAG"
echo "$TAG" >&3
