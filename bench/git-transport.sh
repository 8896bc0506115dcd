#!/usr/bin/env bash
# Benchmark: what a Kubernetes pod does before its task, fetching the task's start commit over a
# run's git endpoint into an empty directory and checking it out, three ways (median of RUNS):
#   full      `git fetch` of the start ref with all its history
#   depth1    `git fetch --depth=1`: the start commit only (what the pods' fetch script does)
#   blobless  a partial fetch, `--filter=blob:none`: all commits and trees, then the checkout
#             fetches the blobs it needs in a second request. The endpoint refuses that second
#             request (it asks for blobs by id, which no ref advertises): shown as `refused`.
# and the push of a one-file change from a depth1 checkout (what the pods' push script does).
# Each on two repositories: this one at HEAD, and a generated one of 20,000 files with 20
# commits of history (each rewriting 1,000 files). The endpoint runs on 127.0.0.1.
#   bench/git-transport.sh [DIR]     (default: a temporary directory)
#   RUNS=5 (default)   PROFILE=debug to use a debug build of the endpoint instead of release
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${PROFILE:-release}
runs=${RUNS:-5}
if [ "$profile" = release ]; then
  cargo build --release --quiet -p ccluster-engine --example git_endpoint
else
  cargo build --quiet -p ccluster-engine --example git_endpoint
fi
bin=$(pwd)/target/$profile/examples/git_endpoint
this_repo=$(git rev-parse --path-format=absolute --git-common-dir)
this_commit=$(git rev-parse HEAD)
base=${1:-$(mktemp -d)}
mkdir -p "$base"

# The generated repository.
big=$base/big
if [ ! -d "$big/.git" ]; then
  mkdir -p "$big"
  git -C "$big" init -q
  write_files() { # round: rewrite the files whose number % 20 == round (all when round is -1)
    awk -v root="$big" -v round="$1" 'BEGIN {
      for (d = 0; d < 200; d++) {
        if (round < 0) system("mkdir -p " root "/src/d" d)
        for (f = 0; f < 100; f++) {
          if (round >= 0 && (d * 100 + f) % 20 != round) continue
          path = root "/src/d" d "/f" f ".txt"
          for (l = 0; l < 20; l++) printf "line %d of file %d/%d, round %d: %d\n", l, d, f, round, (d * 7919 + f * 104729 + l * 31 + round) % 1000003 > path
          close(path)
        }
      }
    }'
  }
  write_files -1
  git -C "$big" add -A
  git -C "$big" -c gc.auto=0 -c user.name=bench -c user.email=bench@localhost commit -qm "round -1"
  for round in $(seq 0 19); do
    write_files "$round"
    git -C "$big" -c gc.auto=0 -c user.name=bench -c user.email=bench@localhost commit -qam "round $round"
  done
  git -C "$big" gc -q
fi

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
now() { date +%s.%N; }

# git with the token's header, as the pods' scripts give it.
authed() { GIT_TERMINAL_PROMPT=0 GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=http.extraHeader \
  GIT_CONFIG_VALUE_0="Authorization: Bearer $token" git "$@"; }

fetch_full() {
  git init -q "$1" && authed -C "$1" fetch -q --no-tags -- "$url" "$start_ref" &&
    git -C "$1" -c advice.detachedHead=false checkout -q --detach FETCH_HEAD
}
fetch_depth1() {
  git init -q "$1" && authed -C "$1" fetch -q --no-tags --depth=1 -- "$url" "$start_ref" &&
    git -C "$1" -c advice.detachedHead=false checkout -q --detach FETCH_HEAD
}
fetch_blobless() { # a promisor remote, so that the checkout can fetch the blobs it lacks
  git init -q "$1" && git -C "$1" remote add origin "$url" &&
    git -C "$1" config remote.origin.promisor true &&
    git -C "$1" config remote.origin.partialclonefilter blob:none &&
    authed -C "$1" fetch -q --no-tags --filter=blob:none origin "$start_ref" &&
    authed -C "$1" -c advice.detachedHead=false checkout -q --detach FETCH_HEAD
}

measure() { # name, git common dir, commit
  local name=$1 dir=$2 commit=$3 line
  coproc endpoint { "$bin" "$dir" "$base/transport/$name.git" "$commit"; }
  read -r line <&"${endpoint[0]}"; url=${line#url=}
  read -r line <&"${endpoint[0]}"; start_ref=${line#ref=}
  read -r line <&"${endpoint[0]}"; token=${line#token=}
  local files
  files=$(git --git-dir="$dir" ls-tree -r "$commit" | wc -l)
  echo "## $name: $files files at ${commit:0:10}"
  printf '| %-9s | %9s | %10s |\n' "fetch" "median s" ".git KiB"
  printf '|-----------|----------:|-----------:|\n'
  for way in full depth1 blobless; do
    local times=() size=0 refused=
    for i in $(seq "$runs"); do
      local pod=$base/pods/$name-$way-$i
      rm -rf "$pod"
      local t0; t0=$(now)
      if ! "fetch_$way" "$pod" 2>/dev/null; then refused=1; break; fi
      times+=("$(echo "$(now) - $t0" | bc -l)")
      [ "$(git -C "$pod" rev-parse HEAD)" = "$commit" ] || { echo "$way: wrong HEAD" >&2; exit 1; }
      size=$(du -sk "$pod/.git" | cut -f1)
    done
    if [ -n "$refused" ]; then printf '| %-9s | %9s | %10s |\n' "$way" refused -; continue; fi
    printf '| %-9s | %9.3f | %10s |\n' "$way" "$(printf '%s\n' "${times[@]}" | median)" "$size"
  done
  local times=()
  for i in $(seq "$runs"); do
    local pod=$base/pods/$name-depth1-$i
    echo "changed $i" >> "$pod/changed.txt"
    git -C "$pod" add -A
    git -C "$pod" -c user.name=ccluster -c user.email=ccluster@localhost commit -qm "push $i"
    local t0; t0=$(now)
    authed -C "$pod" push -q -- "$url" "+HEAD:refs/ccluster/bench/task-$i"
    times+=("$(echo "$(now) - $t0" | bc -l)")
  done
  printf '| %-9s | %9.3f | %10s |\n' "push" "$(printf '%s\n' "${times[@]}" | median)" "-"
  echo
  exec {endpoint[1]}>&-
  wait "$endpoint_PID"
  rm -rf "$base/pods"
}

echo "git $(git --version | cut -d' ' -f3), endpoint build: $profile, median of $runs, in $base"
echo
measure this-repo "$this_repo" "$this_commit"
measure generated-20k "$big/.git" "$(git -C "$big" rev-parse HEAD)"
