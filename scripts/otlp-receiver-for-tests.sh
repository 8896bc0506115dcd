#!/usr/bin/env bash
# The OTLP receiver for the telemetry tests (tests/otlp/receiver.py) and the Python to run it with.
#
#   scripts/otlp-receiver-for-tests.sh    prints two lines, `PYTHON=<venv python>` and `RECEIVER=<path>`
#
# Installs the pinned PyPI packages it needs (opentelemetry-proto, grpcio, protobuf) into a venv under
# ~/.cache/ccluster/otlp-venv-<versions> when it is not there yet; installs Debian's python3-venv
# with apt-get when venv is missing (as root). Fails loudly (exit 1, the reason on stderr) when it
# cannot: the telemetry tests never skip.
#
# To check the receiver itself:  eval "$(scripts/otlp-receiver-for-tests.sh)" && "$PYTHON" tests/otlp/selfcheck.py
set -euo pipefail

otel_proto_version=1.45.2
grpcio_version=1.85.1
protobuf_version=7.36.2

receiver="$(cd "$(dirname "$0")/.." && pwd)/tests/otlp/receiver.py"
[ -f "$receiver" ] || { echo "error: no receiver at $receiver" >&2; exit 1; }
cache="${XDG_CACHE_HOME:-$HOME/.cache}/ccluster"
venv="$cache/otlp-venv-proto$otel_proto_version-grpcio$grpcio_version-protobuf$protobuf_version"
python="$venv/bin/python"

venv_works() {
  [ -x "$python" ] && "$python" -c '
import grpc, google.protobuf, sys
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
sys.exit(0 if (grpc.__version__, google.protobuf.__version__) == (sys.argv[1], sys.argv[2]) else 1)
' "$grpcio_version" "$protobuf_version" 2>/dev/null
}

if ! venv_works; then
  mkdir -p "$cache"
  # Tests start in parallel: one installs, the others wait for it.
  exec 9>"$cache/otlp-venv.lock"
  flock 9
  if ! venv_works; then
    # Debian's own Python first: a pyenv shim may point elsewhere on another machine.
    base_python=$(command -v /usr/bin/python3 || command -v python3 || true)
    [ -n "$base_python" ] || { echo "error: python3 is needed (apt-get install python3 python3-venv)" >&2; exit 1; }
    if ! "$base_python" -c 'import venv, ensurepip' 2>/dev/null; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing python3-venv with apt-get" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q python3-venv >&2 \
          || { apt-get update -q >&2 && apt-get install -y -q python3-venv >&2; }
      else
        echo "error: python3's venv module is needed (apt-get install python3-venv)" >&2
        exit 1
      fi
    fi
    echo "installing opentelemetry-proto $otel_proto_version, grpcio $grpcio_version, protobuf $protobuf_version into $venv" >&2
    rm -rf "$venv"
    "$base_python" -m venv "$venv" >&2
    "$python" -m pip install --quiet --disable-pip-version-check \
      "opentelemetry-proto==$otel_proto_version" "grpcio==$grpcio_version" "protobuf==$protobuf_version" >&2 \
      || { rm -rf "$venv"; echo "error: pip could not install the OTLP receiver's packages" >&2; exit 1; }
    venv_works || { echo "error: the venv at $venv does not import grpc and opentelemetry.proto" >&2; exit 1; }
  fi
fi
echo "PYTHON=$python"
echo "RECEIVER=$receiver"
