#!/usr/bin/env bash
# Benchmark: 8 independent agent tasks of 5 model turns each (Write, Edit, Bash, Read, answer), the
# real `claude` CLI against the scripted model server answering every turn after 2 s. Side by side:
#   plain     8 plain `claude -p` processes started at once, each in its own git repository and
#             config dir (the peer: what a script would do by hand)
#   ccluster  `ccluster apply --rehearse` at --jobs 1 and --jobs 8 (worktrees, checkpoints, parsing)
# Reports the makespan, the speedup of -j8 over -j1, ccluster's own CPU time (not its workers'),
# and peak memory per worker (sampled every 200 ms).
#   bench/agents-8x5.sh
set -euo pipefail
cd "$(dirname "$0")/.."
claude=$(scripts/ensure-claude.sh)
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
work=$(mktemp -d)
delay=2000

cat > "$work/script.toml" <<TOML
turn_delay_ms = $delay
[tasks.w]
turns = [
  { tools = [{ name = "Write", input = { file_path = "{{cwd}}/out.txt", content = "one\n" } }] },
  { tools = [{ name = "Edit", input = { file_path = "{{cwd}}/out.txt", old_string = "one", new_string = "two" } }] },
  { tools = [{ name = "Bash", input = { command = "echo hi > bash_out.txt", description = "write a file" } }] },
  { tools = [{ name = "Read", input = { file_path = "{{cwd}}/out.txt" } }] },
  { text = "done" },
]
TOML

# Samples the RSS of running claude workers (one awk over /proc every 200 ms, so the sampler
# itself costs little); prints "pid peak_kb" lines to $1 when stopped.
sample_rss() {
  local out=$1 all
  all=$(mktemp)
  trap 'awk "{ if (\$2 > p[\$1]) p[\$1] = \$2 } END { for (k in p) print k, p[k] }" "$all" > "$out"; rm -f "$all"; exit 0' TERM
  while true; do
    awk '/^Name:/ { n = $2 } /^VmRSS:/ { if (n ~ /claude/) print FILENAME, $2 }' /proc/[0-9]*/status 2>/dev/null >> "$all" || true
    sleep 0.2
  done
}
peaks() { awk '{ s += $2; if ($2 > m) m = $2; n++ } END { if (n) printf "%d workers, peak RSS per worker: mean %.0f MB, max %.0f MB", n, s/n/1024, m/1024 }' "$1"; }
now() { date +%s.%N; }

# --- plain claude processes, all at once
CCLUSTER_MODEL_SERVER_TOKEN=bench "$bin" model-server --script "$work/script.toml" > "$work/requests.jsonl" 2> "$work/url" &
server=$!
while [ ! -s "$work/url" ]; do sleep 0.05; done
url=$(cat "$work/url")
for i in 0 1 2 3 4 5 6 7; do
  mkdir -p "$work/plain/$i/repo"
  git -C "$work/plain/$i/repo" init -q
  git -C "$work/plain/$i/repo" -c user.name=b -c user.email=b@l commit -q --allow-empty -m init
done
sample_rss "$work/plain.rss" & sampler=$!
t0=$(now)
for i in 0 1 2 3 4 5 6 7; do
  # The same HOME as ccluster's workers get (the user's): the CLI's Bash tool sources the user's
  # shell start-up files, which can cost seconds (pyenv init, nvm...), on both sides alike.
  (cd "$work/plain/$i/repo" && env -i PATH="$PATH" HOME="$HOME" \
    CLAUDE_CONFIG_DIR="$work/plain/$i/cfg" CLAUDE_CODE_TMPDIR="$work/plain/$i/tmp" \
    ANTHROPIC_BASE_URL="$url" ANTHROPIC_API_KEY=bench ANTHROPIC_CUSTOM_HEADERS="X-Ccluster-Task: w[$i]" \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_TELEMETRY=1 DISABLE_AUTOUPDATER=1 \
    "$claude" -p "task $i" --output-format stream-json --verbose --permission-mode acceptEdits \
    < /dev/null > "$work/plain/$i/out.jsonl") &
done
wait $(jobs -p | grep -v -e "^$server\$" -e "^$sampler\$") 2>/dev/null || true
t1=$(now)
kill -TERM $sampler; wait $sampler 2>/dev/null || true
kill $server; wait $server 2>/dev/null || true
plain=$(echo "$t1 - $t0" | bc -l)
ok=$(grep -l '"is_error":false' "$work"/plain/*/out.jsonl | wc -l)
printf '%-34s %6.1f s  (%s of 8 succeeded; %s)\n' "plain claude -p, 8 at once" "$plain" "$ok" "$(peaks "$work/plain.rss")"

# --- ccluster
mkdir -p "$work/repo"
cd "$work/repo"
git init -q
printf '.ccluster/\n' > .gitignore
printf 'version = 1\n[workflow]\nname = "bench"\n[tasks.w]\nmap = [0, 1, 2, 3, 4, 5, 6, 7]\nprompt = "task {{ item }}"\n' > clusterfile.toml
git add -A
git -c user.name=b -c user.email=b@l commit -q -m init
for jobs in 1 8; do
  sample_rss "$work/j$jobs.rss" & sampler=$!
  t0=$(now)
  CCLUSTER_CLAUDE_BIN="$claude" CCLUSTER_SELF_USAGE="$work/self-$jobs" \
    "$bin" apply --rehearse --script "$work/script.toml" --fresh --jobs "$jobs" > "$work/apply-$jobs.log" 2>&1
  t1=$(now)
  kill -TERM $sampler; wait $sampler 2>/dev/null || true
  took=$(echo "$t1 - $t0" | bc -l)
  eval "took_$jobs=$took"
  read -r user sys rss < "$work/self-$jobs"
  printf '%-34s %6.1f s  (ccluster itself: %.2f CPU-s, %d MB peak; %s)\n' \
    "ccluster apply --rehearse -j$jobs" "$took" "$(echo "$user + $sys" | bc -l)" "$((rss / 1024))" "$(peaks "$work/j$jobs.rss")"
  grep -q "succeeded in" "$work/apply-$jobs.log" || { cat "$work/apply-$jobs.log"; exit 1; }
done
printf '%-34s %6.2fx\n' "speedup -j8 over -j1" "$(echo "$took_1 / $took_8" | bc -l)"
printf '%-34s %6.2fx\n' "ccluster -j8 / plain at once" "$(echo "$took_8 / $plain" | bc -l)"
rm -rf "$work"
