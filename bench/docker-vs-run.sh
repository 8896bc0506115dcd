#!/usr/bin/env bash
# Benchmark: 50 tiny shell tasks on the Docker runner at -j4, side by side with the peer, a plain
# `docker run --rm` loop at the same concurrency (`xargs -P4`), against the same private daemon
# (scripts/docker-for-tests.sh: its own network namespace, the busybox test image).
# Reports the makespans, their ratio, and the overhead per task.
#   bench/docker-vs-run.sh [N]      (default 50; env REPS, default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-50}
reps=${REPS:-3}
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
work=$(mktemp -d)
daemon="$work/daemon"
trap 'scripts/docker-for-tests.sh stop "$daemon"; rm -rf "$work"' EXIT
eval "export $(scripts/docker-for-tests.sh start "$daemon")"
image=ccluster-test/busybox:1

mkdir -p "$work/repo"
{
  printf 'version = 1\n[runners.box]\nkind = "docker"\nimage = "%s"\npull = "never"\nnetwork = "none"\n' "$image"
  printf '[defaults]\nrunner = "box"\n'
  for k in $(seq 1 "$n"); do
    printf '[tasks.t%s]\nrun = "echo %s > /dev/null"\nsources = []\n' "$k" "$k"
  done
} > "$work/repo/clusterfile.toml"

now() { date +%s.%N; }
for round in $(seq 1 "$reps"); do
  t0=$(now)
  seq 1 "$n" | xargs -P4 -I{} docker run --rm --network none "$image" sh -c 'echo {} > /dev/null'
  t1=$(now)
  (cd "$work/repo" && rm -rf .ccluster && "$bin" apply -j4 > "$work/apply.log" 2>&1) \
    || { cat "$work/apply.log"; exit 1; }
  t2=$(now)
  peer=$(echo "$t1 - $t0" | bc -l)
  ours=$(echo "$t2 - $t1" | bc -l)
  printf 'round %s: docker run --rm x%s at -P4 %6.2f s | ccluster apply -j4 %6.2f s | ratio %.2fx | per task: %.0f ms vs %.0f ms\n' \
    "$round" "$n" "$peer" "$ours" "$(echo "$ours / $peer" | bc -l)" \
    "$(echo "$peer * 4000 / $n" | bc -l)" "$(echo "$ours * 4000 / $n" | bc -l)"
done
