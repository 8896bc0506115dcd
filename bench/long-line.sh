#!/usr/bin/env bash
# Benchmark: one agent whose answer is a single 16 MB text, so the real `claude` CLI prints
# stream-json lines of 16 MB (the assistant message and the result). Reports ccluster's own CPU
# time and peak memory (not its worker's): the cost of reading long lines.
#   bench/long-line.sh            (the release build of this tree)
#   BIN=/path/to/ccluster bench/long-line.sh   (another build, for a side-by-side figure)
set -euo pipefail
cd "$(dirname "$0")/.."
claude=$(scripts/ensure-claude.sh)
size=${SIZE:-16000000}
if [ -z "${BIN:-}" ]; then
  cargo build --release -p ccluster --quiet
  BIN=$(pwd)/target/release/ccluster
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/script.toml" "$size" <<'PY'
import sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "w") as f:
    f.write('[tasks.long]\nturns = [{ text = "' + "x" * size + '" }]\n')
PY
mkdir -p "$work/repo"
cd "$work/repo"
git init -q
printf '.ccluster/\n' > .gitignore
printf 'version = 1\n[tasks.long]\nprompt = "answer at length"\n' > clusterfile.toml
git add -A
git -c user.name=b -c user.email=b@l commit -q -m init
for i in 1 2 3; do
  CCLUSTER_CLAUDE_BIN="$claude" CCLUSTER_SELF_USAGE="$work/self" \
    "$BIN" apply --rehearse --script "$work/script.toml" --fresh > "$work/apply.log" 2>&1 \
    || { cat "$work/apply.log"; exit 1; }
  read -r user sys rss < "$work/self"
  longest=$(ls -t .ccluster/runs/*/logs/long.1.out | head -1 | xargs awk '{ if (length($0) > m) m = length($0) } END { print m }')
  printf 'run %d: ccluster itself %.2f CPU-s, %d MB peak (longest stream-json line: %s bytes)\n' \
    "$i" "$(echo "$user + $sys" | bc -l)" "$((rss / 1024))" "$longest"
done
