#!/usr/bin/env bash
# The main job: rehearse the shipped `feature-fanout` workflow on a small sample repository. The
# real Claude Code CLI runs every agent task against ccluster's scripted model server (no key, no
# tokens): a planner splits the goal into a small task graph, three agents work in their own git
# worktrees (two at once, the third after the one it depends on, from its work), their branches
# are merged, the "tests" run on the result, and the run's report (with the graph) is printed.
#   ./demo.sh [DIR]     (default: a fresh temporary directory; run it again in the same DIR to see
#                        the second run find everything cached)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CCLUSTER_CLAUDE_BIN="$("$here/scripts/ensure-claude.sh")"
export CCLUSTER_CLAUDE_BIN
cargo build --release -p ccluster --quiet --manifest-path "$here/Cargo.toml"
ccluster="$here/target/release/ccluster"

demo="${1:-$(mktemp -d)/demo}"
if [ ! -d "$demo/.git" ]; then
  mkdir -p "$demo/src"
  cd "$demo"
  git init -q -b main
  printf '# Settings page\n\nA tiny app to try ccluster on.\n' > README.md
  printf 'pub fn theme() -> &'"'"'static str {\n    "light"\n}\n' > src/settings.rs
  printf '.ccluster/\n' > .gitignore
  cp "$here/workflows/feature-fanout.toml" clusterfile.toml
  sed -i 's|^#:schema .*|#:schema '"$here"'/schema/clusterfile.schema.json|' clusterfile.toml
  git add -A
  git -c user.name=demo -c user.email=demo@localhost commit -q -m "A sample project"
fi
cd "$demo"
echo "== rehearsing $demo/clusterfile.toml"
"$ccluster" apply --rehearse --var 'test_command=ls .ccluster-rehearsal && test -f src/settings.rs'
echo
echo "== the report (ccluster report)"
"$ccluster" report
echo "== next: cd $demo and try: $ccluster status | $ccluster artifacts <run> | $ccluster export --patch -"
echo "== watch runs in the dashboard: $ccluster serve --repo $demo   then open http://127.0.0.1:7878/"
