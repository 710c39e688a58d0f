#!/usr/bin/env bash
# Tessera local stack: the real Kafka, S3 and MongoDB-protocol servers, on 127.0.0.1 only.
#
#   deploy/local/stack.sh install   obtain/build everything into the cache (idempotent)
#   deploy/local/stack.sh up        install if needed, start what is not running, wait until ready
#   deploy/local/stack.sh down      stop what `up` started (pid files; SIGTERM, then SIGKILL)
#   deploy/local/stack.sh stop S    stop one server S (kafka, s3, postgres or ferretdb); start S
#                                   starts it
#   deploy/local/stack.sh status    show each server; exit 0 only if all are running and ready
#   deploy/local/stack.sh env       print `export` lines with endpoints and credentials
#                                   (use: eval "$(deploy/local/stack.sh env)")
#
# Servers: Apache Kafka (KRaft broker+controller, jars from Maven Central), versitygw (S3 over a
# POSIX folder, built with Go), FerretDB v1 (MongoDB wire protocol, built with Go) over
# PostgreSQL (Debian's package, installed with apt-get when missing; run as the `postgres` user
# when this script runs as root). FerretDB's SQLite backend is the alternative
# (TESSERA_FERRETDB_BACKEND=sqlite): no PostgreSQL needed, but it never uses its `_id` index,
# so every read or update by id scans the collection (measured: 18 ms per find by id at 3,000
# documents, against 2.5 ms over PostgreSQL). Versions are pinned in deploy/local/versions.env.
#
# Folders (TESSERA_HOME defaults to <repo>/.tessera, which is git-ignored):
#   ${TESSERA_CACHE_DIR:-$TESSERA_HOME/cache}   downloads, jars, binaries, stamp files, Maven repo
#   ${TESSERA_STACK_DIR:-$TESSERA_HOME/stack}   server data, config, logs/, run/*.pid
# Go builds reuse the machine's module and build caches (go env GOMODCACHE / GOCACHE).
#
# Overrides (defaults in brackets), e.g. for a second stack next to the first one: give it its own
# TESSERA_STACK_DIR (or TESSERA_HOME) and other ports.
#   TESSERA_KAFKA_PORT [9092]  TESSERA_KAFKA_CONTROLLER_PORT [9093]  TESSERA_S3_PORT [7070]
#   TESSERA_MONGO_PORT [27017] TESSERA_FERRETDB_DEBUG_PORT [8088] TESSERA_POSTGRES_PORT [15432]
#   TESSERA_FERRETDB_BACKEND [postgresql | sqlite]
#   TESSERA_S3_ACCESS_KEY [tessera] TESSERA_S3_SECRET_KEY [tessera-local-secret]
#   TESSERA_S3_SIDECAR [auto: only if the data folder's filesystem lacks user xattrs]
#   TESSERA_READY_TIMEOUT [180 s per server]  TESSERA_STOP_TIMEOUT [30 s per server]
#   TESSERA_KAFKA_HEAP_OPTS [-Xms256m -Xmx512m]
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)

# shellcheck source=versions.env
. "$SCRIPT_DIR/versions.env"

TESSERA_HOME=${TESSERA_HOME:-$REPO_ROOT/.tessera}
CACHE_DIR=${TESSERA_CACHE_DIR:-$TESSERA_HOME/cache}
STACK_DIR=${TESSERA_STACK_DIR:-$TESSERA_HOME/stack}
LOG_DIR=$STACK_DIR/logs
RUN_DIR=$STACK_DIR/run

HOST=127.0.0.1 # deliberately not configurable: nothing binds anything else
KAFKA_PORT=${TESSERA_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${TESSERA_KAFKA_CONTROLLER_PORT:-9093}
S3_PORT=${TESSERA_S3_PORT:-7070}
S3_ACCESS_KEY=${TESSERA_S3_ACCESS_KEY:-tessera}
S3_SECRET_KEY=${TESSERA_S3_SECRET_KEY:-tessera-local-secret}
S3_REGION=us-east-1
S3_SIDECAR=${TESSERA_S3_SIDECAR:-auto}
MONGO_PORT=${TESSERA_MONGO_PORT:-27017}
FERRETDB_DEBUG_PORT=${TESSERA_FERRETDB_DEBUG_PORT:-8088}
FERRETDB_BACKEND=${TESSERA_FERRETDB_BACKEND:-postgresql}
POSTGRES_PORT=${TESSERA_POSTGRES_PORT:-15432}
POSTGRES_USER=tessera # the database role FerretDB connects as (trust auth, loopback only)
READY_TIMEOUT=${TESSERA_READY_TIMEOUT:-180}
STOP_TIMEOUT=${TESSERA_STOP_TIMEOUT:-30}
KAFKA_HEAP_OPTS=${TESSERA_KAFKA_HEAP_OPTS:--Xms256m -Xmx512m}

# cache layout
KAFKA_CACHE=$CACHE_DIR/kafka
KAFKA_LIB=$KAFKA_CACHE/lib
MAVEN_REPO=$CACHE_DIR/maven/repository
VERSITYGW_CACHE=$CACHE_DIR/versitygw
VERSITYGW_BIN=$VERSITYGW_CACHE/bin/versitygw
FERRETDB_CACHE=$CACHE_DIR/ferretdb
FERRETDB_BIN=$FERRETDB_CACHE/bin/ferretdb
BUILD_TIMES_LOG=$CACHE_DIR/build-times.log

# stack layout
KAFKA_DIR=$STACK_DIR/kafka
KAFKA_PROPS=$KAFKA_DIR/server.properties
KAFKA_DATA=$KAFKA_DIR/data
S3_DIR=$STACK_DIR/s3
S3_DATA=$S3_DIR/data
S3_SIDECAR_DIR=$S3_DIR/sidecar
FERRETDB_DIR=$STACK_DIR/ferretdb
FERRETDB_DATA=$FERRETDB_DIR/data
FERRETDB_STATE=$FERRETDB_DIR/state
POSTGRES_DIR=$STACK_DIR/postgres
POSTGRES_DATA=$POSTGRES_DIR/data
POSTGRES_SOCKETS=$POSTGRES_DIR/run

if [[ $FERRETDB_BACKEND == postgresql ]]; then
  SERVERS=(kafka s3 postgres ferretdb) # start order; `down` stops in reverse
else
  SERVERS=(kafka s3 ferretdb)
fi

# --------------------------------------------------------------------------------------------
# helpers

log() { printf '[stack] %s\n' "$*" >&2; }

die() {
  printf '[stack] ERROR: %s\n' "$*" >&2
  exit 1
}

need() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' is required but not on PATH${2:+ ($2)}"
}

check_port_number() {
  local name=$1 value=$2
  if ! [[ $value =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
    die "$name=$value is not a port number"
  fi
}

validate_config() {
  check_port_number TESSERA_KAFKA_PORT "$KAFKA_PORT"
  check_port_number TESSERA_KAFKA_CONTROLLER_PORT "$KAFKA_CONTROLLER_PORT"
  check_port_number TESSERA_S3_PORT "$S3_PORT"
  check_port_number TESSERA_MONGO_PORT "$MONGO_PORT"
  check_port_number TESSERA_FERRETDB_DEBUG_PORT "$FERRETDB_DEBUG_PORT"
  check_port_number TESSERA_POSTGRES_PORT "$POSTGRES_PORT"
  [[ $FERRETDB_BACKEND == postgresql || $FERRETDB_BACKEND == sqlite ]] ||
    die "TESSERA_FERRETDB_BACKEND must be postgresql or sqlite, not '$FERRETDB_BACKEND'"
  local ports
  ports=$(printf '%s\n' "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "$S3_PORT" "$MONGO_PORT" "$FERRETDB_DEBUG_PORT" "$POSTGRES_PORT" | sort | uniq -d)
  [[ -z $ports ]] || die "the same port is configured twice: $ports"
}

# sha256 of stdin, used in stamp files
digest() { sha256sum | cut -d' ' -f1; }

stamp_matches() { # stamp_file expected_content
  [[ -f $1 ]] && [[ "$(cat "$1")" == "$2" ]]
}

record_build_time() { # component seconds
  mkdir -p "$CACHE_DIR"
  printf '%s\t%s\t%ss\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" >>"$BUILD_TIMES_LOG"
  log "$1: built in ${2}s"
}

# Go: the machine's own module and build caches are reused; the toolchain installed is the one used.
go_env() {
  need go "Go is needed to build versitygw and FerretDB"
  export GOTOOLCHAIN=local
  GOPATH=${GOPATH:-$(go env GOPATH)}
  GOMODCACHE=${GOMODCACHE:-$(go env GOMODCACHE)}
  GOCACHE=${GOCACHE:-$(go env GOCACHE)}
  export GOPATH GOMODCACHE GOCACHE
  export CGO_ENABLED=0
}

java_bin() {
  if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
    printf '%s\n' "$JAVA_HOME/bin/java"
  else
    need java "Java 17 or later is needed for Kafka"
    command -v java
  fi
}

check_java_version() {
  local java major
  java=$(java_bin)
  major=$("$java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java\.specification\.version = //p')
  [[ ${major%%.*} =~ ^[0-9]+$ ]] || die "cannot tell the Java version of $java"
  ((${major%%.*} >= 17)) || die "Kafka $KAFKA_VERSION needs Java 17 or later; $java is $major"
}

# --------------------------------------------------------------------------------------------
# install

kafka_stamp() {
  printf 'kafka_%s %s slf4j %s log4j %s maven-dependency-plugin %s pom %s\n' \
    "$KAFKA_SCALA_VERSION" "$KAFKA_VERSION" "$SLF4J_VERSION" "$LOG4J_VERSION" \
    "$MAVEN_DEPENDENCY_PLUGIN_VERSION" "$(digest <"$SCRIPT_DIR/kafka/pom.xml")"
}

kafka_installed() {
  stamp_matches "$KAFKA_CACHE/stamp" "$(kafka_stamp)" && compgen -G "$KAFKA_LIB/kafka_${KAFKA_SCALA_VERSION}-${KAFKA_VERSION}.jar" >/dev/null
}

install_kafka() {
  if kafka_installed; then
    log "kafka $KAFKA_VERSION: cached ($KAFKA_LIB)"
    return 0
  fi
  need mvn "Maven is needed to fetch the Kafka jars"
  check_java_version
  log "kafka $KAFKA_VERSION: fetching jars from Maven Central (mvn, local repo $MAVEN_REPO)"
  local start tmp_lib
  start=$SECONDS
  mkdir -p "$KAFKA_CACHE" "$MAVEN_REPO"
  tmp_lib=$KAFKA_CACHE/lib.tmp.$$
  rm -rf "$tmp_lib"
  # Maven Central is reached directly on these machines (no proxy or mirror needed), so no
  # settings.xml is used; -C fails on a checksum mismatch instead of warning.
  # (Maven 3.8 prints ANSI reset codes even in batch mode; sed drops them.)
  if ! mvn -B -q -ntp -C \
    -f "$SCRIPT_DIR/kafka/pom.xml" \
    -Dmaven.repo.local="$MAVEN_REPO" \
    -Dtessera.build.directory="$KAFKA_CACHE/build" \
    -Dkafka.version="$KAFKA_VERSION" \
    -Dkafka.scala.version="$KAFKA_SCALA_VERSION" \
    -Dslf4j.version="$SLF4J_VERSION" \
    -Dlog4j.version="$LOG4J_VERSION" \
    -Dmaven.dependency.plugin.version="$MAVEN_DEPENDENCY_PLUGIN_VERSION" \
    -DincludeScope=runtime \
    -DoutputDirectory="$tmp_lib" \
    dependency:copy-dependencies 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2; then
    rm -rf "$tmp_lib"
    die "kafka: mvn dependency:copy-dependencies failed (see the Maven output above)"
  fi
  [[ -f $tmp_lib/kafka_${KAFKA_SCALA_VERSION}-${KAFKA_VERSION}.jar ]] ||
    die "kafka: Maven finished but kafka_${KAFKA_SCALA_VERSION}-${KAFKA_VERSION}.jar is missing in $tmp_lib"
  # two slf4j-api versions on one classpath would be a mess; make sure only the pinned one is there
  if compgen -G "$tmp_lib/slf4j-api-*.jar" | grep -v "slf4j-api-${SLF4J_VERSION}.jar" >/dev/null; then
    die "kafka: more than one slf4j-api jar in $tmp_lib"
  fi
  rm -rf "$KAFKA_LIB"
  mv "$tmp_lib" "$KAFKA_LIB"
  kafka_stamp >"$KAFKA_CACHE/stamp"
  record_build_time "kafka-$KAFKA_VERSION-jars" $((SECONDS - start))
  log "kafka $KAFKA_VERSION: $(find "$KAFKA_LIB" -name '*.jar' | wc -l) jars, $(du -sh "$KAFKA_LIB" | cut -f1)"
}

versitygw_stamp() {
  printf '%s@%s CGO_ENABLED=0 -trimpath\n' "$VERSITYGW_MODULE" "$VERSITYGW_VERSION"
}

install_versitygw() {
  if stamp_matches "$VERSITYGW_CACHE/stamp" "$(versitygw_stamp)" && [[ -x $VERSITYGW_BIN ]]; then
    log "versitygw $VERSITYGW_VERSION: cached ($VERSITYGW_BIN)"
    return 0
  fi
  go_env
  log "versitygw $VERSITYGW_VERSION: building (go install, $(go env GOVERSION))"
  local start tmp_bin
  start=$SECONDS
  tmp_bin=$VERSITYGW_CACHE/bin.tmp.$$
  rm -rf "$tmp_bin"
  mkdir -p "$tmp_bin"
  GOBIN=$tmp_bin go install -trimpath "$VERSITYGW_MODULE/cmd/versitygw@$VERSITYGW_VERSION" ||
    die "versitygw: go install $VERSITYGW_MODULE/cmd/versitygw@$VERSITYGW_VERSION failed"
  "$tmp_bin/versitygw" --version >/dev/null 2>&1 || "$tmp_bin/versitygw" --help >/dev/null 2>&1 ||
    die "versitygw: the built binary does not run"
  mkdir -p "$(dirname "$VERSITYGW_BIN")"
  mv -f "$tmp_bin/versitygw" "$VERSITYGW_BIN"
  rm -rf "$tmp_bin"
  versitygw_stamp >"$VERSITYGW_CACHE/stamp"
  record_build_time "versitygw-$VERSITYGW_VERSION" $((SECONDS - start))
}

ferretdb_stamp() {
  printf '%s@%s module-copy+version.txt CGO_ENABLED=0 -trimpath\n' "$FERRETDB_MODULE" "$FERRETDB_VERSION"
}

install_ferretdb() {
  if stamp_matches "$FERRETDB_CACHE/stamp" "$(ferretdb_stamp)" && [[ -x $FERRETDB_BIN ]]; then
    log "ferretdb $FERRETDB_VERSION: cached ($FERRETDB_BIN)"
    return 0
  fi
  go_env
  log "ferretdb $FERRETDB_VERSION: building from its module source ($(go env GOVERSION))"
  local start json moddir src tmp_bin
  start=$SECONDS
  # FerretDB v1 panics at start unless build/version/version.txt (generated, absent from the
  # module zip) holds its version. Neither `go install ...@VERSION` nor a wrapper module works
  # with Go >= 1.24: both record FerretDB as the main module in the build info, so the check
  # runs. An -overlay cannot add the file either (Go refuses overlays beneath GOMODCACHE).
  # So: download the module through the proxy (checksum-verified as usual), copy it, add
  # version.txt and build the copy as the main module with its own go.mod/go.sum.
  mkdir -p "$FERRETDB_CACHE"
  json=$(cd "$FERRETDB_CACHE" && go mod download -json "$FERRETDB_MODULE@$FERRETDB_VERSION") ||
    die "ferretdb: go mod download $FERRETDB_MODULE@$FERRETDB_VERSION failed"
  moddir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$json")
  [[ -n $moddir && -f $moddir/go.mod ]] || die "ferretdb: no module folder in the output of go mod download:
$json"
  src=$FERRETDB_CACHE/src
  rm -rf "$src"
  cp -R "$moddir" "$src"
  chmod -R u+w "$src"
  printf '%s\n' "$FERRETDB_VERSION" >"$src/build/version/version.txt"
  tmp_bin=$FERRETDB_CACHE/ferretdb.tmp.$$
  (cd "$src" && go build -trimpath -o "$tmp_bin" ./cmd/ferretdb) ||
    die "ferretdb: go build ./cmd/ferretdb in $src failed"
  if ! "$tmp_bin" --version >/dev/null 2>&1; then
    "$tmp_bin" --version 2>&1 | tail -n 20 >&2 || true
    rm -f "$tmp_bin"
    die "ferretdb: the built binary does not run (\`ferretdb --version\` failed, output above)"
  fi
  mkdir -p "$(dirname "$FERRETDB_BIN")"
  mv -f "$tmp_bin" "$FERRETDB_BIN"
  rm -rf "$src" # reproducible from the module cache; only the binary is kept
  ferretdb_stamp >"$FERRETDB_CACHE/stamp"
  record_build_time "ferretdb-$FERRETDB_VERSION" $((SECONDS - start))
}

# PostgreSQL for FerretDB: Debian's server package (the newest major version installed)
postgres_bindir() {
  local d best=
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/postgres && -x $d/initdb && -x $d/pg_isready ]] && best=$d
  done
  [[ -n $best ]] && printf '%s\n' "$best"
}

postgres_installed() { [[ $FERRETDB_BACKEND != postgresql ]] || postgres_bindir >/dev/null; }

install_postgres() {
  [[ $FERRETDB_BACKEND == postgresql ]] || return 0
  if postgres_bindir >/dev/null; then
    log "postgresql: installed ($(postgres_bindir))"
    return 0
  fi
  ((EUID == 0)) || die "PostgreSQL is not installed and installing it needs root:
  apt-get install postgresql   (or run with TESSERA_FERRETDB_BACKEND=sqlite)"
  need apt-get "Debian's package manager installs PostgreSQL"
  log "postgresql: installing Debian's package (apt-get)"
  local start=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq postgresql >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } ||
    die "postgresql: apt-get install postgresql failed"
  postgres_bindir >/dev/null || die "postgresql: installed, but no server binaries in /usr/lib/postgresql"
  record_build_time "postgresql-apt" $((SECONDS - start))
}

all_installed() {
  kafka_installed &&
    stamp_matches "$VERSITYGW_CACHE/stamp" "$(versitygw_stamp)" && [[ -x $VERSITYGW_BIN ]] &&
    stamp_matches "$FERRETDB_CACHE/stamp" "$(ferretdb_stamp)" && [[ -x $FERRETDB_BIN ]] &&
    postgres_installed
}

cmd_install() {
  mkdir -p "$CACHE_DIR"
  # one install at a time (two `up`s started together must not build into the same folder)
  exec 8>"$CACHE_DIR/.install.lock"
  flock 8
  install_kafka
  install_versitygw
  install_ferretdb
  install_postgres
  exec 8>&-
}

# --------------------------------------------------------------------------------------------
# processes

pid_file() { printf '%s/%s.pid\n' "$RUN_DIR" "$1"; }
log_file() { printf '%s/%s.log\n' "$LOG_DIR" "$1"; }

# A string that only this stack's instance of the server has on its command line, so a recycled
# pid or another stack's server is never taken for ours.
marker() {
  case $1 in
  kafka) printf '%s\n' "$KAFKA_PROPS" ;;
  s3) printf '%s\n' "$S3_DATA" ;;
  ferretdb) printf '%s\n' "$FERRETDB_STATE" ;;
  postgres) printf '%s\n' "$POSTGRES_DATA" ;;
  esac
}

ports_of() {
  case $1 in
  kafka) printf '%s %s\n' "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" ;;
  s3) printf '%s\n' "$S3_PORT" ;;
  ferretdb) printf '%s %s\n' "$MONGO_PORT" "$FERRETDB_DEBUG_PORT" ;;
  postgres) printf '%s\n' "$POSTGRES_PORT" ;;
  esac
}

# PostgreSQL's SIGTERM is a "smart" shutdown that waits for every client to leave; SIGINT is the
# "fast" one (clients disconnected, a clean checkpoint). The others stop cleanly on SIGTERM.
stop_signal() {
  case $1 in
  postgres) printf 'INT\n' ;;
  *) printf 'TERM\n' ;;
  esac
}

# prints the pid if the server's pid file names a live process that is ours
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

pid_alive() { # server: the recorded process exists (whatever it is exec'ing)
  local file pid
  file=$(pid_file "$1")
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

port_in_use() { # port
  [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
}

check_ports_free() { # server
  local port
  need ss "iproute2"
  for port in $(ports_of "$1"); do
    if port_in_use "$port"; then
      die "$1: port $port is already in use by a process this stack did not start:
$(ss -Hltnp "sport = :$port" 2>/dev/null)
Stop it, or pick other ports (TESSERA_*_PORT) and another TESSERA_STACK_DIR."
    fi
  done
}

# start a server in its own session, output to its log (the previous log is kept as .log.1)
launch() { # server command...
  local name=$1 lf pid
  shift
  lf=$(log_file "$name")
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  [[ -f $lf ]] && mv -f "$lf" "$lf.1"
  log "$name: starting (log: $lf)"
  setsid "$@" </dev/null >"$lf" 2>&1 &
  pid=$!
  printf '%s\n' "$pid" >"$(pid_file "$name")"
}

fail_start() { # server message
  local lf
  lf=$(log_file "$1")
  {
    printf '[stack] ERROR: %s: %s\n' "$1" "$2"
    if [[ -f $lf ]]; then
      printf '[stack] ---- last 40 lines of %s ----\n' "$lf"
      tail -n 40 "$lf"
      printf '[stack] ---- end of %s ----\n' "$lf"
    fi
  } >&2
  exit 1
}

# wait until `ready_<server>` succeeds; fail loudly if the process dies or time runs out
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
    # Liveness only: right after the fork the child may not have exec'd the server yet, so
    # its command line (which running_pid matches) can still be this script's.
    pid_alive "$name" || fail_start "$name" "the process exited before it became ready"
    ((SECONDS < deadline)) || fail_start "$name" "not ready after ${READY_TIMEOUT}s (TESSERA_READY_TIMEOUT); last check: $READY_ERR
The process is left running for inspection; \`$0 down\` stops it."
    sleep 1
  done
}

stop_server() { # server
  local name=$1 pid file deadline
  file=$(pid_file "$name")
  if ! pid=$(running_pid "$name"); then
    if [[ -f $file ]]; then
      log "$name: not running (removing stale pid file)"
      rm -f "$file"
    else
      log "$name: not running"
    fi
    return 0
  fi
  local sig
  sig=$(stop_signal "$name")
  log "$name: stopping pid $pid (SIG$sig)"
  kill "-$sig" "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name: still running after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while running_pid "$name" >/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    running_pid "$name" >/dev/null && die "$name: pid $pid survived SIGKILL"
  fi
  rm -f "$file"
  log "$name: stopped"
}

# --------------------------------------------------------------------------------------------
# kafka

kafka_java() { # main-class args... ; runs a Kafka tool quietly in the foreground
  "$(java_bin)" -Xms64m -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/tools-log4j2.xml" \
    -cp "$KAFKA_LIB/*" "$@"
}

write_kafka_config() {
  mkdir -p "$KAFKA_DIR" "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Written by deploy/local/stack.sh on every start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$HOST:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.cleaner.dedupe.buffer.size=8388608
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=104857600
EOF
}

format_kafka_storage() {
  local formatted_for=$KAFKA_DIR/formatted-for cluster_id
  if [[ -f $KAFKA_DATA/meta.properties ]]; then
    # --standalone records the controller's address in the bootstrap metadata: a data folder
    # formatted for one controller port cannot be started on another one.
    if [[ -f $formatted_for ]] && [[ "$(<"$formatted_for")" != "controller=$HOST:$KAFKA_CONTROLLER_PORT" ]]; then
      die "kafka: $KAFKA_DATA was formatted for $(<"$formatted_for"), not controller=$HOST:$KAFKA_CONTROLLER_PORT.
Use another TESSERA_STACK_DIR for other ports, or delete $KAFKA_DIR to start from empty."
    fi
    return 0
  fi
  log "kafka: formatting storage in $KAFKA_DATA (first start)"
  cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid) || die "kafka: StorageTool random-uuid failed"
  kafka_java kafka.tools.StorageTool format --standalone --ignore-formatted \
    -t "$cluster_id" -c "$KAFKA_PROPS" >"$KAFKA_DIR/format.log" 2>&1 || {
    cat "$KAFKA_DIR/format.log" >&2
    die "kafka: StorageTool format failed (output above)"
  }
  printf '%s\n' "$cluster_id" >"$KAFKA_DIR/cluster.id"
  printf 'controller=%s:%s\n' "$HOST" "$KAFKA_CONTROLLER_PORT" >"$formatted_for"
}

start_kafka() {
  check_java_version
  check_ports_free kafka
  write_kafka_config
  format_kafka_storage
  # shellcheck disable=SC2086 # KAFKA_HEAP_OPTS is a list of JVM options
  launch kafka "$(java_bin)" $KAFKA_HEAP_OPTS -XX:+UseSerialGC -XX:MaxMetaspaceSize=256m \
    -Djava.awt.headless=true -Djava.net.preferIPv4Stack=true \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/log4j2.xml" \
    -cp "$KAFKA_LIB/*" kafka.Kafka "$KAFKA_PROPS"
}

# ready = the broker says it started AND an admin client lists topics through PLAINTEXT
ready_kafka() {
  local out
  if ! grep -q 'Kafka Server started' "$(log_file kafka)" 2>/dev/null; then
    READY_ERR="no 'Kafka Server started' line in $(log_file kafka) yet"
    return 1
  fi
  if ! out=$(timeout 60 "$(java_bin)" -Xms32m -Xmx128m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/kafka/tools-log4j2.xml" \
    -cp "$KAFKA_LIB/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" --list 2>&1); then
    READY_ERR="TopicCommand --list against $HOST:$KAFKA_PORT failed: $(tail -n 5 <<<"$out")"
    return 1
  fi
}

# --------------------------------------------------------------------------------------------
# S3: versitygw posix backend

# versitygw keeps object metadata in user xattrs; without them it needs --sidecar
user_xattrs_supported() { # dir
  local probe=$1/.tessera-xattr-probe ok=1
  : >"$probe"
  if command -v setfattr >/dev/null 2>&1; then
    setfattr -n user.tessera -v 1 "$probe" 2>/dev/null || ok=0
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import os,sys; os.setxattr(sys.argv[1], "user.tessera", b"1")' "$probe" 2>/dev/null || ok=0
  else
    log "s3: cannot probe user xattrs (no setfattr or python3); assuming they work"
  fi
  rm -f "$probe"
  ((ok == 1))
}

start_s3() {
  local sidecar=()
  mkdir -p "$S3_DATA"
  case $S3_SIDECAR in
  1 | true | yes) sidecar=(--sidecar "$S3_SIDECAR_DIR") ;;
  0 | false | no) ;;
  auto)
    if ! user_xattrs_supported "$S3_DATA"; then
      log "s3: the filesystem of $S3_DATA has no user xattrs; using --sidecar $S3_SIDECAR_DIR"
      sidecar=(--sidecar "$S3_SIDECAR_DIR")
    fi
    ;;
  *) die "TESSERA_S3_SIDECAR must be auto, 1 or 0 (is '$S3_SIDECAR')" ;;
  esac
  ((${#sidecar[@]} == 0)) || mkdir -p "$S3_SIDECAR_DIR"
  check_ports_free s3
  # global options go before the backend word (posix), backend options after it
  launch s3 "$VERSITYGW_BIN" \
    --port "$HOST:$S3_PORT" \
    --access "$S3_ACCESS_KEY" --secret "$S3_SECRET_KEY" \
    --region "$S3_REGION" \
    --health /health \
    --quiet \
    posix "${sidecar[@]}" "$S3_DATA"
}

# ready = the health endpoint answers AND a SigV4-signed S3 request (ListBuckets) succeeds
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
ready_s3() {
  local out
  if ! out=$(curl -sS -m 5 -o /dev/null -w '%{http_code}' "http://$HOST:$S3_PORT/health" 2>&1) || [[ $out != 200 ]]; then
    READY_ERR="GET http://$HOST:$S3_PORT/health: $out"
    return 1
  fi
  # versitygw insists on x-amz-content-sha256, which curl 7.x does not add by itself
  if ! out=$(curl -sS -m 10 --aws-sigv4 "aws:amz:$S3_REGION:s3" \
    --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" -H "x-amz-content-sha256: $EMPTY_SHA256" \
    "http://$HOST:$S3_PORT/" 2>&1) || [[ $out != *ListAllMyBucketsResult* ]]; then
    READY_ERR="signed ListBuckets on http://$HOST:$S3_PORT/ failed: $out"
    return 1
  fi
}

# --------------------------------------------------------------------------------------------
# PostgreSQL (FerretDB's backend), on 127.0.0.1 and a socket folder of this stack only

# PostgreSQL refuses to run as root: as root, its programs run as the `postgres` user that
# Debian's package creates (setpriv execs, so the pid file names the postmaster itself).
as_postgres() { # prints nothing; sets AS_POSTGRES to the command prefix
  AS_POSTGRES=()
  if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "postgres: no 'postgres' user to run PostgreSQL as"
    need setpriv "util-linux"
    AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups --)
  fi
}

start_postgres() {
  local bin
  bin=$(postgres_bindir) || die "postgres: not installed (run \`$0 install\`)"
  as_postgres
  mkdir -p "$POSTGRES_DIR" "$POSTGRES_SOCKETS"
  ((EUID != 0)) || chown postgres: "$POSTGRES_DIR" "$POSTGRES_SOCKETS"
  chmod 700 "$POSTGRES_DIR"
  if [[ ! -f $POSTGRES_DATA/PG_VERSION ]]; then
    rm -rf "$POSTGRES_DATA"
    log "postgres: creating the cluster in $POSTGRES_DATA"
    "${AS_POSTGRES[@]}" "$bin/initdb" -D "$POSTGRES_DATA" -U "$POSTGRES_USER" --auth=trust -E UTF8 \
      --locale=C --no-sync >"$LOG_DIR/postgres-initdb.log" 2>&1 ||
      { tail -n 20 "$LOG_DIR/postgres-initdb.log" >&2; die "postgres: initdb failed"; }
  fi
  check_ports_free postgres
  # A disposable test cluster: no fsync (a killed server keeps its data in the page cache; only
  # a machine crash could lose writes).
  launch postgres "${AS_POSTGRES[@]}" "$bin/postgres" -D "$POSTGRES_DATA" -p "$POSTGRES_PORT" \
    -c listen_addresses="$HOST" -c unix_socket_directories="$POSTGRES_SOCKETS" \
    -c fsync=off -c max_connections=200
}

ready_postgres() {
  local bin out
  bin=$(postgres_bindir) || return 1
  if ! out=$("$bin/pg_isready" -h "$HOST" -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d postgres 2>&1); then
    READY_ERR="pg_isready on $HOST:$POSTGRES_PORT: $out"
    return 1
  fi
}

# --------------------------------------------------------------------------------------------
# FerretDB v1 (PostgreSQL backend; SQLite with TESSERA_FERRETDB_BACKEND=sqlite)

start_ferretdb() {
  mkdir -p "$FERRETDB_DATA" "$FERRETDB_STATE"
  check_ports_free ferretdb
  local backend=(--handler=sqlite --sqlite-url="file:$FERRETDB_DATA/")
  if [[ $FERRETDB_BACKEND == postgresql ]]; then
    backend=(--handler=postgresql
      --postgresql-url="postgres://$POSTGRES_USER@$HOST:$POSTGRES_PORT/postgres")
  fi
  launch ferretdb "$FERRETDB_BIN" \
    "${backend[@]}" \
    --listen-addr="$HOST:$MONGO_PORT" \
    --debug-addr="$HOST:$FERRETDB_DEBUG_PORT" \
    --state-dir="$FERRETDB_STATE" \
    --telemetry=disable
}

# One MongoDB OP_MSG {ping: 1, $db: "admin"} over bash's /dev/tcp; prints the reply as hex.
# FerretDB's ping asks its backend for its status, so this proves SQLite is usable too.
mongo_ping_hex() { # host port
  # shellcheck disable=SC2016 # the inner script expands its own arguments
  timeout 5 "$BASH" -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "\x33\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\xdd\x07\x00\x00\x00\x00\x00\x00\x00" >&3
    printf "\x1e\x00\x00\x00\x10ping\x00\x01\x00\x00\x00\x02\x24db\x00\x06\x00\x00\x00admin\x00\x00" >&3
    len=$(dd bs=1 count=4 <&3 2>/dev/null | od -An -tu4 | tr -d " ")
    [[ $len =~ ^[0-9]+$ ]] && ((len > 16 && len < 65536)) || exit 1
    dd bs=1 count=$((len - 4)) <&3 2>/dev/null | od -An -tx1 | tr -d " \n"
  ' _ "$1" "$2"
}

# ready = /debug/readyz answers 200 AND a wire-protocol ping returns ok: 1.0
# (FerretDB v1's readyz only pings when --setup-database is given, so on its own it proves little)
ready_ferretdb() {
  local out
  if ! out=$(curl -sS -m 5 -o /dev/null -w '%{http_code}' "http://$HOST:$FERRETDB_DEBUG_PORT/debug/readyz" 2>&1) || [[ $out != 200 ]]; then
    READY_ERR="GET http://$HOST:$FERRETDB_DEBUG_PORT/debug/readyz: $out"
    return 1
  fi
  # "ok" as a BSON double 1.0: 01 'o' 'k' 00 + 00 00 00 00 00 00 f0 3f
  if ! out=$(mongo_ping_hex "$HOST" "$MONGO_PORT" 2>&1) || [[ $out != *016f6b00000000000000f03f* ]]; then
    READY_ERR="MongoDB ping on $HOST:$MONGO_PORT failed (reply: ${out:-none})"
    return 1
  fi
}

# --------------------------------------------------------------------------------------------
# commands

cmd_up() {
  need curl
  need setsid
  validate_config
  all_installed || cmd_install
  mkdir -p "$STACK_DIR" "$LOG_DIR" "$RUN_DIR"
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
  log "all servers are up; endpoints: eval \"\$($0 env)\""
}

known_server() { # name
  local s
  for s in "${SERVERS[@]}"; do [[ $s == "$1" ]] && return 0; done
  die "unknown server '$1' (one of: ${SERVERS[*]})"
}

cmd_start_one() { # server: start one installed server (fault tests restart them one by one)
  known_server "$1"
  need setsid
  validate_config
  all_installed || die "not installed: run \`$0 up\` first"
  mkdir -p "$STACK_DIR" "$LOG_DIR" "$RUN_DIR"
  if running_pid "$1" >/dev/null; then
    log "$1: already running"
  else
    rm -f "$(pid_file "$1")"
    "start_$1"
  fi
  wait_ready "$1"
}

cmd_stop_one() { # server
  known_server "$1"
  stop_server "$1"
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
      printf '%-9s %-20s pid %-8s ports %s\n' "$name" "$state" "$pid" "$(ports_of "$name")"
      [[ -z $READY_ERR ]] || printf '          %s\n' "$READY_ERR"
    else
      printf '%-9s %-20s\n' "$name" "stopped"
      all=1
    fi
  done
  return "$all"
}

cmd_env() {
  printf 'export %s=%q\n' \
    TESSERA_KAFKA_BOOTSTRAP "$HOST:$KAFKA_PORT" \
    TESSERA_S3_ENDPOINT "$HOST:$S3_PORT" \
    TESSERA_S3_ACCESS_KEY "$S3_ACCESS_KEY" \
    TESSERA_S3_SECRET_KEY "$S3_SECRET_KEY" \
    TESSERA_S3_REGION "$S3_REGION" \
    TESSERA_S3_SECURE false \
    TESSERA_MONGO_URI "mongodb://$HOST:$MONGO_PORT/"
}

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
  local cmd=${1:-}
  case $cmd in
  install) validate_config && cmd_install ;;
  up) cmd_up ;;
  down) cmd_down ;;
  start) cmd_start_one "${2:?usage: $0 start kafka|s3|postgres|ferretdb}" ;;
  stop) cmd_stop_one "${2:?usage: $0 stop kafka|s3|postgres|ferretdb}" ;;
  status) cmd_status ;;
  env) cmd_env ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
  esac
}

main "$@"
