#!/usr/bin/env bash
# Shows what the real `claude` CLI exports through its own OpenTelemetry support, offline: starts
# ccluster's scripted model server and the OTLP receiver (tests/otlp/receiver.py) on 127.0.0.1, runs
# `claude -p` once against them with telemetry switched on, and prints what arrived (docs/claude-telemetry.md
# records the findings). Every process it starts it stops by PID.
#
#   tests/otlp/claude-telemetry.sh [options] [NAME=VALUE ...]
#
#   --protocol P     OTEL_EXPORTER_OTLP_PROTOCOL: grpc (default) or http/protobuf or http/json
#   --script FILE    the model server's script (docs/agents.md, "The rehearsal script"), for the
#                    task `telemetry` (the CLI is told it is that task)
#   --cli-arg ARG    one more argument for `claude -p` (repeatable), e.g. --cli-arg --permission-mode
#                    --cli-arg acceptEdits
#   --delay-ms N     the model server waits N ms before each answer (default 0), to see exports
#                    during a run rather than at its end
#   --linger S       seconds to keep receiving after the CLI exits (default 3)
#   --term-after S   send the CLI SIGTERM S seconds after it started (as a timeout would)
#   --strace         record the CLI's connect() calls (needs strace) and print their addresses
#   --values         print every data point and attribute value, not only names
#   --keep DIR       keep the run's files (receiver output, CLI output, HOME) in DIR
#   NAME=VALUE       set (or, with an empty VALUE, blank) a variable of the CLI's environment
#
# The CLI comes from scripts/ensure-claude.sh, the receiver's Python from
# scripts/otlp-receiver-for-tests.sh, ccluster from $CCLUSTER_BIN or target/debug/ccluster (build it
# with `cargo build`). A missing component fails loudly (exit 1).
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
script= cli_args=()
protocol=grpc delay_ms=0 linger=3 term_after= use_strace= values= keep=
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --protocol) protocol=$2; shift 2 ;;
    --delay-ms) delay_ms=$2; shift 2 ;;
    --script) script=$(realpath "$2"); shift 2 ;;
    --cli-arg) cli_args+=("$2"); shift 2 ;;
    --linger) linger=$2; shift 2 ;;
    --term-after) term_after=$2; shift 2 ;;
    --strace) use_strace=1; shift ;;
    --values) values=--values; shift ;;
    --keep) keep=$2; shift 2 ;;
    *=*) overrides+=("$1"); shift ;;
    *) echo "error: unknown argument $1" >&2; exit 1 ;;
  esac
done

ccluster=${CCLUSTER_BIN:-$repo/target/debug/ccluster}
[ -x "$ccluster" ] || { echo "error: no ccluster binary at $ccluster (cargo build, or set CCLUSTER_BIN)" >&2; exit 1; }
claude=$("$repo/scripts/ensure-claude.sh")
eval "$("$repo/scripts/otlp-receiver-for-tests.sh")"   # PYTHON, RECEIVER
if [ -n "$use_strace" ] && [ -n "$term_after" ]; then
  echo "error: --term-after would signal strace, not the CLI: use one or the other" >&2
  exit 1
fi
if [ -n "$use_strace" ] && ! command -v strace >/dev/null; then
  echo "error: --strace needs strace (apt-get install strace)" >&2
  exit 1
fi

if [ -n "$keep" ]; then
  dir=$keep
  mkdir -p "$dir"
else
  dir=$(mktemp -d)
fi
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  [ -n "$keep" ] || rm -rf "$dir"
}
trap cleanup EXIT

# Waits (at most 20 s) until FILE has a first line.
first_line() {
  for _ in $(seq 200); do
    if [ -s "$1" ]; then head -n1 "$1"; return 0; fi
    sleep 0.1
  done
  echo "error: nothing in $1 after 20 s" >&2
  return 1
}

token=test
CCLUSTER_MODEL_SERVER_TOKEN=$token "$ccluster" model-server --turn-delay-ms "$delay_ms" ${script:+--script "$script"} \
  >"$dir/model-server.jsonl" 2>"$dir/model-server.err" &
pids+=($!)
"$PYTHON" "$RECEIVER" --out "$dir/otlp.jsonl" >"$dir/receiver.out" 2>"$dir/receiver.err" &
pids+=($!)
model_url=$(first_line "$dir/model-server.err")
ready=$(first_line "$dir/receiver.out")
grpc_endpoint=http://$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["grpc"])' "$ready")
http_endpoint=$("$PYTHON" -c 'import json,sys; print(json.loads(sys.argv[1])["http"])' "$ready")
case "$protocol" in
  grpc) endpoint=$grpc_endpoint ;;
  http/*) endpoint=$http_endpoint ;;
  *) echo "error: unknown protocol $protocol" >&2; exit 1 ;;
esac

mkdir -p "$dir/home" "$dir/work"
git -C "$dir/work" init -q
git -C "$dir/work" -c user.name=t -c user.email=t@localhost commit -q --allow-empty -m init

cli_env=(
  PATH=/usr/local/bin:/usr/bin:/bin HOME="$dir/home" TERM=dumb
  ANTHROPIC_BASE_URL="$model_url" ANTHROPIC_API_KEY=$token ANTHROPIC_CUSTOM_HEADERS="X-Ccluster-Task: telemetry"
  CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1
  CLAUDE_CODE_ENABLE_TELEMETRY=1
  OTEL_METRICS_EXPORTER=otlp OTEL_LOGS_EXPORTER=otlp OTEL_TRACES_EXPORTER=otlp
  CLAUDE_CODE_ENHANCED_TELEMETRY_BETA=1
  OTEL_EXPORTER_OTLP_PROTOCOL="$protocol" OTEL_EXPORTER_OTLP_ENDPOINT="$endpoint"
  "${overrides[@]}"
)
echo "model server: $model_url   receiver: grpc $grpc_endpoint, http $http_endpoint"
echo "CLI environment: ${cli_env[*]}"

cli=("$claude" -p "hello" --output-format stream-json --verbose "${cli_args[@]}")
if [ -n "$use_strace" ]; then
  cli=(strace -f -qq -e trace=connect -e signal=none -o "$dir/connect.strace" "${cli[@]}")
fi
start=$(date +%s.%N)
(cd "$dir/work" && exec env -i "${cli_env[@]}" "${cli[@]}" </dev/null >"$dir/cli.jsonl" 2>"$dir/cli.err") &
cli_pid=$!
pids+=($cli_pid)

# Arrivals over time: a line each time the receiver's file grows.
elapsed() { awk -v s="$start" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f", n - s }'; }
seen=0
report_arrivals() {
  local now
  now=$(wc -l <"$dir/otlp.jsonl" 2>/dev/null || echo 0)
  if [ "$now" -gt "$seen" ]; then
    echo "  +$(elapsed) s: $(sed -n "$((seen + 1)),${now}p" "$dir/otlp.jsonl" | "$PYTHON" -c '
import json, sys
print(", ".join(l["signal"] + "/" + l["transport"] for l in map(json.loads, sys.stdin)))')"
    seen=$now
  fi
}
echo "arrivals (seconds after the CLI started):"
while kill -0 "$cli_pid" 2>/dev/null; do
  report_arrivals
  if [ -n "$term_after" ] && awk -v s="$start" -v n="$(date +%s.%N)" -v t="$term_after" 'BEGIN { exit !(n - s >= t) }'; then
    echo "  +$(elapsed) s: SIGTERM to the CLI"
    kill -TERM "$cli_pid" 2>/dev/null || true
    term_after=
  fi
  sleep 0.1
done
cli_status=0
wait "$cli_pid" || cli_status=$?
echo "  +$(elapsed) s: the CLI exited with status $cli_status"
end=$(date +%s.%N)
while awk -v e="$end" -v n="$(date +%s.%N)" -v l="$linger" 'BEGIN { exit !(n - e < l) }'; do
  report_arrivals
  sleep 0.1
done
report_arrivals

echo "result line: $(grep '"type":"result"' "$dir/cli.jsonl" | tail -n1 | cut -c1-160)"
[ -s "$dir/cli.err" ] && { echo "CLI stderr:"; sed 's/^/  /' "$dir/cli.err"; }
if [ -n "$use_strace" ]; then
  echo "connect() calls of the CLI and its children (count, address):"
  sed -n 's/.*connect([0-9]*, {\(.*\)}, [0-9]*).*/\1/p' "$dir/connect.strace" | sort | uniq -c | sed 's/^/  /'
fi
echo
if [ -s "$dir/otlp.jsonl" ]; then
  "$PYTHON" "$repo/tests/otlp/summarize.py" "$dir/otlp.jsonl" $values
else
  echo "nothing arrived at the receiver"
fi
