#!/usr/bin/env bash
# Benchmark: the cost of a task's workspace on a repository of 10,000 files, side by side with
# plain git. Median of 5 runs each:
#   git       `git worktree add --detach` then `git worktree remove --force` (the peer)
#   plain     `ccluster apply --fresh` of one task without a workspace (apply's own cost)
#   fresh     the same task with `workspace = "worktree"` and no worktree to reuse
#   pooled    the same task again: the worktree the previous run left in the pool is reused
# The workspace's cost is `fresh - plain` (or `pooled - plain`): make, commit, publish, remove.
#   bench/worktree-10k.sh [DIR]   (default: a temporary directory; the file system matters)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
base=${1:-$(mktemp -d)}
repo=$base/repo
rm -rf "$repo"; mkdir -p "$repo"
python3 - "$repo" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    os.makedirs(f"{root}/src/d{d}")
    for f in range(100):
        with open(f"{root}/src/d{d}/f{f}.txt", "w") as fh:
            fh.write(f"file {d} {f}\n")
PY
cd "$repo"
git init -q
printf '.ccluster/\n' > .gitignore
printf 'version = 1\n[tasks.edit]\nworkspace = "worktree"\nrun = "echo changed >> src/d0/f0.txt"\n' > ws.toml
printf 'version = 1\n[tasks.edit]\nrun = "true"\n' > plain.toml
git add -A
git -c user.name=bench -c user.email=bench@localhost commit -qm init
echo "files in the repository: $(git ls-files | wc -l), in $base ($(df -T "$base" | awk 'NR==2{print $2}'))"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
seconds() { # wall seconds of a command, output discarded
  local t0 t1; t0=$(date +%s.%N); "$@" > /dev/null 2>&1; t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
git_round() { git worktree add -q --detach "$base/wt" HEAD && git worktree remove --force "$base/wt"; }

g=$(for _ in 1 2 3 4 5; do seconds git_round; done | median)
p=$(for _ in 1 2 3 4 5; do seconds "$bin" apply plain.toml --fresh; done | median)
f=$(for _ in 1 2 3 4 5; do "$bin" gc > /dev/null; seconds "$bin" apply ws.toml --fresh; done | median)
"$bin" apply ws.toml --fresh > /dev/null
w=$(for _ in 1 2 3 4 5; do seconds "$bin" apply ws.toml --fresh; done | median)
printf '%-36s %8.3f s\n' "git worktree add + remove" "$g"
printf '%-36s %8.3f s\n' "ccluster apply, no workspace" "$p"
printf '%-36s %8.3f s   (workspace: %.3f s)\n' "ccluster apply, fresh worktree" "$f" "$(echo "$f - $p" | bc -l)"
printf '%-36s %8.3f s   (workspace: %.3f s)\n' "ccluster apply, pooled worktree" "$w" "$(echo "$w - $p" | bc -l)"
