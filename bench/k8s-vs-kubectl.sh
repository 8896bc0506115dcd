#!/usr/bin/env bash
# Benchmark: 20 parallel shell tasks on the Kubernetes runner, side by side with the peer, plain
# `kubectl create` of 20 Jobs + `kubectl wait` + `kubectl delete`, on the real test cluster
# (scripts/k8s-for-tests.sh: Kubernetes 1.20.2, one node, its own network namespace, the Debian
# test image). Both run inside the cluster's network namespace with its kubeconfig.
#
#   bench/k8s-vs-kubectl.sh [ROUNDS]     (default 3, after one warm-up round that is not counted)
#   bench/k8s-vs-kubectl.sh --report OUT [ROUNDS]    the tables again, from a run's raw data
#
# Each round runs, in alternating order, three things of 20 tasks each (`echo task N; sleep 1`,
# image ccluster-test/debian:1, imagePullPolicy Never, backoffLimit 0, 20 at once):
#   kept     ccluster apply -j 20, the runner with ttl_seconds_after_finished = 600: it leaves its
#            finished Jobs, so the pods' status timestamps can be read after the run; the Jobs
#            are then deleted with kubectl, timed apart (deletion excluded, as for `kubectl`)
#   kubectl  kubectl create -f - (20 Jobs in one manifest) + kubectl wait --for=condition=complete;
#            then the pods' timestamps; then kubectl delete of the Jobs, timed apart
#   own      ccluster apply -j 20 as it runs by default: it deletes each Job itself when its task
#            ends (deletion included: compare with kubectl's makespan plus its deletion)
# Before each, the namespace is left to empty (its pods gone; not timed).
#
# Needs bash, kubectl, jq, nsenter, /usr/bin/time, date, and what scripts/k8s-for-tests.sh needs.
# The ccluster binary: $CCLUSTER_BIN, else target/release/ccluster (build it first).
# Raw data (events, pods' JSON, times) stay in $OUT when it is set.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
n=20

# --- Results -----------------------------------------------------------------------------------
report() {
ms() { echo $(( $(cat "$out/$1.t1") - $(cat "$out/$1.t0") )); }
cpu() { awk '{u += $2; s += $3} END {printf "%.2f", u + s}' "$out/$1.time"; }
sec() { awk -v m="$1" 'BEGIN {printf "%.2f", m / 1000}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

echo
echo "| round | ccluster, Jobs kept | kubectl create + wait | ratio | kubectl delete | ccluster, deleting its Jobs | kubectl with delete | ratio | CPU s: ccluster / kubectl |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for r in $(seq 1 "$rounds"); do
  kept=$(ms "r$r-kept"); peer=$(ms "r$r-kubectl"); own=$(ms "r$r-own")
  del=$(cat "$out/r$r-kubectl.delete")
  echo "| $r | $(sec "$kept") s | $(sec "$peer") s | $(ratio "$kept" "$peer")× | $(sec "$del") s | $(sec "$own") s | $(sec $((peer + del))) s | $(ratio "$own" $((peer + del)))× | $(cpu "r$r-own") / $(cpu "r$r-kubectl") |"
done

# Where a task's time goes, from the pods' timestamps (mean over the pods of all rounds, s):
# submit = command start -> pod made (the Job made, and its controller making the pod);
# schedule = made -> PodScheduled; start = scheduled -> container started (sandbox and container;
# the image is on the node: no pull); run = started -> finished; reported = finished -> the Job's
# completionTime (the kubelet posting the pod's status, the Job controller seeing it); harvest =
# finished -> the tool has the result (ccluster: the task's task_succeeded event; kubectl: the end
# of `kubectl wait`, which waits for all, so the last pod's).
phases() { # variant
  local r
  for r in $(seq 1 "$rounds"); do
    jq -r 'select(.event == "task_succeeded") | "\(.task)\t\(.time_ms)"' "$out/r$r-$1.events" 2> /dev/null > "$out/r$r-$1.ended" || true
    awk -v t0="$(cat "$out/r$r-$1.t0")" -v t1="$(cat "$out/r$r-$1.t1")" -F '\t' '
      FILENAME == ARGV[1] {ended[$1] = $2; next}
      {
        harvest = ($7 in ended) ? ended[$7] / 1000 - $5 : "-"
        printf "%.3f %d %d %d %d %s %d\n", $2 - t0 / 1000, $3 - $2, $4 - $3, $5 - $4, $6 - $5, harvest, $5
      }' "$out/r$r-$1.ended" "$out/r$r-$1.pods" | awk -v t1="$(cat "$out/r$r-$1.t1")" '
      {lines[NR] = $0; if ($7 > last) last = $7}
      END {for (i = 1; i <= NR; i++) {split(lines[i], f, " "); if (f[6] == "-") f[6] = t1 / 1000 - last; print f[1], f[2], f[3], f[4], f[5], f[6]}}'
  done
}
echo
echo "| per task (mean of $((rounds * n)) pods, s) | submit | schedule | start | run | reported | harvest |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for v in kept kubectl; do
  phases "$v" | awk -v v="$v" '
    {for (i = 1; i <= 6; i++) sum[i] += $i; k++}
    END {printf "| %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", v == "kept" ? "ccluster" : "kubectl",
      sum[1] / k, sum[2] / k, sum[3] / k, sum[4] / k, sum[5] / k, sum[6] / k}'
done

# ccluster's own view: task_started -> task_succeeded (duration_ms), and how long after the
# command started the first and the last task started.
echo
echo "| ccluster's events (all rounds, both variants) | mean | max |"
echo "|---|---:|---:|"
for v in kept own; do
  for r in $(seq 1 "$rounds"); do
    jq -r --arg t0 "$(cat "$out/r$r-$v.t0")" '
      select(.event == "task_started") | "started \(.time_ms - ($t0 | tonumber))"' "$out/r$r-$v.events"
    jq -r 'select(.event == "task_succeeded") | "duration \(.duration_ms)"' "$out/r$r-$v.events"
  done
done | awk '
  {sum[$1] += $2; k[$1]++; if ($2 > max[$1]) max[$1] = $2}
  END {
    printf "| command start → task_started | %d ms | %d ms |\n", sum["started"] / k["started"], max["started"]
    printf "| task duration_ms (Job made → result taken, Job deleted for `own`) | %d ms | %d ms |\n", sum["duration"] / k["duration"], max["duration"]
  }'
}


if [ "${1:-}" = --report ]; then
  out=${2:?the raw data directory} rounds=${3:-3}
  report
  exit 0
fi
rounds=${1:-3}
bin=${CCLUSTER_BIN:-$here/target/release/ccluster}
[ -x "$bin" ] || { echo "no ccluster binary at $bin (cargo build --release, or set CCLUSTER_BIN)" >&2; exit 1; }
image=ccluster-test/debian:1
work=$(mktemp -d)
cluster=$work/cluster
out=${OUT:-$work/out}
mkdir -p "$out"
trap '"$here/scripts/k8s-for-tests.sh" stop "$cluster" >&2 || true; rm -rf "$work"' EXIT
"$here/scripts/k8s-for-tests.sh" start "$cluster" debian > /dev/null

# Inside the cluster's network namespace, with its kubeconfig.
# The kubectl the test cluster's build made (of its version), else the machine's.
kubectl=$HOME/.cache/ccluster/k8s-1.20.2/bin/kubectl
[ -x "$kubectl" ] || kubectl=kubectl
inns() { nsenter --net="/proc/$(cat "$cluster/netns.pid")/ns/net" -- env KUBECONFIG="$cluster/kubeconfig" "$@"; }
kc() { inns "$kubectl" "$@"; }
# The same, its wall and CPU time added to the file $1 (a "wall user sys" line per call).
kc_timed() {
  local file=$1; shift
  /usr/bin/time -f '%e %U %S' -a -o "$file" nsenter --net="/proc/$(cat "$cluster/netns.pid")/ns/net" -- \
    "$kubectl" --kubeconfig "$cluster/kubeconfig" "$@"
}
now_ms() { date +%s%3N; }

for ns in bench-cc bench-kc; do
  kc create namespace "$ns" > /dev/null
  until kc get serviceaccount default -n "$ns" > /dev/null 2>&1; do sleep 0.2; done
done

# A ccluster project per variant; `ttl` empty: the runner deletes its Jobs.
project() { # dir ttl
  mkdir -p "$1"
  {
    printf 'version = 1\n[runners.k8s]\nkind = "kubernetes"\nimage = "%s"\nnamespace = "bench-cc"\npull = "never"\n' "$image"
    [ -z "$2" ] || printf 'ttl_seconds_after_finished = %s\n' "$2"
    printf '[tasks.t]\nrunner = "k8s"\nmap = [%s]\nrun = "echo task {{ item }} round {{ inputs.round }}; sleep 1"\n' "$(seq -s ', ' 1 $n)"
    printf '[inputs.round]\ntype = "string"\n'
  } > "$1/clusterfile.toml"
}
project "$work/kept" 600
project "$work/own" ""

# Waits (untimed) until namespace $1 has no pods left.
quiet() {
  while [ -n "$(kc get pods -n "$1" -o name 2>/dev/null)" ]; do sleep 0.5; done
}

# The pods of namespace $1, one line each: name, then epoch seconds (the API's timestamps have a
# resolution of one second) of: pod made, PodScheduled, container started, container finished,
# its Job's completionTime; then the ccluster task it ran ("-" for kubectl's).
pod_times() {
  kc get jobs,pods -n "$1" -o json | jq -r '
    (.items | map(select(.kind == "Job") | {key: .metadata.name, value: .status.completionTime})
      | from_entries) as $complete
    | .items[] | select(.kind == "Pod") | [
      .metadata.name,
      (.metadata.creationTimestamp | fromdate),
      ((.status.conditions // [])[] | select(.type == "PodScheduled") | .lastTransitionTime | fromdate),
      (.status.containerStatuses[0].state.terminated.startedAt | fromdate),
      (.status.containerStatuses[0].state.terminated.finishedAt | fromdate),
      ($complete[.metadata.labels["job-name"]] | fromdate),
      (.metadata.annotations["ccluster.dev/node"] // "-")
    ] | @tsv'
}

# One ccluster run: variant $1 (kept|own), round tag $2. Prints its makespan in ms.
run_ccluster() {
  local variant=$1 tag=$2 t0 t1
  : > "$out/$tag-$variant.time"
  t0=$(now_ms)
  (cd "$work/$variant" && /usr/bin/time -f '%e %U %S' -a -o "$out/$tag-$variant.time" \
    nsenter --net="/proc/$(cat "$cluster/netns.pid")/ns/net" -- env KUBECONFIG="$cluster/kubeconfig" \
    "$bin" apply -j $n --output json --var round="$tag$variant" > "$out/$tag-$variant.events" 2> "$out/$tag-$variant.stderr") \
    || { cat "$out/$tag-$variant.stderr" >&2; grep task_failed "$out/$tag-$variant.events" | head -3 >&2; exit 1; }
  t1=$(now_ms)
  echo "$t0" > "$out/$tag-$variant.t0"
  echo "$t1" > "$out/$tag-$variant.t1"
  if [ "$variant" = kept ]; then
    pod_times bench-cc > "$out/$tag-$variant.pods"
    local d0 d1
    d0=$(now_ms)
    kc delete jobs --all -n bench-cc --cascade=background > /dev/null
    d1=$(now_ms)
    echo $((d1 - d0)) > "$out/$tag-$variant.delete"
  fi
  [ "$(jq -s '[.[] | select(.event == "task_succeeded")] | length' "$out/$tag-$variant.events")" = $n ] \
    || { echo "ccluster $variant: not all $n tasks succeeded" >&2; cat "$out/$tag-$variant.events" >&2; exit 1; }
  quiet bench-cc
}

# The peer: 20 Jobs made by kubectl, waited for, their pods read, deleted.
run_kubectl() {
  local tag=$1 t0 t1 d0 d1 i timing
  timing=$out/$tag-kubectl.time
  : > "$timing"
  t0=$(now_ms)
  for i in $(seq 1 $n); do
    cat <<JOB
---
apiVersion: batch/v1
kind: Job
metadata: {name: kc-$tag-$i, labels: {bench: kc-$tag}}
spec:
  backoffLimit: 0
  template:
    metadata: {labels: {bench: kc-$tag}}
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      enableServiceLinks: false
      containers:
      - name: task
        image: $image
        imagePullPolicy: Never
        command: ["/bin/sh", "-c", "echo task $i round ${tag}kubectl; sleep 1"]
JOB
  done | kc_timed "$timing" create -n bench-kc -f - > /dev/null
  kc_timed "$timing" wait -n bench-kc --for=condition=complete job -l "bench=kc-$tag" --timeout=300s > /dev/null
  t1=$(now_ms)
  echo "$t0" > "$out/$tag-kubectl.t0"
  echo "$t1" > "$out/$tag-kubectl.t1"
  pod_times bench-kc > "$out/$tag-kubectl.pods"
  d0=$(now_ms)
  kc_timed "$timing" delete jobs --all -n bench-kc --cascade=background > /dev/null
  d1=$(now_ms)
  echo $((d1 - d0)) > "$out/$tag-kubectl.delete"
  quiet bench-kc
}

run_round() { # tag
  if [ $(( ${1#r} % 2 )) = 1 ]; then
    run_ccluster kept "$1"; run_kubectl "$1"; run_ccluster own "$1"
  else
    run_ccluster own "$1"; run_kubectl "$1"; run_ccluster kept "$1"
  fi
}

echo "warm-up round (not counted)" >&2
run_round r0
for r in $(seq 1 "$rounds"); do
  echo "round $r of $rounds" >&2
  run_round "r$r"
done

report
echo "raw data: $out" >&2
