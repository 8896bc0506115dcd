#!/usr/bin/env bash
# A real single-node Kubernetes (1.20.2) for the tests, in a network namespace of its own.
#
#   scripts/k8s-for-tests.sh build          builds kube-apiserver, kube-controller-manager,
#                                           kube-scheduler and kubelet from Debian bookworm's
#                                           `kubernetes` source package with Go 1.19 (4-5
#                                           minutes on 2 cores, once) into
#                                           ~/.cache/ccluster/k8s-1.20.2/bin/; with the cache
#                                           present it does nothing
#   scripts/k8s-for-tests.sh start DIR      builds if needed, then starts inside a new network
#                                           namespace (loopback, and the node address
#                                           198.51.100.10 that exists only there): the Docker
#                                           daemon of scripts/docker-for-tests.sh (state under
#                                           DIR/docker), etcd, the API server (token auth,
#                                           serving certificate from a CA made here), controller
#                                           manager, scheduler and kubelet (dockershim to that
#                                           dockerd); imports the pause and busybox test images;
#                                           writes DIR/kubeconfig and DIR/netns.pid; waits until
#                                           the node is Ready and the default service account
#                                           exists (about 20 s); prints `DOCKER_HOST=...`, then
#                                           `KUBECONFIG=DIR/kubeconfig` as the last line
#   scripts/k8s-for-tests.sh start DIR debian
#                                           the same, and imports the glibc image too
#   scripts/k8s-for-tests.sh stop DIR       stops everything start started, by pid (kubelet
#                                           first, then the pods' containers, the control
#                                           plane, etcd, dockerd last), and waits for it to go
#
# The API server listens on 127.0.0.1:16443 inside the namespace only. Run a program there with
#   nsenter --net=/proc/$(cat DIR/netns.pid)/ns/net env KUBECONFIG=DIR/kubeconfig PROGRAM
#
# Images (no registry is ever contacted; pods must use `imagePullPolicy: Never` or IfNotPresent):
#   ccluster-test/busybox:1   busybox's shell and tools (from busybox-static, as docker-for-tests.sh)
#   ccluster-test/debian:1    Debian bookworm minbase with git (only with `debian`)
#   ccluster-test/pause:3.2   the pod sandbox, built from the Kubernetes source's pause.c
#
# Cache: ~/.cache/ccluster/k8s-1.20.2/{bin/,pause/pause,SOURCE}, built under the lock
# ~/.cache/ccluster/k8s-1.20.2.lock into a temporary directory that is renamed into place at
# the end, so parallel callers wait for one build and an interrupted build leaves no cache.
# Installs Debian's golang-1.19-go, golang-github-modern-go-reflect2-dev, rsync, gcc, libc6-dev,
# etcd-server, openssl, curl, iproute2, util-linux when missing. See docs/k8s-tests.md.
set -euo pipefail

version=1.20.2
cache="$HOME/.cache/ccluster/k8s-$version"
here=$(cd "$(dirname "$0")" && pwd)
token=ccluster-test-token
port=16443
node_ip=198.51.100.10
# kubectl too: the tests and the benchmark use it, and a fresh machine may not have one.
components="kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl"
# What the cache holds, first line of its SOURCE file: a cache built otherwise is built again.
recipe="kubernetes $version from Debian bookworm source, Go 1.19, OOM-score patches, reflect2 1.0.2, kubectl"

have() { case "$1" in /*) [ -e "$1" ] ;; *) command -v "$1" >/dev/null 2>&1 ;; esac; }

need() { # installs Debian package $2 when command (or file) $1 is missing
  have "$1" && return
  # One install at a time, under the lock scripts/docker-for-tests.sh installs under.
  mkdir -p "$HOME/.cache/ccluster/images"
  (
    exec 7> "$HOME/.cache/ccluster/images/.lock"
    flock 7
    have "$1" && exit 0
    echo "installing $2" >&2
    apt-get install -y -qq "$2" >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$2" >/dev/null; }
  )
}

built() {
  local c
  for c in $components; do [ -x "$cache/bin/$c" ] || return 1; done
  [ -x "$cache/pause/pause" ] && [ "$(head -n 1 "$cache/SOURCE" 2>/dev/null)" = "$recipe" ]
}

build() {
  built && return 0
  mkdir -p "$HOME/.cache/ccluster"
  exec 8> "$cache.lock"
  flock 8
  if built; then exec 8>&-; return 0; fi # another caller built it while we waited
  need /usr/lib/go-1.19/bin/go golang-1.19-go # it puts no `go` on PATH
  need rsync rsync
  need gcc gcc
  need /usr/lib/x86_64-linux-gnu/libc.a libc6-dev # for the static pause
  need /usr/share/gocode/src/github.com/modern-go/reflect2/go_above_118.go golang-github-modern-go-reflect2-dev
  rm -rf "$HOME/.cache/ccluster"/.k8s-build.* # left by interrupted builds (we hold the lock)
  local start=$SECONDS
  # Beside the cache, so the final rename stays on one file system.
  work=$(mktemp -d "$HOME/.cache/ccluster/.k8s-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT # $work is global: the trap runs after this function
  echo "building Kubernetes $version from Debian source (about 6 minutes on 2 cores; cached in $cache)" >&2
  (
    set -e
    cd "$work"
    # The source package from bookworm's deb-src, without touching the system's apt lists.
    local aptsrc=$work/aptsrc
    mkdir -p "$aptsrc/lists/partial"
    sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources | head -1 \
      | sed 's|^|deb-src |; s|$| bookworm main|' > "$aptsrc/src.list"
    local a=(-o "Dir::Etc::SourceList=$aptsrc/src.list" -o Dir::Etc::SourceParts=/nonexistent
             -o "Dir::State::Lists=$aptsrc/lists")
    apt-get "${a[@]}" update -qq
    apt-get "${a[@]}" source --download-only kubernetes
    local orig
    orig=$(ls kubernetes_*.orig.tar.gz | head -1)
    case "$orig" in
      "kubernetes_$version.orig.tar.gz" | kubernetes_*+really$version.orig.tar.gz) ;; # 1.20.5+really1.20.2
      *) echo "expected the source of Kubernetes $version, got $orig" >&2; exit 1 ;;
    esac
    tar xzf "$orig"
    cd "$(ls -d kubernetes-*/ | head -1)"
    # These machines refuse a negative OOM score: without these two, runc fails with
    # "can't get final child's PID from pipe: EOF".
    sed -i 's/defaultSandboxOOMAdj int = -998/defaultSandboxOOMAdj int = 0/' pkg/kubelet/dockershim/docker_sandbox.go
    sed -i 's/guaranteedOOMScoreAdj int = -997/guaranteedOOMScoreAdj int = 0/' pkg/kubelet/qos/policy.go
    grep -q 'defaultSandboxOOMAdj int = 0' pkg/kubelet/dockershim/docker_sandbox.go
    grep -q 'guaranteedOOMScoreAdj int = 0' pkg/kubelet/qos/policy.go
    # The vendored modern-go/reflect2 1.0.1 is broken by Go 1.18+ (it links runtime.mapiterinit
    # with its old signature): the API server segfaults when json-iterator encodes a map, as it
    # does for ?pretty=true and for clients whose User-Agent starts with curl. Debian's 1.0.2
    # has the fix; its source replaces the vendored copy (the tree builds in GOPATH mode).
    rm -rf vendor/github.com/modern-go/reflect2
    cp -rL /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
    mkdir -p "$work/gohome"
    # `make` (not `go build`): the tree builds in GOPATH mode and needs its generated code.
    PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 HOME=$work/gohome \
      nice -n 10 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kubectl" \
      > "$work/make.log" 2>&1 || { tail -40 "$work/make.log" >&2; exit 1; }
    local out=_output/bin
    [ -x "$out/kubelet" ] || out=_output/local/bin/linux/amd64
    mkdir -p "$work/cache/bin" "$work/cache/pause"
    for c in $components; do cp "$out/$c" "$work/cache/bin/$c"; done
    # The pod sandbox: a static pause, imported as an image at start.
    gcc -static -O2 -o "$work/cache/pause/pause" build/pause/linux/pause.c
    printf '%s\n%s\n' "$recipe" "$orig" > "$work/cache/SOURCE"
  )
  rm -rf "$cache"
  mv "$work/cache" "$cache"
  rm -rf "$work"
  trap - EXIT
  exec 8>&-
  echo "built Kubernetes $version in $((SECONDS - start)) s" >&2
}

# Runs a command in the cluster's network namespace.
inns() { nsenter --net="/proc/$(cat "$dir/netns.pid")/ns/net" "$@"; }

api() { # GETs an API path inside the namespace; prints the body, fails on an HTTP error
  # (Not curl's User-Agent: the API server pretty-prints JSON for curl.)
  inns curl -sSf --max-time 5 -A k8s-for-tests --cacert "$dir/pki/ca.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$port$1"
}

# Starts daemon $1 (logging to DIR/$1.log) inside the namespace; its pid goes to DIR/pids/$1.pid
# (nsenter joins the namespace and execs: the pid is the daemon's).
daemon() {
  local name=$1; shift
  nsenter --net="/proc/$(cat "$dir/netns.pid")/ns/net" "$@" \
    < /dev/null > "$dir/$name.log" 2>&1 7>&- 8>&- 9>&- &
  echo $! > "$dir/pids/$name.pid"
}

fail() { # message, log
  local crash
  # A Go program that crashed: where it did, not the end of its goroutine dump.
  crash=$(grep -n -m 1 -E '^(panic: |fatal error: |F[0-9]{4} )' "$2" 2>/dev/null | cut -d: -f1 || true)
  if [ -n "$crash" ]; then
    echo "k8s-for-tests: $1; $2 from line $crash:" >&2
    sed -n "$((crash > 5 ? crash - 5 : 1)),$((crash + 25))p" "$2" >&2
  else
    echo "k8s-for-tests: $1; the end of $2:" >&2
    tail -n 30 "$2" >&2 || true
  fi
  exit 1
}

alive() { # fails naming the first daemon started that has exited, with its log
  local f name
  for f in "$dir"/pids/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    running "$(cat "$f")" || fail "$name exited" "$dir/$name.log"
  done
}

# Waits up to $3 seconds for the command after it to succeed while the daemons live; fails
# with the end of the log of $1 ($2) when it does not.
wait_for() {
  local name=$1 log=$2 limit=$3 t0=$SECONDS; shift 3
  until "$@" >/dev/null 2>&1; do
    alive
    [ $((SECONDS - t0)) -lt "$limit" ] || fail "$name: not up within $limit s" "$log"
    sleep 0.5
  done
}

node_ready() { api /api/v1/nodes/localhost | grep -q '"type":"Ready","status":"True"'; }
# In 1.20 the ServiceAccount admission refuses pods until the account has its token secret.
default_sa() { api /api/v1/namespaces/default/serviceaccounts/default | grep -q '"secrets":\[{'; }

start() {
  dir=$1
  local images=$2 t0=$SECONDS
  build
  need etcd etcd-server
  need openssl openssl
  need curl curl
  need nsenter util-linux
  need ip iproute2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -s "$dir/netns.pid" ] && running "$(cat "$dir/netns.pid")"; then
    echo "k8s-for-tests: a cluster runs in $dir already (stop it first)" >&2
    exit 1
  fi
  # From here on, a failure stops whatever was started.
  trap 'rc=$?; if [ $rc -ne 0 ]; then stop "$dir" >&2 || true; fi' EXIT
  trap 'exit 130' INT TERM
  unmount_under "$dir/kubelet"
  rm -rf "$dir/etcd" "$dir/kubelet" "$dir/pids" "$dir"/*.log "$dir/netns.pid" "$dir/netns.id"
  mkdir -p "$dir/pids" "$dir/pki" "$dir/kubelet"

  # The Docker daemon of the Docker runner's tests, in a new network namespace (unshare -n,
  # loopback up), with the busybox (and the Debian) test image.
  local docker_host
  docker_host=$("$here/docker-for-tests.sh" start "$dir/docker" "$images" | tail -n 1)
  export DOCKER_HOST=${docker_host#DOCKER_HOST=}
  # The namespace is dockerd's; its holder, stopped last, is DIR/netns.pid.
  local ns holder
  ns=$(readlink "/proc/$(cat "$dir/docker/docker.pid")/ns/net")
  if [ -z "$ns" ] || [ "$ns" = "$(readlink /proc/$$/ns/net)" ] || [ "$ns" = "$(readlink /proc/1/ns/net)" ]; then
    echo "k8s-for-tests: dockerd is not in a network namespace of its own" >&2
    exit 1
  fi
  echo "$ns" > "$dir/netns.id"
  nsenter --net="/proc/$(cat "$dir/docker/docker.pid")/ns/net" sleep infinity \
    < /dev/null > /dev/null 2>&1 7>&- 8>&- 9>&- &
  holder=$!
  echo "$holder" > "$dir/netns.pid"
  for _ in $(seq 1 50); do # until the holder has joined (after the fork, before nsenter)
    [ "$(readlink "/proc/$holder/ns/net" 2>/dev/null)" = "$ns" ] && break
    sleep 0.1
  done
  [ "$(readlink "/proc/$holder/ns/net" 2>/dev/null)" = "$ns" ] || { echo "k8s-for-tests: the namespace's holder did not join it" >&2; exit 1; }
  inns ip link set lo up
  inns ip addr add "$node_ip/32" dev lo

  # The pod sandbox image.
  if ! docker image inspect ccluster-test/pause:3.2 >/dev/null 2>&1; then
    tar -C "$cache/pause" -c pause | docker import -c 'ENTRYPOINT ["/pause"]' - ccluster-test/pause:3.2 >/dev/null
  fi

  # Credentials: a token for everyone (system:masters), the service-account signing key, a CA
  # and the API server's serving certificate signed by it (for 127.0.0.1, the node address and
  # the `kubernetes` service's names); kept across starts in the same DIR.
  printf '%s,admin,admin,system:masters\n' "$token" > "$dir/tokens.csv"
  (
    cd "$dir/pki"
    [ -s sa.key ] || { openssl genrsa -out sa.key 2048 && openssl rsa -in sa.key -pubout -out sa.pub; } 2>/dev/null
    if [ ! -s apiserver.crt ]; then
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
        -keyout ca.key -out ca.crt -subj /CN=ccluster-test-ca \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver 2>/dev/null
      printf '%s\n' \
        "subjectAltName=IP:127.0.0.1,IP:$node_ip,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local" \
        "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
        "extendedKeyUsage=serverAuth" > apiserver.ext
      openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    fi
  )
  cat > "$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: ccluster-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 < "$dir/pki/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: ccluster-test
  context: {cluster: ccluster-test, user: admin, namespace: default}
current-context: ccluster-test
KUBECONFIG
  # The kubelet settings that work on these machines (cgroup v1, no QoS cgroups, no swap check,
  # no image GC, eviction only at the very end).
  cat > "$dir/kubelet-config.yaml" <<'KUBELET'
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization:
  mode: AlwaysAllow
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
makeIPTablesUtilChains: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
staticPodPath: ""
KUBELET

  daemon etcd etcd --name ccluster-test --data-dir "$dir/etcd" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster ccluster-test=http://127.0.0.1:23800
  wait_for etcd "$dir/etcd.log" 30 inns curl -sf --max-time 2 http://127.0.0.1:23790/health

  # ttlSecondsAfterFinished is alpha in 1.20: on here, off by default on a real 1.20 cluster.
  local gates=TTLAfterFinished=true
  daemon kube-apiserver "$cache/bin/kube-apiserver" --etcd-servers=http://127.0.0.1:23790 \
    --secure-port=$port --bind-address=127.0.0.1 --advertise-address=$node_ip --insecure-port=0 \
    --tls-cert-file="$dir/pki/apiserver.crt" --tls-private-key-file="$dir/pki/apiserver.key" \
    --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 --kubelet-preferred-address-types=Hostname \
    --feature-gates=$gates
  wait_for kube-apiserver "$dir/kube-apiserver.log" 90 api /readyz

  daemon kube-controller-manager "$cache/bin/kube-controller-manager" --kubeconfig="$dir/kubeconfig" \
    --leader-elect=false --secure-port=0 --port=0 \
    --controllers=job,garbagecollector,namespace,serviceaccount,serviceaccount-token,ttl-after-finished,podgc,nodelifecycle \
    --service-account-private-key-file="$dir/pki/sa.key" --root-ca-file="$dir/pki/ca.crt" \
    --feature-gates=$gates
  daemon kube-scheduler "$cache/bin/kube-scheduler" --kubeconfig="$dir/kubeconfig" \
    --leader-elect=false --secure-port=0 --port=0
  daemon kubelet env AWS_EC2_METADATA_DISABLED=true "$cache/bin/kubelet" \
    --kubeconfig="$dir/kubeconfig" --config="$dir/kubelet-config.yaml" \
    --root-dir="$dir/kubelet" --cert-dir="$dir/kubelet/pki" --hostname-override=localhost \
    --node-ip=$node_ip --container-runtime=docker --docker-endpoint="$DOCKER_HOST" \
    --pod-infra-container-image=ccluster-test/pause:3.2 --network-plugin= --feature-gates=$gates
  wait_for kubelet "$dir/kubelet.log" 120 node_ready
  wait_for kube-controller-manager "$dir/kube-controller-manager.log" 60 default_sa
  alive
  trap - EXIT INT TERM
  echo "k8s-for-tests: Kubernetes $version ready in $((SECONDS - t0)) s" >&2
  echo "DOCKER_HOST=$DOCKER_HOST"
  echo "KUBECONFIG=$dir/kubeconfig"
}

unmount_under() { # unmounts whatever is mounted under $1, deepest first
  local m
  awk -v d="$1/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}

# Whether process $1 runs: a zombie does not (our daemons' parent has exited; until whoever
# adopted them reaps them, kill -0 still succeeds).
running() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# Stops the process in pid file $1 if it still is ours (in the cluster's namespace): TERM, then
# KILL after 15 s; waits for it to go.
stop_pid() {
  local file=$1 pid
  pid=$(cat "$file" 2>/dev/null) || return 0
  if [ -n "$netns" ] && [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" = "$netns" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
      running "$pid" || break
      sleep 0.1
    done
    if running "$pid"; then
      echo "k8s-for-tests: $(basename "$file" .pid) ignored TERM, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do
        running "$pid" || break
        sleep 0.1
      done
      ! running "$pid" || echo "k8s-for-tests: $pid did not go" >&2
    fi
  fi
  rm -f "$file"
}

in_namespace() { # pids of the user processes in the cluster's namespace
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/net" 2>/dev/null)" = "$netns" ] || continue
    [ -s "$p/cmdline" ] || continue # kernel threads, zombies
    [ "${p#/proc/}" = "$$" ] || [ "${p#/proc/}" = "$BASHPID" ] || echo "${p#/proc/}"
  done
  return 0
}

stop() {
  dir=$1
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  netns=$(cat "$dir/netns.id" 2>/dev/null || true)
  # Only ever a namespace of our own: never this script's or init's (then nothing is signalled
  # by namespace, and the pid files' processes are left alone).
  if [ -n "$netns" ] && { [ "$netns" = "$(readlink /proc/$$/ns/net)" ] || [ "$netns" = "$(readlink /proc/1/ns/net)" ]; }; then
    echo "k8s-for-tests: $dir/netns.id names the host's network namespace; not stopping by namespace" >&2
    netns=
  fi
  # The kubelet first, so that nothing restarts the pods' containers; then the containers,
  # while their daemon still runs, and the kubelet's mounts (service-account tokens).
  stop_pid "$dir/pids/kubelet.pid"
  if [ -S "$dir/docker/docker.sock" ]; then
    local ids
    ids=$(DOCKER_HOST="unix://$dir/docker/docker.sock" docker ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || DOCKER_HOST="unix://$dir/docker/docker.sock" docker rm -f $ids >/dev/null 2>&1 || true
  fi
  unmount_under "$dir/kubelet"
  stop_pid "$dir/pids/kube-scheduler.pid"
  stop_pid "$dir/pids/kube-controller-manager.pid"
  stop_pid "$dir/pids/kube-apiserver.pid"
  stop_pid "$dir/pids/etcd.pid"
  [ ! -d "$dir/docker" ] || "$here/docker-for-tests.sh" stop "$dir/docker"
  if [ -n "$netns" ]; then
    # Whatever else is still in the namespace (a test's program) goes too, by pid.
    local holder p
    holder=$(cat "$dir/netns.pid" 2>/dev/null || true)
    for p in $(in_namespace); do
      [ "$p" = "$holder" ] && continue
      echo "k8s-for-tests: still in the namespace, stopping $p: $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null)" >&2
      echo "$p" > "$dir/pids/left.pid"
      stop_pid "$dir/pids/left.pid"
    done
    stop_pid "$dir/netns.pid"
  fi
  unmount_under "$dir"
  rm -f "$dir/netns.id"
}


case "${1:-}" in
  build) build ;;
  start) start "${2:?a directory}" "${3:-}" ;;
  stop) stop "${2:?a directory}" ;;
  *) echo "usage: $0 build | start DIR [debian] | stop DIR" >&2; exit 2 ;;
esac
