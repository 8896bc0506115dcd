#!/usr/bin/env bash
# Prometheus 2.x for the metrics tests: a real server that scrapes ccluster's /metrics on 127.0.0.1.
#
#   scripts/prometheus-for-tests.sh    prints one line, `PROMETHEUS=<path>`
#
# Installs Debian's `prometheus` package with apt-get when it is missing (as root). The package's
# maintainer scripts would start a system-wide Prometheus listening on :9090; the tests start their
# own on port 0 instead, so the install forbids service starts (policy-rc.d exiting 101) and stops,
# by its PID, any daemon that was started all the same.
# Fails loudly (exit 1, the reason on stderr) when it cannot: the metrics tests never skip.
set -euo pipefail

find_bin() {
  prometheus=$(command -v prometheus || true)
}

# PIDs of Prometheus daemons run as the package's system user (what its init script starts), so
# that no test's own Prometheus (run as the test's user) is ever taken for one.
prometheus_pids() {
  pgrep -x -u prometheus prometheus 2>/dev/null || true
}

find_bin
if [ -z "$prometheus" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: prometheus is needed (apt-get install prometheus)" >&2
    exit 1
  fi
  # Tests start in parallel: one installs, the others wait for it.
  mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/ccluster"
  exec 9>"${XDG_CACHE_HOME:-$HOME/.cache}/ccluster/prometheus.lock"
  flock 9
  find_bin
  if [ -z "$prometheus" ]; then
    echo "installing prometheus with apt-get" >&2
    before=$(prometheus_pids)
    policy=/usr/sbin/policy-rc.d
    policy_was_there=
    if [ -e "$policy" ]; then
      policy_was_there=1
    else
      # invoke-rc.d and deb-systemd-invoke ask this script; 101 means "action forbidden".
      printf '#!/bin/sh\nexit 101\n' >"$policy"
      chmod 755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends prometheus >&2 \
      || { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends prometheus >&2; }
    if [ -z "$policy_was_there" ]; then
      rm -f "$policy"
      trap - EXIT
    fi
    # A daemon that the postinst started anyway (no init system honouring policy-rc.d): stop it.
    for pid in $(prometheus_pids); do
      case " $(echo $before) " in *" $pid "*) continue ;; esac
      echo "stopping the prometheus daemon the package started (pid $pid)" >&2
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    done
    find_bin
  fi
fi
[ -n "$prometheus" ] || { echo "error: no prometheus after installing it" >&2; exit 1; }
version=$("$prometheus" --version 2>&1 | head -n1) || { echo "error: $prometheus does not run" >&2; exit 1; }
case "$version" in
  "prometheus, version 2."*) ;;
  *) echo "error: Prometheus 2.x is needed, $prometheus says: $version" >&2; exit 1 ;;
esac
echo "PROMETHEUS=$prometheus"
