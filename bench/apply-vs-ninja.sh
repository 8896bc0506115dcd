#!/usr/bin/env bash
# Benchmark: `ccluster apply` against ninja (Debian's ninja-build) on the same DAG, side by side:
# N independent tasks each running `touch out/tK`, plus one task depending on all, at -j2.
#
# For each N, REPS rounds (default 5; env REPS). A round runs, in turn and each in a fresh `out/`
# after a 1 s pause (so that one tool's deleted files do not slow the next one's creations), each
# round starting one column later than the one before:
#   ninja -j2                      cold run
#   ccluster apply -j2             cold run: simple commands run without `sh` (the default)
#   CCLUSTER_ALWAYS_SHELL=1 ...    cold run with every command through `sh -c`, as ninja does:
#                                  the same processes, so the difference is ccluster's own cost
# then each tool's no-op re-run. Reports medians of wall time, the CPU time (user+sys, children
# included) and the peak RSS of the tool's own process.
#   bench/apply-vs-ninja.sh [N ...]      (default: 1000 10000)
# With BASELINE=/path/to/an/older/ccluster, each round also runs that build (both ways) right
# after this one, for a regression check side by side on the same machine and minute.
# With OTLP=1, each round also runs this build with OpenTelemetry export on
# (OTEL_EXPORTER_OTLP_ENDPOINT) to a local OTLP receiver (tests/otlp/receiver.py --count-only,
# started here on 127.0.0.1 and stopped by its pid), and checks that every span of the run arrived.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v ninja >/dev/null || { echo "ninja is required: apt-get install ninja-build" >&2; exit 1; }
cargo build --release -p ccluster --quiet
bin=$(pwd)/target/release/ccluster
sizes=("$@"); [ ${#sizes[@]} -gt 0 ] || sizes=(1000 10000)
reps=${REPS:-5}

timed() { # appends "wall cpu peak_kb" of a command (its output discarded) to the file $1
  local into=$1 t; shift
  t=$(mktemp)
  /usr/bin/time -o "$t" -f "%e %U %S %M" "$@" > /dev/null 2>&1
  awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }' "$t" >> "$into"
  rm -f "$t"
}

paired() { # median over rounds of (column $3 of file $1) / (column $3 of file $2): runs of one round
  # are minutes apart at most, so the machine's drift cancels out of each ratio
  paste -d' ' "$1" "$2" | awk -v c="$3" '{ print $c / $(c + 3) }' | sort -n |
    awk '{ v[NR] = $1 } END { printf "%.3f", v[int((NR + 1) / 2)] }'
}

median() { # median of column $2 of file $1
  sort -n -k"$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print v[int((NR + 1) / 2)] }'
}

fresh() { rm -rf out .ninja_log .ninja_deps .ccluster; mkdir -p out; sleep 1; }

receiver_pid=
if [ -n "${OTLP:-}" ]; then
  eval "$(scripts/otlp-receiver-for-tests.sh)"   # PYTHON=..., RECEIVER=...
  otlp_out=$(mktemp -d)
  "$PYTHON" "$RECEIVER" --count-only --out "$otlp_out/otlp.jsonl" > "$otlp_out/ready" &
  receiver_pid=$!
  trap 'kill "$receiver_pid" 2>/dev/null || true; rm -rf "$otlp_out"' EXIT
  for _ in $(seq 100); do [ -s "$otlp_out/ready" ] && break; sleep 0.1; done
  otlp_http=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["http"])' "$otlp_out/ready")
fi

spans_received() { # spans in the receiver's file so far
  python3 - "$otlp_out/otlp.jsonl" <<'PY'
import json, sys
n = 0
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["signal"] == "traces":
        n += r["spans"]
print(n)
PY
}

for n in "${sizes[@]}"; do
  dir=bench/out/touch-$n
  rm -rf "$dir"; mkdir -p "$dir"
  python3 - "$dir" "$n" <<'PY'
import sys
d, n = sys.argv[1], int(sys.argv[2])
with open(f"{d}/clusterfile.toml", "w") as f:
    f.write('version = 1\n[workflow]\nname = "touch"\n')
    for k in range(n):
        f.write(f'[tasks.t{k}]\nrun = "touch out/t{k}"\n')
    f.write('[tasks.all]\nneeds = [' + ", ".join(f'"t{k}"' for k in range(n)) + ']\nrun = "touch out/all"\n')
with open(f"{d}/build.ninja", "w") as f:
    f.write("rule touch\n  command = touch $out\n")
    for k in range(n):
        f.write(f"build out/t{k}: touch\n")
    f.write("build out/all: touch | " + " ".join(f"out/t{k}" for k in range(n)) + "\n")
PY
  (
    cd "$dir"
    # One function per column; each round starts at the next one, so that no column always
    # follows the same other one (a cold run is slowed by the files the previous one deleted).
    run_ninja() { fresh; timed ninja.cold ninja -j2; timed ninja.noop ninja -j2; }
    run_cc() { fresh; timed cc.cold "$bin" apply -j2; timed cc.noop "$bin" apply -j2; test -f out/all; }
    run_sh() { fresh; timed sh.cold env CCLUSTER_ALWAYS_SHELL=1 "$bin" apply -j2; test -f out/all; }
    run_base() { fresh; timed base.cold "$BASELINE" apply -j2; test -f out/all; }
    run_basesh() { fresh; timed basesh.cold env CCLUSTER_ALWAYS_SHELL=1 "$BASELINE" apply -j2; test -f out/all; }
    run_otlp() {
      fresh
      local before; before=$(spans_received)
      timed otlp.cold env OTEL_EXPORTER_OTLP_ENDPOINT="$otlp_http" "$bin" apply -j2
      test -f out/all
      # Three spans a task (task, attempt, runner.run) and the run's: none may be lost.
      local got=$(( $(spans_received) - before ))
      [ "$got" -ge $(( 3 * (n + 1) + 1 )) ] || { echo "only $got spans arrived for N=$n" >&2; exit 1; }
    }
    columns=(run_ninja run_cc run_sh)
    [ -z "${BASELINE:-}" ] || columns+=(run_base run_basesh)
    [ -z "${OTLP:-}" ] || columns+=(run_otlp)
    for round in $(seq "$reps"); do
      for k in $(seq 0 $((${#columns[@]} - 1))); do
        "${columns[$(((round + k) % ${#columns[@]}))]}"
      done
    done
    nc=$(median ninja.cold 1); cc=$(median cc.cold 1); sc=$(median sh.cold 1)
    printf 'N=%s, median of %s rounds\n' "$n" "$reps"
    printf '  cold run   ninja %6.2fs (cpu %6.2fs) | ccluster %6.2fs (cpu %6.2fs) ratio %sx | ccluster, all through sh %6.2fs (cpu %6.2fs) ratio %sx\n' \
      "$nc" "$(median ninja.cold 2)" "$cc" "$(median cc.cold 2)" "$(echo "scale=2; $cc / $nc" | bc)" \
      "$sc" "$(median sh.cold 2)" "$(echo "scale=2; $sc / $nc" | bc)"
    printf '  no-op      ninja %6.2fs | ccluster %6.2fs\n' "$(median ninja.noop 1)" "$(median cc.noop 1)"
    printf '  peak RSS   ninja %6.1f MB | ccluster %6.1f MB\n' \
      "$(echo "scale=1; $(median ninja.cold 3) / 1024" | bc)" "$(echo "scale=1; $(median cc.cold 3) / 1024" | bc)"
    printf '  every round (wall cpu peak_kb): ninja [%s] ccluster [%s] through sh [%s]\n' \
      "$(paste -sd, ninja.cold)" "$(paste -sd, cc.cold)" "$(paste -sd, sh.cold)"
    if [ -n "${BASELINE:-}" ]; then
      bc_=$(median base.cold 1); bs=$(median basesh.cold 1)
      printf '  baseline   %6.2fs ratio %sx | all through sh %6.2fs ratio %sx   (%s)\n' \
        "$bc_" "$(echo "scale=2; $bc_ / $nc" | bc)" "$bs" "$(echo "scale=2; $bs / $nc" | bc)" "$BASELINE"
      printf '  every round (wall cpu peak_kb): baseline [%s] through sh [%s]\n' \
        "$(paste -sd, base.cold)" "$(paste -sd, basesh.cold)"
      printf '  this build / baseline: medians %sx wall, cpu %6.2fs / %6.2fs | per round (median): %sx wall, %sx cpu\n' \
        "$(echo "scale=3; $cc / $bc_" | bc)" "$(median cc.cold 2)" "$(median base.cold 2)" \
        "$(paired cc.cold base.cold 1)" "$(paired cc.cold base.cold 2)"
    fi
    if [ -n "${OTLP:-}" ]; then
      oc=$(median otlp.cold 1)
      printf '  OTLP on    %6.2fs (cpu %6.2fs, peak %6.1f MB) | OTLP on / off: medians %sx | per round (median): %sx wall, %sx cpu\n' \
        "$oc" "$(median otlp.cold 2)" "$(echo "scale=1; $(median otlp.cold 3) / 1024" | bc)" \
        "$(echo "scale=3; $oc / $cc" | bc)" "$(paired otlp.cold cc.cold 1)" "$(paired otlp.cold cc.cold 2)"
      printf '  every round (wall cpu peak_kb): OTLP on [%s]\n' "$(paste -sd, otlp.cold)"
    fi
  )
done
