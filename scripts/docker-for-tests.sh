#!/usr/bin/env bash
# A private Docker daemon for the tests, in a network namespace of its own.
#
#   scripts/docker-for-tests.sh start DIR   starts dockerd with its state, socket and pid file under
#                                           DIR, inside `unshare -n` (containers get addresses in
#                                           192.0.2.0/24 there and can reach nothing else), imports
#                                           the test image, and prints `DOCKER_HOST=unix://DIR/docker.sock`
#   scripts/docker-for-tests.sh stop DIR    stops that daemon by its pid and waits for it to go
#
# Installs Debian's docker.io and busybox-static when they are missing. The test image,
# `ccluster-test/busybox:1` (busybox's shell and tools, nothing else), is built from the
# busybox-static package: no registry is ever contacted. Its root filesystem is cached in
# ~/.cache/ccluster/images/, keyed by busybox's version.
set -euo pipefail

image=ccluster-test/busybox:1

need() { # installs Debian package $2 when command $1 is missing
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2" >&2
  apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null; }
}

start() {
  local dir=$1
  need dockerd docker.io
  need busybox busybox-static
  need unshare util-linux
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # The daemon alone in a new network namespace, with loopback up: its bridge and containers
  # live there; the socket is a file, reachable from outside.
  unshare -n --fork sh -c "ip link set lo up 2>/dev/null || true; exec dockerd \
      --data-root '$dir/data' --exec-root '$dir/exec' --pidfile '$dir/docker.pid' \
      -H 'unix://$dir/docker.sock' --bip 192.0.2.1/24 --log-level warn" \
    > "$dir/dockerd.log" 2>&1 &
  export DOCKER_HOST="unix://$dir/docker.sock"
  for _ in $(seq 1 150); do
    if [ -S "$dir/docker.sock" ] && docker version >/dev/null 2>&1; then
      break
    fi
    sleep 0.1
  done
  docker version >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -20 "$dir/dockerd.log" >&2; exit 1; }
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    local version rootfs
    version=$(dpkg-query -W -f '${Version}' busybox-static 2>/dev/null || echo unknown)
    rootfs="$HOME/.cache/ccluster/images/busybox-$version.tar"
    if [ ! -s "$rootfs" ]; then
      local tree
      tree=$(mktemp -d)
      mkdir -p "$tree/bin" "$tree/tmp" "$tree/etc"
      chmod 1777 "$tree/tmp"
      cp "$(command -v busybox)" "$tree/bin/busybox"
      for applet in $("$tree/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$tree/bin/$applet"
      done
      printf 'root:x:0:0:root:/root:/bin/sh\n' > "$tree/etc/passwd"
      printf 'root:x:0:\n' > "$tree/etc/group"
      mkdir -p "$(dirname "$rootfs")"
      tar -C "$tree" -cf "$rootfs.part" . && mv "$rootfs.part" "$rootfs"
      rm -rf "$tree"
    fi
    docker import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$rootfs" "$image" >/dev/null
  fi
  echo "DOCKER_HOST=$DOCKER_HOST"
}

stop() {
  local dir=$1 pid
  pid=$(cat "$dir/docker.pid" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
  start) start "${2:?a directory}" ;;
  stop) stop "${2:?a directory}" ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
