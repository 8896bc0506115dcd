#!/usr/bin/env bash
# Benchmark: a task graph against the same work run level by level. Twelve rehearsed agent tasks
# (the real `claude` CLI, the scripted model answering every turn after 2 s) in four chains of
# three levels, with uneven lengths (in model turns):
#   chain a: 3, 1, 1     chain b: 1, 3, 1     chain c: 1, 1, 3     chain d: 1, 1, 1
#   graph   one fan-out with `id`/`after`: each task starts when its own predecessor is done
#   levels  three flat maps (level 2 needs level 1 needs level 0): each level waits for the
#           slowest task of the one before
# Both at -j12, in alternating rounds. Reports the makespans, the graph's critical path (the
# longest chain of its tasks' own durations, from the run's events) and the ratio of the
# graph's makespan to it (the aim: at most 1.10).
#   bench/graph-vs-levels.sh      (env REPS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
claude=$(scripts/ensure-claude.sh)
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# turns <n>: n-1 writes, then the answer.
turns() {
  local n=$1 out="" k
  for k in $(seq 1 $((n - 1))); do
    out="$out{ tools = [{ name = \"Write\", input = { file_path = \"{{cwd}}/t$k.txt\", content = \"$k\\\\n\" } }] }, "
  done
  printf 'turns = [%s{ text = "done" }]\n' "$out"
}
# The length of each task, by chain and level.
declare -A len=([a0]=3 [a1]=1 [a2]=1 [b0]=1 [b1]=3 [b2]=1 [c0]=1 [c1]=1 [c2]=3 [d0]=1 [d1]=1 [d2]=1)
chains="a b c d"

{
  echo "turn_delay_ms = 2000"
  for ch in $chains; do
    for l in 0 1 2; do
      printf '[tasks."g[%s%s]"]\n' "$ch" "$l"; turns "${len[$ch$l]}"
      i=$(( $(printf '%d' "'$ch") - 97 ))
      printf '[tasks."l%s[%s]"]\n' "$l" "$i"; turns "${len[$ch$l]}"
    done
  done
} > "$work/script.toml"

for side in graph levels; do
  mkdir -p "$work/$side"
  (
    cd "$work/$side"
    git init -q
    printf '.ccluster/\n' > .gitignore
    if [ "$side" = graph ]; then
      items=""
      for ch in $chains; do
        items="$items{ id = \"${ch}0\" }, { id = \"${ch}1\", after = [\"${ch}0\"] }, { id = \"${ch}2\", after = [\"${ch}1\"] }, "
      done
      printf 'version = 1\n[tasks.g]\nmap = [%s]\nid = "{{ item.id }}"\nafter = "{{ item.after | default([]) }}"\nprompt = "task {{ item.id }}"\n' "${items%, }" > clusterfile.toml
    else
      {
        echo 'version = 1'
        printf '[tasks.l0]\nmap = ["a", "b", "c", "d"]\nprompt = "task {{ item }}0"\n'
        printf '[tasks.l1]\nneeds = ["l0"]\nmap = ["a", "b", "c", "d"]\nprompt = "task {{ item }}1"\n'
        printf '[tasks.l2]\nneeds = ["l1"]\nmap = ["a", "b", "c", "d"]\nprompt = "task {{ item }}2"\n'
      } > clusterfile.toml
    fi
    git add -A
    git -c user.name=b -c user.email=b@l commit -q -m init
  )
done

now() { date +%s.%N; }
apply() { # side -> seconds; the events in $work/<side>.jsonl
  local t0 t1
  t0=$(now)
  (cd "$work/$1" && CCLUSTER_CLAUDE_BIN="$claude" "$bin" apply --rehearse --script "$work/script.toml" \
    --fresh --jobs 12 --output json > "$work/$1.jsonl" 2> "$work/$1.err") \
    || { cat "$work/$1.err" >&2; exit 1; }
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}
# The graph's critical path: the longest chain of its tasks' own durations (started -> succeeded).
critical() {
  python3 - "$1" <<'PY'
import json, sys
start, end = {}, {}
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["event"] == "task_started": start[e["task"]] = e["time_ms"]
    if e["event"] == "task_succeeded": end[e["task"]] = e["time_ms"]
chains = [[f"g[{c}{l}]" for l in range(3)] for c in "abcd"]
print(max(sum(end[t] - start[t] for t in ch) for ch in chains) / 1000)
PY
}
for round in $(seq 1 "$reps"); do
  if [ $((round % 2)) = 1 ]; then g=$(apply graph); l=$(apply levels); else l=$(apply levels); g=$(apply graph); fi
  cp=$(critical "$work/graph.jsonl")
  printf 'round %s: graph %6.2f s | levels %6.2f s | graph critical path %6.2f s | graph / critical path %.3fx | levels / graph %.2fx\n' \
    "$round" "$g" "$l" "$cp" "$(echo "$g / $cp" | bc -l)" "$(echo "$l / $g" | bc -l)"
done
