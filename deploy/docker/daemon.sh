#!/usr/bin/env bash
# A Docker daemon of the build's own, for building and running the image where no Docker is set up.
#
#   deploy/docker/daemon.sh install    # apt-get install docker.io containerd runc debootstrap where missing (root)
#   deploy/docker/daemon.sh start      # start dockerd (no-op when it answers)
#   deploy/docker/daemon.sh env        # what to talk to it with: DOCKER_HOST, DOCKER (the CLI), DOCKER_BUILDKIT
#   deploy/docker/daemon.sh stop       # stop it (SIGTERM, then wait for it to exit)
#   eval "$(deploy/docker/daemon.sh env)" && deploy/docker/build.sh cpu      # e.g.
#
# Everything of the daemon lives under build/image/docker/ (BUILD_DIR overrides build/image): its socket,
# pidfile, data root (images, build cache: kept between runs) and exec root (its managed containerd's state).
# It never changes the host's networking: no bridge (`--bridge=none`), no firewall rules (`--iptables=false
# --ip6tables=false --ip-masq=false`), no sysctl (`--ip-forward=false`). Containers therefore run with
# `--network host` or `--network none` only; builds use `--network none` (the wheelhouse makes them offline).
set -euo pipefail

ROOT=${BUILD_DIR:-build/image}/docker
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
SOCKET=$ROOT/docker.sock
PIDFILE=$ROOT/dockerd.pid
export DOCKER_HOST=unix://$SOCKET
PACKAGES=(docker.io containerd runc debootstrap)

# The CLI packaged with this dockerd (docker.io) builds with the daemon's BuildKit; another docker on PATH
# (a newer CLI without the buildx plugin) would refuse BuildKit.
packaged=$(dpkg-query -L docker.io 2>/dev/null | awk '/\/bin\/docker$/ && !found { print; found = 1 }') || true
DOCKER=${packaged:-$(command -v docker || echo docker)}
answers() { "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

case ${1:-} in
install)
  missing=()
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
  done
  [ ${#missing[@]} = 0 ] && exit 0
  [ "$(id -u)" = 0 ] || { echo "error: as root: apt-get install -y ${missing[*]}" >&2; exit 1; }
  echo "installing Debian packages: ${missing[*]}"
  # Debian's policy-rc.d convention: the packages must not start a system-wide daemon (with its bridge and
  # firewall rules). Where the host has no policy, one that denies every start is in place for the install.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e $policy ]; then
    printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && own_policy=1
  fi
  status=0
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } || status=$?
  [ $own_policy = 1 ] && rm -f $policy
  exit $status
  ;;
env)
  printf 'export DOCKER_HOST=%s DOCKER=%s DOCKER_BUILDKIT=1\n' "$DOCKER_HOST" "$DOCKER"
  ;;
start)
  if answers; then echo "dockerd answers on $SOCKET"; exit 0; fi
  [ "$(id -u)" = 0 ] || { echo "error: dockerd needs root" >&2; exit 1; }
  command -v dockerd >/dev/null || { echo "error: no dockerd: run '$0 install' first" >&2; exit 1; }
  rm -f "$SOCKET" "$PIDFILE"
  nohup dockerd \
    --host "$DOCKER_HOST" --pidfile "$PIDFILE" \
    --data-root "$ROOT/data" --exec-root "$ROOT/exec" \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false \
    --log-level warn >"$ROOT/dockerd.log" 2>&1 </dev/null &
  for _ in $(seq 300); do
    if answers; then echo "dockerd started on $SOCKET"; exit 0; fi
    kill -0 $! 2>/dev/null || break
    sleep 0.1
  done
  echo "error: dockerd did not answer on $SOCKET; its log ($ROOT/dockerd.log) ends:" >&2
  tail -20 "$ROOT/dockerd.log" >&2
  exit 1
  ;;
stop)
  [ -s "$PIDFILE" ] || exit 0
  pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || exit 0
  # dockerd stops its containers (their stop timeouts) and its containerd, then exits; it leaves its network
  # namespace file (exec root's netns/default) mounted, so that is unmounted after it.
  for _ in $(seq 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
      awk -v root="$ROOT/" 'index($2, root) == 1 { print $2 }' /proc/self/mounts | sort -r | xargs -r umount
      exit 0
    fi
    sleep 0.1
  done
  echo "error: dockerd ($pid) still runs 60 s after SIGTERM" >&2
  exit 1
  ;;
*)
  echo "usage: $0 install|start|env|stop" >&2
  exit 2
  ;;
esac
