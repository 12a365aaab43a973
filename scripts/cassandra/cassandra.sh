#!/usr/bin/env bash
# Runs Apache Cassandra 5.0 for mammofl's tests and demo: jars from Maven Central, one JVM per
# node, every file under the cache. Nothing is installed system-wide and nothing needs root.
#
#   cassandra.sh fetch                             jars into $CACHE/cassandra/lib (skipped when complete)
#   cassandra.sh up [--nodes 1|3]                  start the single node (default) or the 3-node cluster
#   cassandra.sh down [--nodes 1|3]                stop them (both topologies when --nodes is left out)
#   cassandra.sh status                            one line per node of both topologies
#   cassandra.sh nodetool [--nodes 1|3] N ARGS...  Cassandra's nodetool against node N (over JMX)
#   cassandra.sh flush [--nodes 1|3]               flush the memtables of every running node to SSTables
#   cassandra.sh dir [--nodes 1|3] N               print node N's directory (data/, commitlog/, cassandra.pid)
#   cassandra.sh clean [--nodes 1|3]               delete the nodes' directories (they must be stopped)
#
# The two topologies can run side by side:
#   --nodes 1: node 1 on 127.0.0.1, CQL port 9042, storage port 7000, JMX port 7199
#   --nodes 3: node i on 127.0.0.i, CQL port 9142, storage port 7100, JMX port 7200+i
# `up` is idempotent: a node whose pid file names a live Cassandra is left alone. `down` signals
# only the pids in this script's pid files, never processes found by name.
#
# Environment: MAMMOFL_CACHE (default ~/.cache/mammofl), JAVA_HOME (a JDK 17; default: java on
# PATH), CASSANDRA_HEAP (default 1G), CASSANDRA_START_TIMEOUT (seconds per node, default 240).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CASSANDRA_HOME="${MAMMOFL_CACHE:-$HOME/.cache/mammofl}/cassandra"
LIB="$CASSANDRA_HOME/lib"
# The number of jars that cassandra-all (the version in pom.xml) and its runtime dependencies
# make; change both together. A smaller count means Maven resolved the POM only in part.
EXPECTED_JARS=100
JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"
HEAP="${CASSANDRA_HEAP:-1G}"
START_TIMEOUT="${CASSANDRA_START_TIMEOUT:-240}"
STOP_TIMEOUT=60
# Evenly spaced Murmur3 tokens, one per node of the 3-node cluster (node 1 alone owns everything).
TOKENS=(-9223372036854775808 -3074457345618258603 3074457345618258602)

die() { echo "cassandra.sh: $*" >&2; exit 1; }

# --- topology -------------------------------------------------------------------------------

node_count_ok() { [[ $1 == 1 || $1 == 3 ]] || die "--nodes must be 1 or 3, not '$1'"; }
topology_name() { if [[ $1 == 1 ]]; then echo single; else echo cluster; fi; }
node_dir() { echo "$CASSANDRA_HOME/$(topology_name "$1")/node$2"; }
node_address() { echo "127.0.0.$2"; }
native_port() { if [[ $1 == 1 ]]; then echo 9042; else echo 9142; fi; }
storage_port() { if [[ $1 == 1 ]]; then echo 7000; else echo 7100; fi; }
jmx_port() { if [[ $1 == 1 ]]; then echo 7199; else echo $((7200 + $2)); fi; }

node_in_range() {  # NODES N
  [[ $2 =~ ^[0-9]+$ ]] && (( $2 >= 1 && $2 <= $1 )) \
    || die "node must be a number from 1 to $1 for --nodes $1, not '$2'"
}

# --- jars -----------------------------------------------------------------------------------

jar_count() { find "$LIB" -maxdepth 1 -name '*.jar' 2>/dev/null | wc -l; }

fetch() {
  if (( $(jar_count) == EXPECTED_JARS )); then
    return
  fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Cassandra's jars (apt-get install maven)"
  local partial="$LIB.partial"
  rm -rf "$partial"
  echo "fetching Cassandra jars into $LIB"
  mvn -B -q -Dstyle.color=never -f "$HERE/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$partial" -DincludeScope=runtime
  local count
  count=$(find "$partial" -maxdepth 1 -name '*.jar' | wc -l)
  (( count == EXPECTED_JARS )) \
    || die "Maven copied $count jars, expected $EXPECTED_JARS: cassandra-all's POM did not resolve whole"
  rm -rf "$LIB"
  mv "$partial" "$LIB"
}

check_java() {
  local version
  version=$("$JAVA" -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  [[ $version == 17 ]] || die "Cassandra 5.0 needs JDK 17 here; '$JAVA' is version '${version:-unknown}' (set JAVA_HOME)"
}

# Flags from an options file: every line that starts with '-'.
options_from() { grep -E '^-' "$HERE/$1"; }

# --- processes ------------------------------------------------------------------------------

# The pid in the node's pid file, when that process is alive and is this node's Cassandra.
running_pid() {  # NODE_DIR
  local pid command_line
  pid=$(cat "$1/cassandra.pid" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  command_line=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || return 1
  [[ $command_line == *" -Dcassandra.storagedir=$1 "*CassandraDaemon* ]] || return 1
  echo "$pid"
}

# True when a CQL server at ADDRESS:PORT answers an OPTIONS request (protocol v4) with SUPPORTED.
cql_answers() {  # ADDRESS PORT
  local header
  header=$(timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "\x04\x00\x00\x01\x05\x00\x00\x00\x00" >&3
    head -c 5 <&3 | od -An -tx1' "$1" "$2" 2>/dev/null | tr -d ' \n') || return 1
  [[ $header == 8400000106 ]]
}

port_taken() {  # ADDRESS PORT
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

write_config() {  # NODES N NODE_DIR
  local nodes=$1 i=$2 dir=$3
  mkdir -p "$dir"/{conf,data,commitlog,saved_caches,hints,cdc_raw,logs,triggers}
  sed -e "s|@CLUSTER_NAME@|mammofl-$(topology_name "$nodes")|" \
      -e "s|@INITIAL_TOKEN@|${TOKENS[$((i - 1))]}|" \
      -e "s|@ADDRESS@|$(node_address "$nodes" "$i")|g" \
      -e "s|@STORAGE_PORT@|$(storage_port "$nodes")|" \
      -e "s|@NATIVE_PORT@|$(native_port "$nodes")|" \
      -e "s|@SEED@|$(node_address "$nodes" 1):$(storage_port "$nodes")|" \
      -e "s|@NODE_DIR@|$dir|g" \
      "$HERE/cassandra.yaml.template" >"$dir/conf/cassandra.yaml"
}

launch() {  # NODES N NODE_DIR
  local nodes=$1 i=$2 dir=$3 jamm
  jamm=$(find "$LIB" -maxdepth 1 -name 'jamm-*.jar' | head -n 1)
  [[ -n $jamm ]] || die "no jamm-*.jar in $LIB: run '$0 fetch' again"
  local flags
  mapfile -t flags < <(options_from jvm-server.options)
  # setsid: the node lives in its own session, so a Ctrl-C meant for the tests does not reach it.
  setsid "$JAVA" "-Xms$HEAP" "-Xmx$HEAP" "${flags[@]}" "-javaagent:$jamm" \
    "-Dcassandra.config=file://$dir/conf/cassandra.yaml" \
    "-Dcassandra.storagedir=$dir" \
    "-Dcassandra.logdir=$dir/logs" \
    "-Dcassandra.triggers_dir=$dir/triggers" \
    "-Dcassandra.jmx.local.port=$(jmx_port "$nodes" "$i")" \
    "-Dlogback.configurationFile=file://$HERE/logback.xml" \
    -cp "$LIB/*" org.apache.cassandra.service.CassandraDaemon \
    </dev/null >"$dir/logs/stdout.log" 2>&1 &
  echo $! >"$dir/cassandra.pid"
}

wait_for_cql() {  # NODES N NODE_DIR
  local nodes=$1 i=$2 dir=$3 address port waited=0
  address=$(node_address "$nodes" "$i")
  port=$(native_port "$nodes")
  until cql_answers "$address" "$port"; do
    if ! running_pid "$dir" >/dev/null; then
      show_log_tail "$dir"
      die "node $i exited during start-up (log above, more in $dir/logs)"
    fi
    if (( waited >= START_TIMEOUT )); then
      show_log_tail "$dir"
      stop_nodes "$dir"
      die "node $i did not answer CQL on $address:$port within ${START_TIMEOUT}s; stopped it (log above)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "node $i answers CQL on $address:$port (pid $(running_pid "$dir"))"
}

show_log_tail() {  # NODE_DIR
  echo "---- last lines of $1/logs ----" >&2
  tail -n 30 "$1/logs/system.log" "$1/logs/stdout.log" >&2 2>/dev/null || true
}

# Launches node N unless its pid file names a live Cassandra already.
start_node() {  # NODES N
  local nodes=$1 i=$2 dir pid address port
  dir=$(node_dir "$nodes" "$i")
  if pid=$(running_pid "$dir"); then
    echo "node $i already running (pid $pid)"
    return
  fi
  address=$(node_address "$nodes" "$i")
  for port in "$(native_port "$nodes")" "$(storage_port "$nodes")"; do
    ! port_taken "$address" "$port" \
      || die "$address:$port is in use by a process this script did not start; stop it first"
  done
  write_config "$nodes" "$i" "$dir"
  launch "$nodes" "$i" "$dir"
}

# Stops the nodes in the given directories together: SIGTERM (Cassandra drains and flushes),
# then SIGKILL for any that is still alive after STOP_TIMEOUT seconds.
stop_nodes() {  # NODE_DIR...
  local dir pid pids=() waited=0
  for dir in "$@"; do
    if pid=$(running_pid "$dir"); then
      kill -TERM "$pid"
      pids+=("$pid")
      echo "stopping $(basename "$(dirname "$dir")")/$(basename "$dir") (pid $pid)"
    fi
  done
  for pid in "${pids[@]}"; do
    while kill -0 "$pid" 2>/dev/null && (( waited < STOP_TIMEOUT )); do
      sleep 0.5
      waited=$((waited + 1))
    done
    ! kill -0 "$pid" 2>/dev/null || kill -KILL "$pid"
  done
  for dir in "$@"; do
    rm -f "$dir/cassandra.pid"
  done
}

node_dirs() {  # NODES
  local i
  for i in $(seq 1 "$1"); do node_dir "$1" "$i"; done
}

# --- commands -------------------------------------------------------------------------------

up() {  # NODES
  fetch
  check_java
  local nodes=$1 i
  # The seed (node 1) first: the others join the ring through it. They skip bootstrap (the
  # cluster is fresh), so they can start together, which saves a node's start-up time.
  start_node "$nodes" 1
  wait_for_cql "$nodes" 1 "$(node_dir "$nodes" 1)"
  for i in $(seq 2 "$nodes"); do
    start_node "$nodes" "$i"
  done
  for i in $(seq 2 "$nodes"); do
    wait_for_cql "$nodes" "$i" "$(node_dir "$nodes" "$i")"
  done
}

down() {  # [NODES]
  local -a dirs
  if [[ -n ${1:-} ]]; then
    mapfile -t dirs < <(node_dirs "$1")
  else
    mapfile -t dirs < <(node_dirs 1; node_dirs 3)
  fi
  stop_nodes "${dirs[@]}"
}

status() {
  local nodes i dir pid state
  for nodes in 1 3; do
    for i in $(seq 1 "$nodes"); do
      dir=$(node_dir "$nodes" "$i")
      state=stopped
      if pid=$(running_pid "$dir"); then
        state="running, pid $pid"
        ! cql_answers "$(node_address "$nodes" "$i")" "$(native_port "$nodes")" \
          || state="$state, answers CQL"
      fi
      echo "$(topology_name "$nodes") node $i $(node_address "$nodes" "$i"):$(native_port "$nodes") $state"
    done
  done
}

nodetool() {  # NODES N ARGS...
  local nodes=$1 i=$2 flags
  shift 2
  node_in_range "$nodes" "$i"
  mapfile -t flags < <(options_from jvm-clients.options)
  # user.home: nodetool keeps its history file there, so it stays in the cache.
  "$JAVA" -Xmx256m "${flags[@]}" "-Duser.home=$CASSANDRA_HOME" \
    "-Dlogback.configurationFile=file://$HERE/logback-tools.xml" \
    -cp "$LIB/*" org.apache.cassandra.tools.NodeTool \
    -h 127.0.0.1 -p "$(jmx_port "$nodes" "$i")" "$@"
}

flush() {  # NODES
  local i dir
  for i in $(seq 1 "$1"); do
    dir=$(node_dir "$1" "$i")
    if running_pid "$dir" >/dev/null; then
      nodetool "$1" "$i" flush
    fi
  done
}

clean() {  # NODES
  local dir
  while read -r dir; do
    ! running_pid "$dir" >/dev/null || die "$dir belongs to a running node: run '$0 down' first"
    rm -rf "$dir"
  done < <(node_dirs "$1")
}

main() {
  local command=${1:-}
  [[ -n $command ]] || die "usage: cassandra.sh fetch|up|down|status|nodetool|flush|dir|clean [--nodes 1|3] [N] [ARGS...]"
  shift
  local nodes=""
  if [[ ${1:-} == --nodes ]]; then
    [[ $# -ge 2 ]] || die "--nodes needs a value: 1 or 3"
    nodes=$2
    node_count_ok "$nodes"
    shift 2
  fi
  case $command in
    fetch) fetch ;;
    up) up "${nodes:-1}" ;;
    down) down "$nodes" ;;
    status) status ;;
    nodetool)
      [[ $# -ge 2 ]] || die "usage: cassandra.sh nodetool [--nodes 1|3] N ARGS..."
      nodetool "${nodes:-1}" "$@" ;;
    flush) flush "${nodes:-1}" ;;
    dir)
      [[ $# -eq 1 ]] || die "usage: cassandra.sh dir [--nodes 1|3] N"
      node_in_range "${nodes:-1}" "$1"
      node_dir "${nodes:-1}" "$1" ;;
    clean) clean "${nodes:-1}" ;;
    *) die "unknown command '$command': use fetch, up, down, status, nodetool, flush, dir or clean" ;;
  esac
}

main "$@"
