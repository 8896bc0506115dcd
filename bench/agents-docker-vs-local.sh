#!/usr/bin/env bash
# Benchmark: 8 rehearsed agent tasks of 5 model turns each (Write, Edit, Bash, Read, answer; the
# scripted model answers every turn after 2 s), the real `claude` CLI, at -j8: on the Docker runner
# (each agent in its own container on the `api-only` network, the CLI mounted read-only, through
# the egress proxy) side by side with the local runner, in alternating rounds, against the same
# private daemon (scripts/docker-for-tests.sh, its own network namespace, the Debian test image).
# Both sides run inside the daemon's network namespace, so that they see the same network.
# Reports the makespans, their ratio, the overhead per attempt, and where the container's share
# goes (from the daemon's own event times: create -> start, start -> die, die -> destroy).
#   bench/agents-docker-vs-local.sh      (env REPS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
reps=${REPS:-3}
claude=$(scripts/ensure-claude.sh)
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
work=$(mktemp -d)
daemon="$work/daemon"
trap 'scripts/docker-for-tests.sh stop "$daemon"; rm -rf "$work"' EXIT
eval "export $(scripts/docker-for-tests.sh start "$daemon" debian)"
netns="/proc/$(cat "$daemon/docker.pid")/ns/net"

cat > "$work/script.toml" <<TOML
turn_delay_ms = 2000
[tasks.w]
turns = [
  { tools = [{ name = "Write", input = { file_path = "{{cwd}}/out.txt", content = "one\n" } }] },
  { tools = [{ name = "Edit", input = { file_path = "{{cwd}}/out.txt", old_string = "one", new_string = "two" } }] },
  { tools = [{ name = "Bash", input = { command = "echo hi > bash_out.txt", description = "write a file" } }] },
  { tools = [{ name = "Read", input = { file_path = "{{cwd}}/out.txt" } }] },
  { text = "done" },
]
TOML

for side in local docker; do
  mkdir -p "$work/$side"
  (
    cd "$work/$side"
    git init -q
    printf '.ccluster/\n' > .gitignore
    {
      printf 'version = 1\n[workflow]\nname = "bench"\n'
      if [ "$side" = docker ]; then
        printf '[runners.box]\nkind = "docker"\nimage = "ccluster-test/debian:1"\npull = "never"\n'
        printf '[defaults]\nrunner = "box"\n'
      fi
      printf '[tasks.w]\nmap = [0, 1, 2, 3, 4, 5, 6, 7]\nworkspace = "worktree"\n'
      printf 'prompt = "task {{ item }}"\nclaude = { allowed_tools = ["Bash"] }\n'
    } > clusterfile.toml
    git add -A
    git -c user.name=b -c user.email=b@l commit -q -m init
  )
done

now() { date +%s.%N; }
# Both sides with the same empty HOME: a worker's HOME on the local runner is ccluster's, and the
# CLI's Bash tool sources the shell start-up files there (pyenv or nvm set-ups can cost seconds a
# call); in a container it is the worker's own directory. Measured with the user's HOME, the local
# side pays for their shell set-up, which is not what this compares.
mkdir -p "$work/home"
apply() { # side -> seconds
  local t0 t1
  t0=$(now)
  (cd "$work/$1" && HOME="$work/home" CCLUSTER_CLAUDE_BIN="$claude" nsenter --net="$netns" -- \
    "$bin" apply --rehearse --script "$work/script.toml" --fresh --jobs 8 > "$work/$1.log" 2>&1) \
    || { cat "$work/$1.log" >&2; exit 1; }
  grep -q "8 succeeded" "$work/$1.log" || { cat "$work/$1.log" >&2; exit 1; }
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}
sum_local=0 sum_docker=0
for round in $(seq 1 "$reps"); do
  # Alternate which side goes first: neither always runs on a warmer machine.
  if [ $((round % 2)) = 1 ]; then l=$(apply local); since=$(date +%s); d=$(apply docker); else since=$(date +%s); d=$(apply docker); l=$(apply local); fi
  until=$(($(date +%s) + 1))
  sum_local=$(echo "$sum_local + $l" | bc -l) sum_docker=$(echo "$sum_docker + $d" | bc -l)
  # The container's lifecycle, from the daemon's own clock.
  docker events --since "$since" --until "$until" --filter type=container \
    --filter label=dev.ccluster.task --format '{{.TimeNano}} {{.Action}} {{.Actor.ID}}' > "$work/events"
  phases=$(awk '
    { t[$3, $2] = $1; ids[$3] = 1 }
    END {
      for (id in ids) {
        if ((id, "create") in t && (id, "start") in t) { a += t[id, "start"] - t[id, "create"]; na++ }
        if ((id, "start") in t && (id, "die") in t) { b += t[id, "die"] - t[id, "start"]; nb++ }
        if ((id, "die") in t && (id, "destroy") in t) { c += t[id, "destroy"] - t[id, "die"]; nc++ }
      }
      printf "create->start %.0f ms, start->die %.0f ms, die->destroy %.0f ms", a/na/1e6, b/nb/1e6, c/nc/1e6
    }' "$work/events")
  printf 'round %s: local -j8 %6.2f s | docker -j8 %6.2f s | ratio %.3fx | overhead per attempt %+.0f ms | container: %s\n' \
    "$round" "$l" "$d" "$(echo "$d / $l" | bc -l)" "$(echo "($d - $l) * 1000" | bc -l)" "$phases"
done
printf 'mean: local %.2f s, docker %.2f s, ratio %.3fx\n' \
  "$(echo "$sum_local / $reps" | bc -l)" "$(echo "$sum_docker / $reps" | bc -l)" "$(echo "$sum_docker / $sum_local" | bc -l)"
