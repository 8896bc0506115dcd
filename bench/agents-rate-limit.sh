#!/usr/bin/env bash
# Benchmark: agent slots that adapt to the API's rate limits, side by side with fixed slots.
# 24 rehearsed agent tasks (AGENTS), each of TURNS model requests, against ccluster's scripted
# model server enforcing a token bucket of RPM requests a minute (BURST at once; 429 with
# `retry-after` beyond it) and answering 529 to everything for 2 s, 5 s after its start. Each
# task's retry policy allows 4 retries. Three ways, each from a fresh state:
#   adaptive     --agents 24            (slots halve on 429/529 and grow back)
#   fixed 24     --agents 24 --no-adapt
#   fixed 4      --agents 4  --no-adapt
# Reports the makespan, the ideal the rate limit allows ((requests - burst) / rate), tasks that
# succeeded, attempts beyond the first, tasks that exhausted their retries, and requests the
# server refused (429 and 529, from the run's rehearsal.jsonl).
#   bench/agents-rate-limit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
agents=${AGENTS:-24}
turns=${TURNS:-3}
rpm=${RPM:-120}
burst=${BURST:-4}
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
CCLUSTER_CLAUDE_BIN="$(scripts/ensure-claude.sh)"
export CCLUSTER_CLAUDE_BIN
out=$(pwd)/bench/out/rate-limit
rm -rf "$out"; mkdir -p "$out"

python3 - "$out" "$agents" "$turns" "$rpm" "$burst" <<'PY'
import sys
out, agents, turns, rpm, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
with open(f"{out}/clusterfile.toml", "w") as f:
    f.write('version = 1\n[workflow]\nname = "limited"\n[defaults]\ntimeout = "10m"\nretry = { limit = 4 }\n')
    for k in range(agents):
        f.write(f'[tasks.a{k}]\nprompt = "Part {k}"\n')
# Every task: TURNS - 1 turns that write a file (each a request), then its answer.
with open(f"{out}/script.toml", "w") as f:
    f.write(f"rate_limit = {{ per_minute = {rpm}, burst = {burst} }}\n")
    f.write("overloaded = [{ from_ms = 5000, for_ms = 2000 }]\n")
    for k in range(agents):
        steps = [f'{{ tools = [{{ name = "Write", input = {{ file_path = "{{{{cwd}}}}/out/a{k}-{t}.txt", content = "{t}" }} }}] }}'
                 for t in range(turns - 1)] + ['{ text = "done" }']
        f.write(f"[tasks.a{k}]\nturns = [{', '.join(steps)}]\n")
PY
mkdir -p "$out/out"; echo x > "$out/out/.keep"
(cd "$out" && git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm init)

run() { # name, extra args...
  local name=$1; shift
  rm -rf "$out/.ccluster"
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$out" && "$bin" apply --rehearse --script script.toml --output json "$@" > "$out/$name.jsonl" 2> "$out/$name.err") || true
  t1=$(date +%s.%N)
  local run_id
  run_id=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["run"])' "$out/$name.jsonl")
  python3 - "$name" "$out/$name.jsonl" "$out/.ccluster/runs/$run_id/rehearsal.jsonl" "$t0" "$t1" <<'PY'
import json, sys
name, events, rehearsal, t0, t1 = sys.argv[1:6]
ev = [json.loads(l) for l in open(events) if l.startswith("{")]
ok = sum(1 for e in ev if e["event"] == "task_succeeded")
failed = sum(1 for e in ev if e["event"] == "task_failed")
retries = sum(1 for e in ev if e["event"] == "task_retrying")
cuts = sum(1 for e in ev if e["event"] == "warning" and "agent slots" in e.get("message", ""))
answers = [json.loads(l)["answer"] for l in open(rehearsal)]
print(f"{name:12} makespan {float(t1) - float(t0):6.1f} s  succeeded {ok:3}  failed {failed:2}  "
      f"retried attempts {retries:3}  requests {len(answers):4}  refused 429 {answers.count('429'):4}  "
      f"529 {answers.count('529'):3}  slot cuts {cuts}")
PY
}

requests=$((agents * turns))
ideal=$(python3 -c "print(f'{max(0, $requests - $burst) / ($rpm / 60):.1f}')")
echo "== $agents agent tasks x $turns requests = $requests requests; limit $rpm/min, burst $burst; 529s for 2 s at 5 s"
echo "   ideal makespan under the limit: ${ideal} s (requests beyond the burst at the limit's rate)"
run adaptive --agents "$agents"
run fixed-$agents --agents "$agents" --no-adapt
run fixed-4 --agents 4 --no-adapt
