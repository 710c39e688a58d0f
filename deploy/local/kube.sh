#!/usr/bin/env bash
# Tessera local Kubernetes control plane for the operator's tests: etcd + kube-apiserver (and
# helm for the chart checks), built with Go from their modules, on 127.0.0.1 only.
#
#   deploy/local/kube.sh install   build etcd, kube-apiserver and helm into the cache (idempotent)
#   deploy/local/kube.sh up        install if needed, start what is not running, wait for /readyz
#   deploy/local/kube.sh down      stop what `up` started (pid files; SIGTERM, then SIGKILL)
#   deploy/local/kube.sh status    show each server; exit 0 only if both are running and ready
#   deploy/local/kube.sh env       print `export` lines (KUBECONFIG, TESSERA_HELM_BIN)
#   deploy/local/kube.sh helm ...  run the cached helm binary
#
# Only the API server runs (no kube-controller-manager, scheduler or kubelet): CRDs, RBAC,
# Deployments/Services/... as stored objects, status subresources and events work; pods are
# never created or run and ownerReference garbage collection does not happen.
# Versions are pinned in deploy/local/versions.env.
#
# Folders (TESSERA_HOME defaults to <repo>/.tessera, which is git-ignored):
#   ${TESSERA_CACHE_DIR:-$TESSERA_HOME/cache}/{kubernetes,etcd,helm}   binaries + stamp files
#   ${TESSERA_STACK_DIR:-$TESSERA_HOME/stack}/kube    certs, keys, token file, kubeconfig,
#                                                     etcd data, logs/, run/*.pid
# Overrides: TESSERA_KUBE_API_PORT [16443] TESSERA_ETCD_PORT [12379] TESSERA_ETCD_PEER_PORT [12380]
#   TESSERA_READY_TIMEOUT [180 s per server] TESSERA_STOP_TIMEOUT [30 s per server]
# shellcheck source-path=SCRIPTDIR disable=SC2317 # functions are called through variables
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# shellcheck source=versions.env
. "$SCRIPT_DIR/versions.env"

TESSERA_HOME=${TESSERA_HOME:-$REPO_ROOT/.tessera}
CACHE_DIR=${TESSERA_CACHE_DIR:-$TESSERA_HOME/cache}
STACK_DIR=${TESSERA_STACK_DIR:-$TESSERA_HOME/stack}
KUBE_DIR=$STACK_DIR/kube
LOG_DIR=$KUBE_DIR/logs
RUN_DIR=$KUBE_DIR/run
PKI_DIR=$KUBE_DIR/pki
ETCD_DATA=$KUBE_DIR/etcd
KUBECONFIG_FILE=$KUBE_DIR/kubeconfig
TOKEN_FILE=$PKI_DIR/tokens.csv

HOST=127.0.0.1 # deliberately not configurable
API_PORT=${TESSERA_KUBE_API_PORT:-16443}
ETCD_PORT=${TESSERA_ETCD_PORT:-12379}
ETCD_PEER_PORT=${TESSERA_ETCD_PEER_PORT:-12380}
READY_TIMEOUT=${TESSERA_READY_TIMEOUT:-180}
STOP_TIMEOUT=${TESSERA_STOP_TIMEOUT:-30}

KUBE_CACHE=$CACHE_DIR/kubernetes
APISERVER_BIN=$KUBE_CACHE/bin/kube-apiserver
ETCD_CACHE=$CACHE_DIR/etcd
ETCD_BIN=$ETCD_CACHE/bin/etcd
HELM_CACHE=$CACHE_DIR/helm
HELM_BIN=$HELM_CACHE/bin/helm
BUILD_TIMES_LOG=$CACHE_DIR/build-times.log

SERVERS=(etcd apiserver) # start order; `down` stops in reverse

# --------------------------------------------------------------------------------------------
# helpers

log() { printf '[kube] %s\n' "$*" >&2; }

die() {
  printf '[kube] ERROR: %s\n' "$*" >&2
  exit 1
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH${2:+ ($2)}"
}

stamp_matches() { # stamp_file expected_content
  [[ -f $1 ]] && [[ "$(cat "$1")" == "$2" ]]
}

record_build_time() { # component seconds
  mkdir -p "$CACHE_DIR"
  printf '%s\t%s\t%ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" >>"$BUILD_TIMES_LOG"
  log "$1: built in ${2}s"
}

go_env() {
  need go "Go is needed to build etcd, kube-apiserver and helm"
  export GOTOOLCHAIN=local
  GOPATH=${GOPATH:-$(go env GOPATH)}
  GOMODCACHE=${GOMODCACHE:-$(go env GOMODCACHE)}
  GOCACHE=${GOCACHE:-$(go env GOCACHE)}
  export GOPATH GOMODCACHE GOCACHE
  export CGO_ENABLED=0
  export GOFLAGS="-mod=mod -buildvcs=false"
}

# JSON field of `go mod download -json` output
json_field() { # field <<<json
  python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

# --------------------------------------------------------------------------------------------
# install

kube_stamp() {
  printf '%s@%s staging=%s wrapper-module CGO_ENABLED=0 -trimpath kube-apiserver\n' \
    "$KUBERNETES_MODULE" "$KUBERNETES_VERSION" "$KUBE_STAGING_VERSION"
}

etcd_stamp() { printf '%s@%s wrapper-module CGO_ENABLED=0 -trimpath\n' "$ETCD_MODULE" "$ETCD_VERSION"; }
helm_stamp() { printf '%s@%s wrapper-module CGO_ENABLED=0 -trimpath\n' "$HELM_MODULE" "$HELM_VERSION"; }

apiserver_installed() { stamp_matches "$KUBE_CACHE/stamp" "$(kube_stamp)" && [[ -x $APISERVER_BIN ]]; }
etcd_installed() { stamp_matches "$ETCD_CACHE/stamp" "$(etcd_stamp)" && [[ -x $ETCD_BIN ]]; }
helm_installed() { stamp_matches "$HELM_CACHE/stamp" "$(helm_stamp)" && [[ -x $HELM_BIN ]]; }

# k8s.io/kubernetes replaces its staging modules (k8s.io/api, k8s.io/client-go, ...) with
# ./staging/... paths, which a dependent module cannot use. The wrapper module requires
# k8s.io/kubernetes and replaces each of those staging modules with its published version.
install_apiserver() {
  if apiserver_installed; then
    log "kube-apiserver $KUBERNETES_VERSION: cached ($APISERVER_BIN)"
    return 0
  fi
  go_env
  log "kube-apiserver $KUBERNETES_VERSION: building through a wrapper module ($(go env GOVERSION)); this takes 10-25 min cold"
  local start build json gomod staging minor tmp_bin
  start=$SECONDS
  build=$KUBE_CACHE/build
  rm -rf "$build"
  mkdir -p "$build"
  json=$(cd "$build" && go mod download -json "$KUBERNETES_MODULE@$KUBERNETES_VERSION") ||
    die "kube-apiserver: go mod download $KUBERNETES_MODULE@$KUBERNETES_VERSION failed"
  gomod=$(json_field GoMod <<<"$json")
  [[ -f $gomod ]] || die "kube-apiserver: no go.mod in the output of go mod download"
  staging=$(go mod edit -json "$gomod" | python3 -c '
import json, sys
for r in json.load(sys.stdin).get("Replace") or []:
    new = r["New"]
    if not new.get("Version") and new["Path"].startswith("./staging/"):
        print(r["Old"]["Path"])
')
  [[ -n $staging ]] || die "kube-apiserver: found no staging replace lines in $gomod"
  (
    cd "$build"
    go mod init local/tessera-kube-build >/dev/null 2>&1
    local m
    for m in $staging; do go mod edit -replace="$m=$m@$KUBE_STAGING_VERSION"; done
    go get "$KUBERNETES_MODULE/cmd/kube-apiserver@$KUBERNETES_VERSION"
  ) || die "kube-apiserver: resolving the wrapper module failed"
  minor=${KUBERNETES_VERSION#v1.}
  minor=${minor%%.*}
  tmp_bin=$KUBE_CACHE/bin.tmp.$$
  rm -rf "$tmp_bin"
  mkdir -p "$tmp_bin"
  (cd "$build" && go build -trimpath -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=$minor \
    -X k8s.io/component-base/version.gitTreeState=clean" \
    -o "$tmp_bin/kube-apiserver" "$KUBERNETES_MODULE/cmd/kube-apiserver") ||
    die "kube-apiserver: go build failed"
  "$tmp_bin/kube-apiserver" --version >/dev/null || die "kube-apiserver: the built binary does not run"
  mkdir -p "$(dirname "$APISERVER_BIN")"
  mv -f "$tmp_bin/kube-apiserver" "$APISERVER_BIN"
  rm -rf "$tmp_bin" "$build"
  kube_stamp >"$KUBE_CACHE/stamp"
  record_build_time "kube-apiserver-$KUBERNETES_VERSION" $((SECONDS - start))
}

# a plain wrapper module: require the module, build the package
build_go_tool() { # name cache_dir module version package out_bin ldflags
  local name=$1 cache=$2 module=$3 version=$4 pkg=$5 out=$6 ldflags=$7 start build tmp_bin
  go_env
  log "$name $version: building through a wrapper module ($(go env GOVERSION))"
  start=$SECONDS
  build=$cache/build
  rm -rf "$build"
  mkdir -p "$build"
  (
    cd "$build"
    go mod init "local/tessera-$name-build" >/dev/null 2>&1
    go get "$pkg@$version"
  ) || die "$name: go get $pkg@$version failed"
  tmp_bin=$cache/bin.tmp.$$
  rm -rf "$tmp_bin"
  mkdir -p "$tmp_bin"
  (cd "$build" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp_bin/$name" "$pkg") ||
    die "$name: go build $pkg failed"
  "$tmp_bin/$name" version >/dev/null 2>&1 || "$tmp_bin/$name" --version >/dev/null 2>&1 ||
    die "$name: the built binary does not run"
  mkdir -p "$(dirname "$out")"
  mv -f "$tmp_bin/$name" "$out"
  rm -rf "$tmp_bin" "$build"
  record_build_time "$name-$version" $((SECONDS - start))
  : "$module"
}

install_etcd() {
  if etcd_installed; then
    log "etcd $ETCD_VERSION: cached ($ETCD_BIN)"
    return 0
  fi
  build_go_tool etcd "$ETCD_CACHE" "$ETCD_MODULE" "$ETCD_VERSION" "$ETCD_MODULE" "$ETCD_BIN" ""
  etcd_stamp >"$ETCD_CACHE/stamp"
}

install_helm() {
  if helm_installed; then
    log "helm $HELM_VERSION: cached ($HELM_BIN)"
    return 0
  fi
  build_go_tool helm "$HELM_CACHE" "$HELM_MODULE" "$HELM_VERSION" "$HELM_MODULE/cmd/helm" "$HELM_BIN" \
    "-X $HELM_MODULE/internal/version.version=$HELM_VERSION"
  helm_stamp >"$HELM_CACHE/stamp"
}

# one build of a component at a time (two `up`s started together must not build into the same
# folder); each component has its own lock, so `up` need not wait for a helm build
locked() { # component install-function
  local fd
  mkdir -p "$CACHE_DIR"
  exec {fd}>"$CACHE_DIR/.kube-install-$1.lock"
  flock "$fd"
  "$2"
  exec {fd}>&-
}

cmd_install_servers() {
  locked etcd install_etcd
  locked apiserver install_apiserver
}

cmd_install() {
  cmd_install_servers
  locked helm install_helm
}

# --------------------------------------------------------------------------------------------
# certificates, keys, token, kubeconfig (generated once per stack folder)

admin_token() { cut -d, -f1 <"$TOKEN_FILE"; }

write_pki() {
  need openssl
  mkdir -p "$PKI_DIR"
  chmod 700 "$PKI_DIR"
  if [[ ! -f $PKI_DIR/ca.crt ]]; then
    log "generating a CA, the serving certificate and the service-account key pair in $PKI_DIR"
    openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 -subj "/CN=tessera-kube-ca" \
      -keyout "$PKI_DIR/ca.key" -out "$PKI_DIR/ca.crt" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=kube-apiserver" \
      -keyout "$PKI_DIR/apiserver.key" -out "$PKI_DIR/apiserver.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc" \
      "extendedKeyUsage=serverAuth" "keyUsage=critical,digitalSignature,keyEncipherment" >"$PKI_DIR/apiserver.ext"
    openssl x509 -req -sha256 -days 3650 -in "$PKI_DIR/apiserver.csr" -CA "$PKI_DIR/ca.crt" \
      -CAkey "$PKI_DIR/ca.key" -CAcreateserial -extfile "$PKI_DIR/apiserver.ext" \
      -out "$PKI_DIR/apiserver.crt" 2>/dev/null
    openssl genrsa -out "$PKI_DIR/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI_DIR/sa.key" -pubout -out "$PKI_DIR/sa.pub" 2>/dev/null
  fi
  if [[ ! -f $TOKEN_FILE ]]; then
    printf '%s,tessera-admin,tessera-admin,"system:masters"\n' "$(openssl rand -hex 24)" >"$TOKEN_FILE"
  fi
  chmod 600 "$PKI_DIR"/*.key "$TOKEN_FILE"
  cat >"$KUBECONFIG_FILE" <<EOF
# Written by deploy/local/kube.sh; edit the script, not this file.
apiVersion: v1
kind: Config
clusters:
- name: tessera-local
  cluster:
    server: https://$HOST:$API_PORT
    certificate-authority-data: $(base64 -w0 <"$PKI_DIR/ca.crt")
users:
- name: tessera-admin
  user:
    token: $(admin_token)
contexts:
- name: tessera-local
  context:
    cluster: tessera-local
    user: tessera-admin
current-context: tessera-local
EOF
  chmod 600 "$KUBECONFIG_FILE"
}

# --------------------------------------------------------------------------------------------
# processes

pid_file() { printf '%s/%s.pid\n' "$RUN_DIR" "$1"; }
log_file() { printf '%s/%s.log\n' "$LOG_DIR" "$1"; }

marker() {
  case $1 in
  etcd) printf '%s\n' "$ETCD_DATA" ;;
  apiserver) printf '%s\n' "$TOKEN_FILE" ;;
  esac
}

ports_of() {
  case $1 in
  etcd) printf '%s %s\n' "$ETCD_PORT" "$ETCD_PEER_PORT" ;;
  apiserver) printf '%s\n' "$API_PORT" ;;
  esac
}

running_pid() {
  local file pid
  file=$(pid_file "$1")
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(marker "$1")" || return 1
  printf '%s\n' "$pid"
}

pid_alive() {
  local file pid
  file=$(pid_file "$1")
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

check_ports_free() {
  local port
  need ss "iproute2"
  for port in $(ports_of "$1"); do
    if [[ -n "$(ss -Hltn "sport = :$port" 2>/dev/null)" ]]; then
      die "$1: port $port is already in use by a process this script did not start; pick other ports (TESSERA_KUBE_API_PORT, TESSERA_ETCD_PORT, TESSERA_ETCD_PEER_PORT)"
    fi
  done
}

launch() { # server command...
  local name=$1 lf
  shift
  lf=$(log_file "$name")
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  [[ -f $lf ]] && mv -f "$lf" "$lf.1"
  log "$name: starting (log: $lf)"
  setsid "$@" </dev/null >"$lf" 2>&1 &
  printf '%s\n' "$!" >"$(pid_file "$name")"
}

fail_start() { # server message
  local lf
  lf=$(log_file "$1")
  {
    printf '[kube] ERROR: %s: %s\n' "$1" "$2"
    if [[ -f $lf ]]; then
      printf '[kube] ---- last 40 lines of %s ----\n' "$lf"
      tail -n 40 "$lf"
    fi
  } >&2
  exit 1
}

READY_ERR=
wait_ready() { # server
  local name=$1 deadline
  deadline=$((SECONDS + READY_TIMEOUT))
  while true; do
    READY_ERR=
    if "ready_$name"; then
      log "$name: ready"
      return 0
    fi
    pid_alive "$name" || fail_start "$name" "the process exited before it became ready"
    ((SECONDS < deadline)) || fail_start "$name" "not ready after ${READY_TIMEOUT}s; last check: $READY_ERR"
    sleep 1
  done
}

stop_server() { # server
  local name=$1 pid file deadline
  file=$(pid_file "$name")
  if ! pid=$(running_pid "$name"); then
    [[ -f $file ]] && rm -f "$file"
    log "$name: not running"
    return 0
  fi
  log "$name: stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
  log "$name: stopped"
}

start_etcd() {
  mkdir -p "$ETCD_DATA"
  chmod 700 "$ETCD_DATA"
  check_ports_free etcd
  # one member, loopback only; fsync off: this is test data, rebuilt at will
  launch etcd "$ETCD_BIN" \
    --name tessera-kube \
    --data-dir "$ETCD_DATA" \
    --listen-client-urls "http://$HOST:$ETCD_PORT" \
    --advertise-client-urls "http://$HOST:$ETCD_PORT" \
    --listen-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://$HOST:$ETCD_PEER_PORT" \
    --initial-cluster "tessera-kube=http://$HOST:$ETCD_PEER_PORT" \
    --unsafe-no-fsync \
    --quota-backend-bytes 1073741824 \
    --log-level warn
}

ready_etcd() {
  local out
  if ! out=$(curl -sS -m 5 "http://$HOST:$ETCD_PORT/health" 2>&1) || [[ $out != *'"health":"true"'* ]]; then
    READY_ERR="GET http://$HOST:$ETCD_PORT/health: $out"
    return 1
  fi
}

start_apiserver() {
  check_ports_free apiserver
  write_pki
  launch apiserver "$APISERVER_BIN" \
    --etcd-servers "http://$HOST:$ETCD_PORT" \
    --bind-address "$HOST" \
    --advertise-address "$HOST" \
    --endpoint-reconciler-type none \
    --secure-port "$API_PORT" \
    --cert-dir "$PKI_DIR" \
    --tls-cert-file "$PKI_DIR/apiserver.crt" \
    --tls-private-key-file "$PKI_DIR/apiserver.key" \
    --token-auth-file "$TOKEN_FILE" \
    --authorization-mode RBAC \
    --service-account-issuer "https://$HOST:$API_PORT" \
    --service-account-key-file "$PKI_DIR/sa.pub" \
    --service-account-signing-key-file "$PKI_DIR/sa.key" \
    --service-cluster-ip-range 10.96.0.0/24 \
    --allow-privileged=true \
    --disable-admission-plugins ServiceAccount \
    --enable-priority-and-fairness=false \
    --profiling=false \
    --v 1
}

ready_apiserver() {
  local out
  if ! out=$(curl -sS -m 5 --cacert "$PKI_DIR/ca.crt" -H "Authorization: Bearer $(admin_token)" \
    "https://$HOST:$API_PORT/readyz" 2>&1) || [[ $out != ok ]]; then
    READY_ERR="GET https://$HOST:$API_PORT/readyz: $out"
    return 1
  fi
}

# --------------------------------------------------------------------------------------------
# commands

cmd_up() {
  need curl
  need setsid
  { etcd_installed && apiserver_installed; } || cmd_install_servers
  mkdir -p "$KUBE_DIR" "$LOG_DIR" "$RUN_DIR"
  local name pid
  for name in "${SERVERS[@]}"; do
    if pid=$(running_pid "$name"); then
      log "$name: already running (pid $pid), leaving it"
    else
      rm -f "$(pid_file "$name")"
      "start_$name"
    fi
    wait_ready "$name"
  done
  log "kube-apiserver ready on https://$HOST:$API_PORT; KUBECONFIG=$KUBECONFIG_FILE"
}

cmd_down() {
  local i
  for ((i = ${#SERVERS[@]} - 1; i >= 0; i--)); do
    stop_server "${SERVERS[i]}"
  done
}

cmd_status() {
  local name pid all=0 state
  for name in "${SERVERS[@]}"; do
    if pid=$(running_pid "$name"); then
      READY_ERR=
      if "ready_$name"; then state="running, ready"; else
        state="running, NOT ready"
        all=1
      fi
      printf '%-10s %-20s pid %-8s ports %s\n' "$name" "$state" "$pid" "$(ports_of "$name")"
      [[ -z $READY_ERR ]] || printf '           %s\n' "$READY_ERR"
    else
      printf '%-10s %-20s\n' "$name" "stopped"
      all=1
    fi
  done
  return "$all"
}

cmd_env() {
  printf 'export %s=%q\n' KUBECONFIG "$KUBECONFIG_FILE" TESSERA_HELM_BIN "$HELM_BIN"
}

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

main() {
  local cmd=${1:-}
  case $cmd in
  install) cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) cmd_env ;;
  helm)
    shift
    helm_installed || locked helm install_helm
    exec "$HELM_BIN" "$@"
    ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
  esac
}

main "$@"; exit $?
