#!/usr/bin/env bash
# A private Docker daemon for the tests, in a network namespace of its own.
#
#   scripts/docker-for-tests.sh start DIR   starts dockerd with its state, socket and pid file under
#                                           DIR, inside `unshare -n` (containers get addresses in
#                                           192.0.2.0/24 there and can reach nothing else), imports
#                                           the test image, and prints `DOCKER_HOST=unix://DIR/docker.sock`
#   scripts/docker-for-tests.sh start DIR debian
#                                           the same, and imports the glibc image too
#   scripts/docker-for-tests.sh stop DIR    stops that daemon by its pid and waits for it to go
#
# Run a program in the daemon's network namespace (where its networks' gateways are) with
#   nsenter --net=/proc/$(cat DIR/docker.pid)/ns/net PROGRAM
#
# Installs Debian's docker.io and busybox-static when they are missing. No registry is ever
# contacted: the test images are imported from root filesystems built here and cached in
# ~/.cache/ccluster/images/, keyed by what they are built from.
#   ccluster-test/busybox:1   busybox's shell and tools, nothing else (from busybox-static)
#   ccluster-test/debian:1    Debian bookworm minbase with git: glibc, bash (debootstrap)
set -euo pipefail

image=ccluster-test/busybox:1

need() { # installs Debian package $2 when command $1 is missing
  command -v "$1" >/dev/null 2>&1 && return
  echo "installing $2" >&2
  apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null; }
}

start() {
  local dir=$1 images=$2
  # Tests start daemons in parallel: installing packages and building images go one at a time.
  mkdir -p "$HOME/.cache/ccluster/images"
  exec 9> "$HOME/.cache/ccluster/images/.lock"
  flock 9
  need dockerd docker.io
  need busybox busybox-static
  need unshare util-linux
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # The daemon alone in a new network namespace, with loopback up: its bridge and containers
  # live there; the socket is a file, reachable from outside.
  # The networks it makes (the `api-only` one) take addresses from a documentation range too.
  unshare -n --fork sh -c "ip link set lo up 2>/dev/null || true; exec dockerd \
      --data-root '$dir/data' --exec-root '$dir/exec' --pidfile '$dir/docker.pid' \
      -H 'unix://$dir/docker.sock' --bip 192.0.2.1/24 \
      --default-address-pool base=198.51.100.0/24,size=26 --log-level warn" \
    > "$dir/dockerd.log" 2>&1 9>&- &
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
  if [ "$images" = debian ] && ! docker image inspect ccluster-test/debian:1 >/dev/null 2>&1; then
    debian_image
  fi
  exec 9>&-
  echo "DOCKER_HOST=$DOCKER_HOST"
}

# Debian bookworm, minbase variant, with git: what an agent's container needs (the `claude` CLI
# is a glibc executable, mounted from the host; its Bash tool wants bash).
debian_image() {
  local rootfs="$HOME/.cache/ccluster/images/debian-bookworm-minbase-git-1.tar"
  if [ ! -s "$rootfs" ]; then
    need debootstrap debootstrap
    local tree
    tree=$(mktemp -d)
    echo "building the Debian test image (debootstrap, about a minute; cached)" >&2
    debootstrap --variant=minbase --include=git bookworm "$tree" http://deb.debian.org/debian \
      > "$tree.log" 2>&1 || { tail -20 "$tree.log" >&2; exit 1; }
    rm -rf "$tree"/var/cache/apt/archives/*.deb "$tree"/var/lib/apt/lists/* "$tree"/usr/share/doc \
      "$tree"/usr/share/man "$tree"/usr/share/locale "$tree"/usr/share/info "$tree.log"
    mkdir -p "$(dirname "$rootfs")"
    tar -C "$tree" -cf "$rootfs.part" . && mv "$rootfs.part" "$rootfs"
    rm -rf "$tree"
  fi
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$rootfs" ccluster-test/debian:1 >/dev/null
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
  start) start "${2:?a directory}" "${3:-}" ;;
  stop) stop "${2:?a directory}" ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
