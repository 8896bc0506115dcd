#!/usr/bin/env bash
# Benchmark: `ccluster plan --format json` on generated workflows with 10,000 statically mapped
# task instances, and on a chain of 10,000 tasks. Prints the median wall time and peak RSS of
# several runs.
#   bench/plan-10k.sh [RUNS]     (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -p ccluster --quiet
bin=target/release/ccluster
out=bench/out
mkdir -p "$out"

# 1. One agent task mapped over 10,000 items, each prompt rendered from its item, plus a fan-in.
python3 - "$out/map-10k.toml" <<'PY'
import json, sys
items = [f"src/module_{i:05}.rs" for i in range(10_000)]
with open(sys.argv[1], "w") as f:
    f.write("version = 1\n[workflow]\nname = \"map-10k\"\n\n")
    f.write("[inputs.files]\ntype = \"list\"\ndefault = " + json.dumps(items) + "\n\n")
    f.write("[defaults.claude]\nmodel = \"sonnet\"\nmax_turns = 10\n\n")
    f.write("[tasks.refactor]\nmap = \"{{ inputs.files }}\"\nmax_parallel = 8\n")
    f.write("prompt = \"Refactor {{ item }} (file {{ index + 1 }} of {{ inputs.files | length }}) to the new error type.\"\n\n")
    f.write("[tasks.merge]\nneeds = [\"refactor\"]\nmerge = { strategy = \"git\" }\n")
PY

# 2. 100 tasks, each statically mapped over 100 literal items (10,000 instances), in a chain of
#    fan-ins so the graph has real depth.
python3 - "$out/grid-100x100.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("version = 1\n[workflow]\nname = \"grid\"\n\n")
    items = ", ".join(f'"k{j}"' for j in range(100))
    for i in range(100):
        f.write(f"[tasks.t{i}]\nmap = [{items}]\nrun = \"echo {{{{ item }}}}-{{{{ index }}}} > out/t{i}-{{{{ index }}}}\"\n")
        if i > 0:
            f.write(f"needs = [\"g{i-1}\"]\n")
        f.write(f"\n[tasks.g{i}]\nneeds = [\"t{i}\"]\nmerge = {{ strategy = \"collect\" }}\n\n")
PY

# 3. A chain of 10,000 tasks, each needing the one before: the graph at its deepest. Every tenth
#    task reads the output of the task ten needs up.
python3 - "$out/chain-10k.toml" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    f.write("version = 1\n[workflow]\nname = \"chain\"\n\n")
    for i in range(10_000):
        run = f"echo {{{{ tasks.t{i - 10}.output }}}}" if i >= 10 and i % 10 == 0 else f"echo {i}"
        f.write(f"[tasks.t{i}]\nrun = \"{run}\"\n")
        if i > 0:
            f.write(f"needs = [\"t{i - 1}\"]\n")
        f.write("\n")
PY

measure() {
  local file=$1 times=() rss=()
  "$bin" plan --format json "$file" > "$out/plan.json"   # warm the page cache
  for _ in $(seq "$runs"); do
    read -r t m < <( { /usr/bin/time -f "%e %M" "$bin" plan --format json "$file" > /dev/null; } 2>&1 )
    times+=("$t"); rss+=("$m")
  done
  local mt mr
  mt=$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  mr=$(printf '%s\n' "${rss[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  local nodes
  nodes=$(python3 -c "import json;print(json.load(open('$out/plan.json'))['summary']['nodes'])")
  printf '%-22s nodes=%-6s wall=%6.0f ms  peak_rss=%6.1f MB  (median of %s runs)\n' \
    "$(basename "$file")" "$nodes" "$(echo "$mt * 1000" | bc)" "$(echo "scale=1; $mr / 1024" | bc)" "$runs"
}

measure "$out/map-10k.toml"
measure "$out/grid-100x100.toml"
measure "$out/chain-10k.toml"
