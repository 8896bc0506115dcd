#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the dashboard tests (tests/cli/dashboard.rs).
#
#   scripts/chromium-for-tests.sh    prints two lines, `CHROMIUM=<path>` and `CHROMEDRIVER=<path>`
#
# Installs Debian's `chromium` and `chromium-driver` with apt-get when they are missing (as root).
# Fails loudly (exit 1, the reason on stderr) when it cannot: the dashboard tests never skip.
set -euo pipefail

find_bins() {
  chromium=$(command -v chromium || true)
  chromedriver=$(command -v chromedriver || true)
}

find_bins
if [ -z "$chromium" ] || [ -z "$chromedriver" ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: chromium and chromium-driver are needed (apt-get install chromium chromium-driver)" >&2
    exit 1
  fi
  # Tests start in parallel: one installs, the others wait for it.
  mkdir -p "${XDG_CACHE_HOME:-$HOME/.cache}/ccluster"
  exec 9>"${XDG_CACHE_HOME:-$HOME/.cache}/ccluster/chromium.lock"
  flock 9
  find_bins
  if [ -z "$chromium" ] || [ -z "$chromedriver" ]; then
    echo "installing chromium and chromium-driver with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >&2 \
      || { apt-get update -q >&2 && apt-get install -y -q chromium chromium-driver >&2; }
    find_bins
  fi
fi
[ -n "$chromium" ] || { echo "error: no chromium after installing it" >&2; exit 1; }
[ -n "$chromedriver" ] || { echo "error: no chromedriver after installing chromium-driver" >&2; exit 1; }
"$chromium" --version >/dev/null 2>&1 || { echo "error: $chromium does not run" >&2; exit 1; }
echo "CHROMIUM=$chromium"
echo "CHROMEDRIVER=$chromedriver"
