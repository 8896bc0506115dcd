#!/usr/bin/env bash
# Prints the path of a `claude` CLI of the version ccluster is tested with, installing it from the
# npm registry into ~/.cache/ccluster/claude-<version> when it is not there yet. Fails loudly (exit 1,
# with the reason on stderr) when it cannot: tests that need the CLI must not skip.
#   scripts/ensure-claude.sh            -> /root/.cache/ccluster/claude-2.1.331/node_modules/.bin/claude
set -euo pipefail
version=2.1.331
prefix="${XDG_CACHE_HOME:-$HOME/.cache}/ccluster/claude-$version"
bin="$prefix/node_modules/.bin/claude"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "^$version "; then
  echo "$bin"
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing npm with apt-get" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q npm >&2
  else
    echo "error: npm is needed to install Claude Code $version (apt-get install npm)" >&2
    exit 1
  fi
fi
echo "installing @anthropic-ai/claude-code@$version into $prefix" >&2
mkdir -p "$prefix"
# A lock, so parallel callers (tests) install once.
exec 9>"$prefix.lock"
flock 9
if ! { [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "^$version "; }; then
  npm install --no-audit --no-fund --loglevel=error --prefix "$prefix" "@anthropic-ai/claude-code@$version" >&2
fi
"$bin" --version >/dev/null || { echo "error: the installed claude does not run: $bin" >&2; exit 1; }
echo "$bin"
