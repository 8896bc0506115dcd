#!/usr/bin/env bash
# Benchmark: `ccluster serve` watching runs (each run: a gate task, then a task mapped over
# 1,000 or 10,000 items), side by side with what a user would otherwise do
# (poll `ccluster status`).
#   1. 100 SSE clients (CLIENTS) follow a 1,000-task run (TASKS) started in a terminal: delay from
#      an event's line being written (right after its commit) to its arrival at every client,
#      p50/p99, and the server's CPU time over the run. Beside it: one `ccluster status --json`
#      of the same run in progress (wall and CPU), which a poller pays per look.
#   2. GET of a finished run with 10,000 tasks (BIG): cold (first read of its archive) and warm
#      (median of 20).
#   3. The dashboard's first paint of that run in headless Chromium (chromedriver): first
#      contentful paint and the time until its task graph is drawn, median of 5.
# Release builds. Prints a summary at the end.
#   bench/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${CLIENTS:-100}
tasks=${TASKS:-1000}
big=${BIG:-10000}
cargo build --release -p ccluster --quiet
cargo build --release -p ccluster --example sse-clients --quiet
bin=$(pwd)/target/release/ccluster
sse=$(pwd)/target/release/examples/sse-clients
out=$(pwd)/bench/out/serve
rm -rf "$out"; mkdir -p "$out"
port=$((20000 + RANDOM % 20000))
base=http://127.0.0.1:$port
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

workflow() { # dir tasks gated shape: a gate task, then TASKS tasks after it: one task mapped over
  # TASKS items (shape `map`, as a big run is written), or TASKS tasks of their own (`tasks`)
  python3 - "$@" <<'PY'
import sys
d, n, gated, shape = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
with open(f"{d}/clusterfile.toml", "w") as f:
    f.write('version = 1\n[workflow]\nname = "wide"\n')
    f.write('[tasks.gate]\nrun = "%s"\n' % ("while [ ! -e gate ]; do sleep 0.01; done" if gated else "true"))
    if shape == "map":
        f.write('[tasks.work]\nneeds = ["gate"]\nmap = [' + ", ".join(str(k) for k in range(n)) + ']\nrun = "true"\n')
    else:
        for k in range(n):
            f.write(f'[tasks.t{k}]\nneeds = ["gate"]\nrun = "true"\n')
PY
}

# --- 1. SSE clients following a run, of each shape -----------------------------------------
for shape in tasks map; do
  repo=$out/live-$shape
  mkdir -p "$repo"
  workflow "$repo" "$tasks" 1 "$shape"
  (cd "$repo" && git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm init)
  "$bin" serve --addr "127.0.0.1:$port" --repo "$repo" > "$out/serve.log" 2>&1 &
  server=$!; pids+=("$server")
  for _ in $(seq 100); do curl -sf "$base/api/v1/health" >/dev/null && break; sleep 0.1; done
  (cd "$repo" && "$bin" apply --output json --jobs 2 > "$out/apply.jsonl" 2>"$out/apply.err") &
  apply=$!; pids+=("$apply")
  run=""
  for _ in $(seq 200); do
    run=$(curl -sf "$base/api/v1/runs?state=running" | python3 -c 'import json,sys; r=json.load(sys.stdin)["runs"]; print(r[0]["id"] if r else "")')
    [ -n "$run" ] && break; sleep 0.05
  done
  [ -n "$run" ] || { echo "the run never showed" >&2; exit 1; }
  cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
  # One `status` of the run in progress, as a poller would pay for it.
  status_t=$(mktemp)
  (cd "$repo" && /usr/bin/time -o "$status_t" -f "%e %U %S" "$bin" status --json > /dev/null 2>&1)
  status_wall=$(awk '{ print $1 }' "$status_t"); status_cpu=$(awk '{ printf "%.2f", $2 + $3 }' "$status_t")
  before=$(cpu "$server"); t0=$(date +%s.%N)
  "$sse" "$base" "$run" "$repo/.ccluster/runs/$run/events.jsonl" "$clients" "$repo/gate" | tee "$out/sse-$shape.txt"
  t1=$(date +%s.%N); after=$(cpu "$server")
  wait "$apply"
  hz=$(getconf CLK_TCK)
  server_cpu=$(python3 -c "print(f'{($after - $before) / $hz:.2f}')")
  span=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  kill "$server"; wait "$server" 2>/dev/null || true
  echo "server CPU ${server_cpu}s over ${span}s; one status --json in progress: ${status_wall}s wall, ${status_cpu}s CPU" | tee -a "$out/sse-$shape.txt"
done

# --- 2. GET of a 10,000-task run ----------------------------------------------------------
repo=$out/big
mkdir -p "$repo"
workflow "$repo" "$big" 0 map
(cd "$repo" && "$bin" apply --jobs 2 > /dev/null 2>&1)
big_run=$(cd "$repo" && "$bin" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["id"])')
"$bin" serve --addr "127.0.0.1:$port" --repo "$repo" > "$out/serve-big.log" 2>&1 &
server=$!; pids+=("$server")
for _ in $(seq 100); do curl -sf "$base/api/v1/health" >/dev/null && break; sleep 0.1; done
get() { curl -s -o /dev/null -w '%{time_total}\n' "$base/api/v1/runs/$big_run"; }
cold=$(get)
warm=$(for _ in $(seq 20); do get; done | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
size=$(curl -s "$base/api/v1/runs/$big_run" | wc -c)
status_big_t=$(mktemp)
(cd "$repo" && /usr/bin/time -o "$status_big_t" -f "%e" "$bin" status --json > /dev/null 2>&1)
status_big=$(cat "$status_big_t")
echo "GET of the $big-task run ($size bytes): cold ${cold}s, warm ${warm}s; status --json ${status_big}s"

# --- 3. The dashboard's first paint in Chromium -------------------------------------------
paint="(chromium not found: scripts/chromium-for-tests.sh installs it)"
driver=$(command -v chromedriver || true)
chromium=$(command -v chromium || true)
if [ -n "$driver" ] && [ -n "$chromium" ]; then
  dport=$((port + 1))
  "$driver" --port="$dport" > "$out/chromedriver.log" 2>&1 &
  pids+=("$!")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$dport/status" >/dev/null && break; sleep 0.1; done
  paint=$(python3 - "$dport" "$base/#/runs/$big_run" "$chromium" "$out" <<'PY'
import json, sys, time, urllib.request, tempfile, statistics
port, url, chromium, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
def call(method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))["value"]
fcp, graph = [], []
for _ in range(5):
    profile = tempfile.mkdtemp()
    s = call("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": chromium,
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                 "--window-size=1440,900"]}}}})
    sid = s["sessionId"]
    call("POST", f"/session/{sid}/url", {"url": url})
    # Until the graph has its groups drawn (the dashboard marks them with data-group).
    for _ in range(400):
        t = call("POST", f"/session/{sid}/execute/sync", {"script": """
            const g = document.querySelector('[data-group]');
            const p = performance.getEntriesByName('first-contentful-paint')[0];
            return [p ? p.startTime : null, g ? performance.now() : null];""", "args": []})
        if t[0] is not None and t[1] is not None:
            break
        time.sleep(0.02)
    call("DELETE", f"/session/{sid}")
    if t[0] is None or t[1] is None:
        print("the dashboard drew no graph within 8 s"); sys.exit(0)
    fcp.append(t[0]); graph.append(t[1])
print(f"first contentful paint {statistics.median(fcp):.0f} ms, graph drawn by {statistics.median(graph):.0f} ms (median of 5)")
PY
)
fi

cat <<EOF

== ccluster serve, $(nproc) cores, $(date -u +%Y-%m-%d) ==
1. $clients SSE clients following a run of a gate task and $tasks tasks after it (--jobs 2), as
   $tasks tasks of their own:
$(sed 's/^/   /' "$out/sse-tasks.txt")
   and as one task mapped over $tasks items:
$(sed 's/^/   /' "$out/sse-map.txt")
   (beside the server: a poller of \`ccluster status\` every second sees an event 0.5 s late on average,
   plus the status's own time; $clients pollers pay $clients times it per second)
2. GET /api/v1/runs/<run> of a finished $big-task run ($size bytes): cold ${cold}s, warm median ${warm}s
   beside it, \`ccluster status --json\` of that run: ${status_big}s
3. dashboard: $paint
EOF
