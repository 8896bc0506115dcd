#!/usr/bin/env bash
# Benchmark: `ccluster apply` against ninja (Debian's ninja-build) on the same DAG, side by side:
# N independent tasks each running `touch out/tK`, plus one task depending on all, at -j2.
# Reports cold run wall time (and the ccluster/ninja ratio), no-op re-run wall time, peak RSS.
#   bench/apply-vs-ninja.sh [N ...]      (default: 1000 10000)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ninja >/dev/null || { echo "ninja is required: apt-get install ninja-build" >&2; exit 1; }
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(1000 10000)

timed() { # prints "seconds peak_kb" of a command, its output discarded
  local t; t=$(mktemp)
  /usr/bin/time -o "$t" -f "%e %M" "$@" > /dev/null 2>&1
  tail -n 1 "$t"; rm -f "$t"
}

for n in "${sizes[@]}"; do
  dir=bench/out/touch-$n
  rm -rf "$dir"; mkdir -p "$dir"
  python3 - "$dir" "$n" <<'PY'
import sys
d, n = sys.argv[1], int(sys.argv[2])
with open(f"{d}/clusterfile.toml", "w") as f:
    f.write('version = 1\n[workflow]\nname = "touch"\n')
    for k in range(n):
        f.write(f'[tasks.t{k}]\nrun = "touch out/t{k}"\n')
    f.write('[tasks.all]\nneeds = [' + ", ".join(f'"t{k}"' for k in range(n)) + ']\nrun = "touch out/all"\n')
with open(f"{d}/build.ninja", "w") as f:
    f.write("rule touch\n  command = touch $out\n")
    for k in range(n):
        f.write(f"build out/t{k}: touch\n")
    f.write("build out/all: touch | " + " ".join(f"out/t{k}" for k in range(n)) + "\n")
PY
  (
    cd "$dir"
    mkdir -p out
    read -r nc nm <<<"$(timed ninja -j2)"
    read -r nn nnm <<<"$(timed ninja -j2)"
    rm -rf out .ninja_log .ninja_deps; mkdir -p out
    read -r cc cm <<<"$(timed "$bin" apply -j2)"
    read -r cn cnm <<<"$(timed "$bin" apply -j2)"
    test -f out/all
    ratio=$(echo "scale=2; $cc / $nc" | bc)
    printf 'N=%-6s cold: ccluster %6.2fs  ninja %6.2fs  ratio %5sx | no-op: ccluster %5.2fs  ninja %5.2fs | peak RSS: ccluster %6.1f MB  ninja %5.1f MB\n' \
      "$n" "$cc" "$nc" "$ratio" "$cn" "$nn" "$(echo "scale=1; $cm/1024" | bc)" "$(echo "scale=1; $nm/1024" | bc)"
  )
done
