#!/usr/bin/env bash
# Local Apache Kafka (KRaft mode, no ZooKeeper, no Docker) for modelpulse development and tests.
# Run `scripts/kafka.sh --help` for the full description.
set -euo pipefail

SERVICE=kafka
# shellcheck source=scripts/lib/service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"
POM="${REPO_ROOT}/deploy/kafka/pom.xml"
LOG4J_CONF="${REPO_ROOT}/deploy/kafka/log4j2.yaml"
KAFKA_VERSION="${MODELPULSE_KAFKA_VERSION:-$(service_pom_property "${POM}" kafka.version)}"
KAFKA_DIST="${CACHE_ROOT}/kafka-${KAFKA_VERSION}"
LIBS="${KAFKA_DIST}/libs"
MARKER="${KAFKA_DIST}/.installed"
HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
JVM_OPTS="${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-30}"
STARTED_LINE="Kafka Server started"

DEFAULT_NAME="default"
DEFAULT_PORT=9092
NODE_PORT_STEP=10

usage() {
  cat <<EOF
Usage: scripts/kafka.sh COMMAND [OPTIONS]

Local Apache Kafka ${KAFKA_VERSION} in KRaft mode (no ZooKeeper, no Docker), run straight from
the Maven jars. Needs Java 17+ and, for 'install', Maven.

Commands:
  install
      Resolve kafka_2.13:${KAFKA_VERSION} and its runtime jars (deploy/kafka/pom.xml, pinned there)
      into ${LIBS}
      Idempotent: does nothing when the marker file ${MARKER##*/} is there (and the pom is unchanged).
      'start' runs it automatically when needed.

  start [--name NAME] [--port PORT] [--brokers 1|3] [--timeout SECONDS]
        [--security plaintext|sasl_ssl|mtls] [--tls-dir DIR]
      Start a cluster in the background and wait until it serves (default timeout ${START_TIMEOUT}s,
      env KAFKA_START_TIMEOUT). Prints 'bootstrap=HOST:PORT[,...]' on its own line at the end.
      If the cluster is already running, says so and returns 0. On failure, prints the
      last 40 log lines and exits 1.
        --name NAME     cluster name (default '${DEFAULT_NAME}'); several clusters can run at once
                        on different ports.
        --port PORT     first broker port (default ${DEFAULT_PORT}).
        --brokers 1|3   1 (default): one combined broker+controller node.
                        3: three combined broker+controller nodes (a 3-voter KRaft quorum),
                           so any single node can be killed -9 and restarted while the cluster
                           keeps serving; default.replication.factor=3, min.insync.replicas=2,
                           offsets/transaction-state topics replicated 3 times.
        --security MODE plaintext (default): no authentication, no encryption.
                        sasl_ssl: one SASL_SSL listener, SCRAM-SHA-512 only; the client user
                           is \$KAFKA_SCRAM_USER (default 'modelpulse') with the password in
                           \$KAFKA_SCRAM_PASSWORD (required; never printed nor stored, but
                           on the command line of the one-off format step: a test stack, not
                           a production setup). The brokers talk to each other on the same
                           listener as a generated admin user (password in the run dir).
                        mtls: one SSL listener with ssl.client.auth=required; clients need a
                           certificate signed by the CA in the TLS dir.
                        Remembered like the port. The controller listener stays PLAINTEXT on
                        127.0.0.1 (it is not a client endpoint).
        --tls-dir DIR   where the certificates are (sasl_ssl, mtls; default <run dir>/tls).
                        Missing ones are made with openssl: ca.pem (+ ca.key), server.pem +
                        server.key (SAN IP:127.0.0.1, DNS:localhost), client.pem + client.key
                        (CN=modelpulse-client). Clients use ca.pem as ssl.ca.location and, for
                        mtls, client.pem / client.key as certificate / key.
      Port scheme (everything listens on 127.0.0.1 only):
        node I (I = 1..N) broker port     = PORT + ${NODE_PORT_STEP}*(I-1)   e.g. 9092 | 19092,19102,19112
                          controller port = broker port + 1          e.g. 9093 | 19093,19103,19113
      The port and broker count are remembered; a later 'start --name NAME' reuses them
      (use 'clean' to change them).
      Broker settings: auto.create.topics.enable=true, num.partitions=1,
      group.initial.rebalance.delay.ms=0, __consumer_offsets / __transaction_state with 10
      partitions (instead of 50, for a faster first consumer group), default retention.

  stop [--name NAME] [--kill]
      Stop all nodes: SIGTERM, wait up to ${STOP_TIMEOUT}s (env KAFKA_STOP_TIMEOUT), then SIGKILL.
      --kill sends SIGKILL at once. Data is kept.

  stop-node --name NAME --node I [--kill]
  start-node --name NAME --node I [--timeout SECONDS]
      Stop / start one node of a cluster (for fault tests), e.g. 'stop-node --node 2 --kill'.

  status [--name NAME]
      One line per node; exit 0 when all nodes run and accept connections, 3 otherwise.

  logs [--name NAME] [--node I] [-n LINES] [-f]
      Tail server.log of each node (or of node I); -f follows.

  clean [--name NAME] [--kill]
      Stop the cluster and delete its run dir (data included).

  run-class CLASS [ARGS...]
      Run any class from the Kafka jars, e.g.
        scripts/kafka.sh run-class org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 --list
      (tools: org.apache.kafka.tools.TopicCommand, org.apache.kafka.tools.ConsoleProducer,
       org.apache.kafka.tools.consumer.ConsoleConsumer, org.apache.kafka.tools.consumer.group.ConsumerGroupCommand,
       kafka.tools.StorageTool, ...).

Files:
  jars:     \${MODELPULSE_CACHE:-\$HOME/.cache/modelpulse}/kafka-<version>/libs
  run dir:  \${MODELPULSE_RUN_DIR:-<repo>/.run}/kafka-NAME/
              cluster.env              name, port, brokers, cluster id, security, TLS dir
              admin-client.json        librdkafka config this script's readiness check uses
                                       (secured clusters; mode 600)
              node-I/server.properties generated config
              node-I/data/             log.dirs (formatted once with kafka.tools.StorageTool)
              node-I/logs/server.log   broker log (log4j2 config: deploy/kafka/log4j2.yaml)
              node-I/stdout.log        stdout/stderr of the JVM (WARN+ and crashes)
              node-I/kafka.pid         PID file

Environment:
  KAFKA_HEAP_OPTS             default '-Xms256m -Xmx768m'
  KAFKA_JVM_PERFORMANCE_OPTS  default G1 options as in kafka-run-class.sh
  KAFKA_OPTS                  extra JVM options
  KAFKA_LOG_LEVEL             root log level, default INFO
  KAFKA_SCRAM_USER, KAFKA_SCRAM_PASSWORD  the SCRAM-SHA-512 client user of --security sasl_ssl
  MODELPULSE_KAFKA_VERSION    override the version pinned in deploy/kafka/pom.xml (e.g. 4.0.1)
  JAVA_HOME                   java to use (default: java on PATH)
  MODELPULSE_CACHE, MODELPULSE_RUN_DIR  see above
EOF
}

java_bin() { service_java "Kafka ${KAFKA_VERSION}"; }

check_java() {
  local java version major
  java="$(java_bin)"
  version="$("${java}" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
  major="${version%%.*}"
  if [[ "${major}" == "1" ]]; then
    major="$(printf '%s' "${version}" | cut -d. -f2)"
  fi
  if ! [[ "${major}" =~ ^[0-9]+$ ]] || ((major < 17)); then
    die "Kafka ${KAFKA_VERSION} needs Java 17+, but ${java} is '${version:-unknown}'"
  fi
}

pom_hash() {
  sha256sum "${POM}" | cut -d' ' -f1
}

# ---------------------------------------------------------------- install

tools_log4j_conf() {
  # log4j2 config for command line tools (StorageTool, run-class): WARN+ to stderr only.
  local f="${KAFKA_DIST}/tools-log4j2.properties"
  if [[ ! -f "${f}" ]]; then
    mkdir -p "${KAFKA_DIST}"
    cat >"${f}" <<'EOF'
status = error
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
EOF
  fi
  printf '%s\n' "${f}"
}

cmd_install() {
  [[ $# -eq 0 ]] || die "install takes no options"
  [[ -n "${KAFKA_VERSION}" ]] || die "could not read <kafka.version> from ${POM}"
  service_install "Kafka ${KAFKA_VERSION}" "${KAFKA_DIST}" installed_ok fetch_kafka "${LIBS}"
}

fetch_kafka() {
  # The jars land in a temporary dir first, so a failed run leaves the old ones in place.
  check_java
  local tmp mvn_log="${KAFKA_DIST}/install.log"
  tmp="$(mktemp -d "${KAFKA_DIST}/libs.tmp.XXXXXX")"
  if ! service_mvn "${mvn_log}" -f "${POM}" -Dkafka.version="${KAFKA_VERSION}" \
    dependency:copy-dependencies -DoutputDirectory="${tmp}"; then
    rm -rf "${tmp}"
    die "Maven could not resolve Kafka ${KAFKA_VERSION} (full log: ${mvn_log})"
  fi
  if ! compgen -G "${tmp}/kafka_2.13-*.jar" >/dev/null; then
    rm -rf "${tmp}"
    die "Maven finished but no kafka_2.13 jar was copied (see ${mvn_log})"
  fi
  rm -rf "${LIBS}"
  mv "${tmp}" "${LIBS}"
  printf '%s %s\n' "${KAFKA_VERSION}" "$(pom_hash)" >"${MARKER}"
  say "installed $(find "${LIBS}" -name '*.jar' | wc -l) jars in ${LIBS}"
}

installed_ok() {
  [[ -f "${MARKER}" && -d "${LIBS}" && "$(cat "${MARKER}")" == "${KAFKA_VERSION} $(pom_hash)" ]]
}

ensure_installed() {
  installed_ok || cmd_install
}

# ---------------------------------------------------------------- cluster layout

NAME="${DEFAULT_NAME}"
PORT=""
BROKERS=""
CLUSTER_ID=""
CLUSTER_DIR=""
SECURITY="plaintext"
TLS_DIR=""

load_cluster() {
  # Reads PORT, BROKERS, CLUSTER_ID of an existing cluster; returns 1 when there is none.
  local env_file="${CLUSTER_DIR}/cluster.env" key value
  [[ -f "${env_file}" ]] || return 1
  while IFS='=' read -r key value; do
    case "${key}" in
      PORT) PORT="${value}" ;;
      BROKERS) BROKERS="${value}" ;;
      CLUSTER_ID) CLUSTER_ID="${value}" ;;
      SECURITY) SECURITY="${value}" ;;
      TLS_DIR) TLS_DIR="${value}" ;;
      *) ;;
    esac
  done <"${env_file}"
  [[ -n "${PORT}" && -n "${BROKERS}" && -n "${CLUSTER_ID}" ]] || die "corrupt ${env_file}; run: scripts/kafka.sh clean --name ${NAME}"
}

require_cluster() {
  load_cluster || die "no Kafka cluster named '${NAME}' (nothing in ${CLUSTER_DIR}); start it first"
}

node_dir() { printf '%s/node-%s\n' "${CLUSTER_DIR}" "$1"; }
broker_port() { printf '%s\n' $((PORT + NODE_PORT_STEP * ($1 - 1))); }
controller_port() { printf '%s\n' $((PORT + NODE_PORT_STEP * ($1 - 1) + 1)); }

bootstrap_servers() {
  local i out=""
  for ((i = 1; i <= BROKERS; i++)); do
    out+="${out:+,}127.0.0.1:$(broker_port "${i}")"
  done
  printf '%s\n' "${out}"
}

new_cluster_id() {
  # Kafka Uuid: 16 random bytes, URL-safe base64 without padding (what StorageTool random-uuid
  # prints). Like Kafka, never start with '-' (it would be read as a command line option).
  local id="-"
  while [[ "${id}" == -* ]]; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
  done
  printf '%s\n' "${id}"
}

write_server_properties() {
  local i="$1" dir voters="" j rf min_isr listener
  listener="$(listener_name)"
  dir="$(node_dir "${i}")"
  for ((j = 1; j <= BROKERS; j++)); do
    voters+="${voters:+,}${j}@127.0.0.1:$(controller_port "${j}")"
  done
  if ((BROKERS >= 3)); then
    rf=3
    min_isr=2
  else
    rf=1
    min_isr=1
  fi
  mkdir -p "${dir}/data" "${dir}/logs"
  cat >"${dir}/server.properties" <<EOF
# Generated by scripts/kafka.sh for cluster '${NAME}', node ${i} of ${BROKERS} (Kafka ${KAFKA_VERSION}).
# Regenerated on every start: edit scripts/kafka.sh, not this file.
process.roles=broker,controller
node.id=${i}
controller.quorum.voters=${voters}
listeners=${listener}://127.0.0.1:$(broker_port "${i}"),CONTROLLER://127.0.0.1:$(controller_port "${i}")
advertised.listeners=${listener}://127.0.0.1:$(broker_port "${i}")
listener.security.protocol.map=${listener}:${listener},CONTROLLER:PLAINTEXT
inter.broker.listener.name=${listener}
controller.listener.names=CONTROLLER

log.dirs=${dir}/data
num.partitions=1
auto.create.topics.enable=true
default.replication.factor=${rf}
min.insync.replicas=${min_isr}
offsets.topic.replication.factor=${rf}
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=${rf}
transaction.state.log.min.isr=${min_isr}
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=${rf}
share.coordinator.state.topic.min.isr=${min_isr}
group.initial.rebalance.delay.ms=0

num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.retention.hours=168
log.segment.bytes=1073741824
EOF
  security_properties >>"${dir}/server.properties"
  # The file holds the inter-broker SCRAM password of a sasl_ssl cluster.
  chmod 600 "${dir}/server.properties"
}

listener_name() {
  case "${SECURITY}" in
    sasl_ssl) printf 'SASL_SSL\n' ;;
    mtls) printf 'SSL\n' ;;
    *) printf 'PLAINTEXT\n' ;;
  esac
}

security_properties() {
  # Extra broker settings of a secured cluster (nothing for plaintext).
  [[ "${SECURITY}" == plaintext ]] && return 0
  cat <<EOF

# TLS: PEM files made by this script (or given with --tls-dir).
ssl.keystore.type=PEM
ssl.keystore.location=${TLS_DIR}/server-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=${TLS_DIR}/ca.pem
ssl.endpoint.identification.algorithm=https
EOF
  if [[ "${SECURITY}" == mtls ]]; then
    printf 'ssl.client.auth=required\n'
  else
    cat <<EOF
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="${ADMIN_USER}" password="$(admin_password)";
EOF
  fi
}

ADMIN_USER="kafka-admin"

admin_password() {
  # The inter-broker (and readiness check) SCRAM password, made once per cluster.
  local f="${CLUSTER_DIR}/admin.secret"
  if [[ ! -s "${f}" ]]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -d '/+=\n' >"${f}")
  fi
  cat "${f}"
}

make_tls() {
  # Creates the CA, server and client certificates in TLS_DIR when missing (openssl).
  [[ "${SECURITY}" == plaintext ]] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl not found (Debian: apt-get install openssl); needed for --security ${SECURITY}"
  mkdir -p "${TLS_DIR}"
  local log="${TLS_DIR}/openssl.log" name ext
  (
    cd "${TLS_DIR}"
    umask 077
    if [[ ! -s ca.pem ]]; then
      openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 30 -keyout ca.key -out ca.pem \
        -subj "/CN=modelpulse-test-ca" >"${log}" 2>&1
    fi
    for name in server client; do
      [[ -s "${name}.pem" && -s "${name}.key" ]] && continue
      if [[ "${name}" == server ]]; then
        ext="subjectAltName=IP:127.0.0.1,DNS:localhost"$'\n'"extendedKeyUsage=serverAuth,clientAuth"
      else
        ext="extendedKeyUsage=clientAuth"
      fi
      openssl req -newkey rsa:2048 -nodes -sha256 -keyout "${name}.key" -out "${name}.csr" \
        -subj "/CN=modelpulse-${name}" >>"${log}" 2>&1
      openssl x509 -req -sha256 -days 30 -in "${name}.csr" -CA ca.pem -CAkey ca.key \
        -CAcreateserial -out "${name}.pem" -extfile <(printf '%s\n' "${ext}") >>"${log}" 2>&1
      rm -f "${name}.csr"
    done
    # Kafka's PEM keystore: the PKCS#8 key and its certificate chain in one file.
    cat server.key server.pem >server-keystore.pem
    chmod 644 ca.pem server.pem client.pem
  ) || {
    cat "${log}" >&2 2>/dev/null || true
    die "could not create the TLS files in ${TLS_DIR}"
  }
}

scram_args() {
  # StorageTool options that create the SCRAM users of a sasl_ssl cluster (format time only).
  [[ "${SECURITY}" == sasl_ssl ]] || return 0
  [[ -n "${KAFKA_SCRAM_PASSWORD:-}" ]] || die "--security sasl_ssl needs the client user's password in KAFKA_SCRAM_PASSWORD"
  printf '%s\n' --add-scram "SCRAM-SHA-512=[name=${ADMIN_USER},password=$(admin_password)]" \
    --add-scram "SCRAM-SHA-512=[name=${KAFKA_SCRAM_USER:-modelpulse},password=${KAFKA_SCRAM_PASSWORD}]"
}

write_admin_client() {
  # librdkafka settings of the readiness check (metadata_ok) for a secured cluster.
  local f="${CLUSTER_DIR}/admin-client.json"
  rm -f "${f}"
  [[ "${SECURITY}" == plaintext ]] && return 0
  (
    umask 077
    if [[ "${SECURITY}" == mtls ]]; then
      printf '{"security.protocol": "SSL", "ssl.ca.location": "%s", "ssl.certificate.location": "%s", "ssl.key.location": "%s"}\n' \
        "${TLS_DIR}/ca.pem" "${TLS_DIR}/client.pem" "${TLS_DIR}/client.key" >"${f}"
    else
      printf '{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "ssl.ca.location": "%s", "sasl.username": "%s", "sasl.password": "%s"}\n' \
        "${TLS_DIR}/ca.pem" "${ADMIN_USER}" "$(admin_password)" >"${f}"
    fi
  )
}

# ---------------------------------------------------------------- processes

node_pid() {
  # Prints the PID of node $1 when its JVM is alive (and really is that node), else nothing.
  local dir
  dir="$(node_dir "$1")"
  service_pid "${dir}/kafka.pid" "${dir}/server.properties"
}

port_open() { service_port_open "$1"; }

log_size() {
  local f
  f="$(node_dir "$1")/logs/server.log"
  if [[ -f "${f}" ]]; then wc -c <"${f}" | tr -d ' '; else printf '0\n'; fi
}

print_node_logs() {
  # print_node_logs NODE [with-stdout]: last 40 lines this launch wrote to server.log (and the
  # JVM's stdout/stderr, which has crash messages such as JVM option errors), to stderr.
  local i="$1" dir
  dir="$(node_dir "${i}")"
  service_show_log "${dir}/logs/server.log" "${LOG_OFFSET[${i}]:-0}"
  if [[ "${2:-}" == "with-stdout" && -s "${dir}/stdout.log" ]]; then
    service_show_log "${dir}/stdout.log"
  fi
}

format_nodes() {
  # Formats (kafka.tools.StorageTool format, static quorum) the nodes given that have no
  # meta.properties yet; the JVMs run in parallel.
  local i dir java conf rc=0
  local -a pids=() nodes=() scram=()
  java="$(java_bin)"
  conf="$(tools_log4j_conf)"
  if [[ "${SECURITY}" == sasl_ssl ]]; then
    [[ -n "${KAFKA_SCRAM_PASSWORD:-}" ]] || scram_args >/dev/null # dies naming the variable
    mapfile -t scram < <(scram_args)
  fi
  for i in "$@"; do
    dir="$(node_dir "${i}")"
    [[ -f "${dir}/data/meta.properties" ]] && continue
    "${java}" -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="${conf}" \
      -cp "${LIBS}/*" kafka.tools.StorageTool format -t "${CLUSTER_ID}" \
      -c "${dir}/server.properties" --ignore-formatted ${scram[@]+"${scram[@]}"} >"${dir}/format.log" 2>&1 </dev/null &
    pids+=("$!")
    nodes+=("${i}")
  done
  for i in "${!pids[@]}"; do
    if ! wait "${pids[${i}]}"; then
      cat "$(node_dir "${nodes[${i}]}")/format.log" >&2
      warn "formatting the storage of node ${nodes[${i}]} failed"
      rc=1
    fi
  done
  ((rc == 0)) || die "could not format the storage of '${NAME}' (output above)"
}

declare -A LOG_OFFSET=()

launch_node() {
  # Starts the JVM of node $1 in the background (no wait); it must be configured and formatted.
  local i="$1" dir java
  dir="$(node_dir "${i}")"
  java="$(java_bin)"
  LOG_OFFSET[${i}]="$(log_size "${i}")"
  local -a heap jvm extra
  read -r -a heap <<<"${HEAP_OPTS}"
  read -r -a jvm <<<"${JVM_OPTS}"
  read -r -a extra <<<"${KAFKA_OPTS:-}"
  service_start "${dir}/kafka.pid" "${dir}/stdout.log" "${dir}" \
    "${java}" "${heap[@]}" "${jvm[@]}" "${extra[@]}" \
    -Dkafka.logs.dir="${dir}/logs" \
    -Dkafka.log.level="${KAFKA_LOG_LEVEL:-INFO}" \
    -Dlog4j2.configurationFile="${LOG4J_CONF}" \
    -cp "${LIBS}/*" kafka.Kafka "${dir}/server.properties"
  say "node ${i} launched (pid ${SERVICE_PID}, broker 127.0.0.1:$(broker_port "${i}"), controller 127.0.0.1:$(controller_port "${i}"))"
}

check_ports() {
  # check_ports NODE... : dies when a port of a (not running) node is taken by someone else.
  local i p
  for i in "$@"; do
    for p in "$(broker_port "${i}")" "$(controller_port "${i}")"; do
      if port_open "${p}"; then
        die "port ${p} (node ${i} of '${NAME}') is already in use by another process; stop it or use another --port"
      fi
    done
  done
}

STARTED_NODES=()

start_nodes() {
  # start_nodes NODE... : configures, formats and launches the given nodes that are not
  # running (no wait); sets STARTED_NODES to those launched.
  local i pid
  STARTED_NODES=()
  for i in "$@"; do
    pid="$(node_pid "${i}")"
    if [[ -n "${pid}" ]]; then
      say "node ${i} already running (pid ${pid})"
      continue
    fi
    check_ports "${i}"
    write_server_properties "${i}"
    STARTED_NODES+=("${i}")
  done
  ((${#STARTED_NODES[@]} > 0)) || return 0
  format_nodes "${STARTED_NODES[@]}"
  for i in "${STARTED_NODES[@]}"; do
    launch_node "${i}"
  done
}

node_started() {
  # True once node $1 logged "Kafka Server started" after its launch and accepts connections.
  local i="$1" f offset size
  # Nodes this invocation did not launch (already running): the broker port is enough, it only
  # opens at the end of the broker startup.
  if [[ -n "${LOG_OFFSET[${i}]:-}" ]]; then
    f="$(node_dir "${i}")/logs/server.log"
    [[ -f "${f}" ]] || return 1
    offset="${LOG_OFFSET[${i}]}"
    size="$(wc -c <"${f}" | tr -d ' ')"
    ((size >= offset)) || offset=0
    tail -c "+$((offset + 1))" "${f}" | grep -qF "${STARTED_LINE}" || return 1
  fi
  port_open "$(broker_port "${i}")"
}

python_with_confluent_kafka() {
  local py
  for py in "${REPO_ROOT}/.venv/bin/python" python3; do
    if command -v "${py}" >/dev/null 2>&1 && "${py}" -c 'import confluent_kafka' >/dev/null 2>&1; then
      printf '%s\n' "${py}"
      return 0
    fi
  done
  return 1
}

metadata_ok() {
  # Metadata request through confluent_kafka (when importable): all $2 brokers registered.
  "$1" - "$(bootstrap_servers)" "$2" "${CLUSTER_DIR}/admin-client.json" <<'EOF' >/dev/null 2>&1
import json, os, sys
from confluent_kafka.admin import AdminClient
conf = {"bootstrap.servers": sys.argv[1], "socket.timeout.ms": 3000}
if os.path.exists(sys.argv[3]):
    with open(sys.argv[3]) as f:
        conf.update(json.load(f))
md = AdminClient(conf).list_topics(timeout=3)
sys.exit(0 if len(md.brokers) >= int(sys.argv[2]) else 1)
EOF
}

WAIT_TOOK=0
WAITING_FOR=()

all_started() {
  local i
  for i in "${WAITING_FOR[@]}"; do
    node_started "${i}" || return 1
  done
}

launch_pid() { cat "$(node_dir "$1")/kafka.pid" 2>/dev/null || printf 'none\n'; }

wait_nodes() {
  # wait_nodes TIMEOUT NODE... : waits until the given nodes serve; sets WAIT_TOOK (seconds).
  local timeout="$1" start i py rc=0 running=0
  shift
  WAITING_FOR=("$@")
  # The PID files are written at launch, before the JVM is exec'ed: a node that exits during
  # startup fails the wait at once.
  local -a pids=()
  for i in "$@"; do pids+=("$(launch_pid "${i}")"); done
  start="$(date +%s)"
  service_wait "${timeout}" "${pids[*]}" all_started || rc=$?
  if ((rc == 2)); then
    for i in "$@"; do
      service_pid_alive "$(launch_pid "${i}")" && continue
      print_node_logs "${i}" with-stdout
      die "node ${i} of '${NAME}' exited during startup (logs above)"
    done
  elif ((rc == 1)); then
    for i in "$@"; do node_started "${i}" || print_node_logs "${i}"; done
    die "Kafka '${NAME}' did not start within ${timeout}s (still running; see logs above, 'scripts/kafka.sh stop --name ${NAME}' to stop it)"
  fi
  if py="$(python_with_confluent_kafka)"; then
    for ((i = 1; i <= BROKERS; i++)); do
      [[ -n "$(node_pid "${i}")" ]] && running=$((running + 1))
    done
    service_wait $((timeout - ($(date +%s) - start))) "" metadata_ok "${py}" "${running}" \
      || die "Kafka '${NAME}' logged '${STARTED_LINE}' but a metadata request did not see ${running} broker(s) within ${timeout}s"
  fi
  WAIT_TOOK=$(($(date +%s) - start))
}

stop_nodes() {
  # stop_nodes KILL(0|1) NODE...
  local kill_now="$1" i pid
  shift
  local -a pids=() nodes=()
  for i in "$@"; do
    pid="$(node_pid "${i}")"
    if [[ -n "${pid}" ]]; then
      pids+=("${pid}")
      nodes+=("${i}")
    fi
  done
  if ((${#pids[@]} == 0)); then
    say "'${NAME}': nothing running"
  else
    local how="SIGTERM"
    ((kill_now)) && how="SIGKILL"
    say "'${NAME}': stopping node(s) ${nodes[*]} (pid ${pids[*]}) with ${how}"
    service_stop "${STOP_TIMEOUT}" "${kill_now}" "${pids[@]}"
  fi
  for i in "$@"; do
    rm -f "$(node_dir "${i}")/kafka.pid"
  done
}

all_nodes() { seq 1 "${BROKERS}"; }

# ---------------------------------------------------------------- commands

parse_common() {
  # Sets OPT_* from the options; unknown options are an error.
  service_opts_init "${DEFAULT_NAME}" "${START_TIMEOUT}" 100
  OPT_BROKERS=""
  OPT_NODE=""
  OPT_SECURITY=""
  OPT_TLS_DIR=""
  while (($# > 0)); do
    case "$1" in
      --brokers) OPT_BROKERS="${2:?--brokers needs a value}"; shift 2 ;;
      --brokers=*) OPT_BROKERS="${1#*=}"; shift ;;
      --node) OPT_NODE="${2:?--node needs a value}"; shift 2 ;;
      --node=*) OPT_NODE="${1#*=}"; shift ;;
      --security) OPT_SECURITY="${2:?--security needs a value}"; shift 2 ;;
      --security=*) OPT_SECURITY="${1#*=}"; shift ;;
      --tls-dir) OPT_TLS_DIR="$(abspath "${2:?--tls-dir needs a value}")"; shift 2 ;;
      --tls-dir=*) OPT_TLS_DIR="$(abspath "${1#*=}")"; shift ;;
      *) service_parse_opt "$@"; shift "${SERVICE_SHIFT}" ;;
    esac
  done
  service_check_opts
  [[ -z "${OPT_BROKERS}" || "${OPT_BROKERS}" == 1 || "${OPT_BROKERS}" == 3 ]] || die "--brokers must be 1 or 3"
  case "${OPT_SECURITY}" in
    "" | plaintext | sasl_ssl | mtls) ;;
    *) die "--security must be plaintext, sasl_ssl or mtls" ;;
  esac
  NAME="${OPT_NAME}"
  CLUSTER_DIR="${RUN_ROOT}/kafka-${NAME}"
}

lock_cluster() {
  # Serializes start/stop/clean of one cluster between concurrent callers (e.g. parallel tests).
  # The lock is fd 9; launched JVMs close it so it is released when this script exits.
  service_lock 9 "${RUN_ROOT}/.kafka-${NAME}.lock" 180 "another scripts/kafka.sh is still busy with '${NAME}'"
}

check_node_opt() {
  [[ -n "${OPT_NODE}" ]] || die "--node I is required"
  if ! [[ "${OPT_NODE}" =~ ^[0-9]+$ ]] || ((OPT_NODE < 1 || OPT_NODE > BROKERS)); then
    die "--node must be between 1 and ${BROKERS} for cluster '${NAME}'"
  fi
}

cmd_start() {
  parse_common "$@"
  lock_cluster
  if load_cluster; then
    if [[ -n "${OPT_PORT}" && "${OPT_PORT}" != "${PORT}" ]] || [[ -n "${OPT_BROKERS}" && "${OPT_BROKERS}" != "${BROKERS}" ]] \
      || [[ -n "${OPT_SECURITY}" && "${OPT_SECURITY}" != "${SECURITY}" ]] || [[ -n "${OPT_TLS_DIR}" && "${OPT_TLS_DIR}" != "${TLS_DIR}" ]]; then
      die "cluster '${NAME}' was created with --port ${PORT} --brokers ${BROKERS} --security ${SECURITY}${TLS_DIR:+ --tls-dir ${TLS_DIR}}; run 'scripts/kafka.sh clean --name ${NAME}' to recreate it differently"
    fi
  else
    PORT="${OPT_PORT:-${DEFAULT_PORT}}"
    BROKERS="${OPT_BROKERS:-1}"
    SECURITY="${OPT_SECURITY:-plaintext}"
    TLS_DIR=""
    if [[ "${SECURITY}" != plaintext ]]; then
      TLS_DIR="${OPT_TLS_DIR:-${CLUSTER_DIR}/tls}"
    fi
    CLUSTER_ID="$(new_cluster_id)"
    ((PORT > 0 && PORT + NODE_PORT_STEP * (BROKERS - 1) + 1 < 65536)) || die "--port ${PORT} out of range"
  fi

  local i pid
  local -a to_start=()
  for i in $(all_nodes); do
    pid="$(node_pid "${i}")"
    [[ -n "${pid}" ]] || to_start+=("${i}")
  done
  if ((${#to_start[@]} == 0)); then
    # shellcheck disable=SC2046 # word splitting of the node list is intended
    wait_nodes "${OPT_TIMEOUT}" $(all_nodes)
    say "'${NAME}' already running (${BROKERS} node(s))"
    printf 'bootstrap=%s\n' "$(bootstrap_servers)"
    return 0
  fi

  ensure_installed
  check_java
  if [[ ! -f "${CLUSTER_DIR}/cluster.env" ]]; then
    check_ports "${to_start[@]}"
    mkdir -p "${CLUSTER_DIR}"
    printf 'NAME=%s\nPORT=%s\nBROKERS=%s\nCLUSTER_ID=%s\nKAFKA_VERSION=%s\nSECURITY=%s\nTLS_DIR=%s\n' \
      "${NAME}" "${PORT}" "${BROKERS}" "${CLUSTER_ID}" "${KAFKA_VERSION}" "${SECURITY}" "${TLS_DIR}" >"${CLUSTER_DIR}/cluster.env"
  fi
  make_tls
  write_admin_client
  say "starting '${NAME}' (Kafka ${KAFKA_VERSION}, ${BROKERS} node(s), run dir ${CLUSTER_DIR})"
  start_nodes "${to_start[@]}"
  wait_nodes "${OPT_TIMEOUT}" "${STARTED_NODES[@]}"
  say "'${NAME}' ready after ${WAIT_TOOK}s"
  printf 'bootstrap=%s\n' "$(bootstrap_servers)"
}

cmd_start_node() {
  parse_common "$@"
  lock_cluster
  require_cluster
  check_node_opt
  ensure_installed
  check_java
  make_tls
  write_admin_client
  start_nodes "${OPT_NODE}"
  if ((${#STARTED_NODES[@]} > 0)); then
    wait_nodes "${OPT_TIMEOUT}" "${STARTED_NODES[@]}"
    say "node ${OPT_NODE} of '${NAME}' ready after ${WAIT_TOOK}s"
  fi
  printf 'bootstrap=%s\n' "$(bootstrap_servers)"
}

cmd_stop() {
  parse_common "$@"
  lock_cluster
  if ! load_cluster; then
    say "no Kafka cluster named '${NAME}'"
    return 0
  fi
  # shellcheck disable=SC2046 # word splitting of the node list is intended
  stop_nodes "${OPT_KILL}" $(all_nodes)
}

cmd_stop_node() {
  parse_common "$@"
  lock_cluster
  require_cluster
  check_node_opt
  stop_nodes "${OPT_KILL}" "${OPT_NODE}"
}

cmd_status() {
  parse_common "$@"
  if ! load_cluster; then
    say "'${NAME}': not created (no ${CLUSTER_DIR})"
    return 3
  fi
  local i pid running=0 state
  for i in $(all_nodes); do
    pid="$(node_pid "${i}")"
    if [[ -n "${pid}" ]]; then
      if port_open "$(broker_port "${i}")"; then
        state="running"
        running=$((running + 1))
      else
        state="starting"
      fi
      say "'${NAME}' node ${i}: ${state} (pid ${pid}) broker 127.0.0.1:$(broker_port "${i}") controller 127.0.0.1:$(controller_port "${i}")"
    else
      say "'${NAME}' node ${i}: stopped (broker port $(broker_port "${i}"))"
    fi
  done
  printf 'bootstrap=%s\n' "$(bootstrap_servers)"
  ((running == BROKERS)) || return 3
}

cmd_logs() {
  parse_common "$@"
  require_cluster
  local -a nodes files=()
  local i f
  if [[ -n "${OPT_NODE}" ]]; then
    check_node_opt
    nodes=("${OPT_NODE}")
  else
    mapfile -t nodes < <(all_nodes)
  fi
  for i in "${nodes[@]}"; do
    f="$(node_dir "${i}")/logs/server.log"
    [[ -f "${f}" ]] && files+=("${f}")
  done
  ((${#files[@]} > 0)) || die "no log files yet in ${CLUSTER_DIR}"
  service_logs "${files[@]}"
}

cmd_clean() {
  parse_common "$@"
  lock_cluster
  if load_cluster; then
    # shellcheck disable=SC2046 # word splitting of the node list is intended
    stop_nodes "${OPT_KILL}" $(all_nodes)
  fi
  if [[ -d "${CLUSTER_DIR}" ]]; then
    rm -rf "${CLUSTER_DIR}"
    say "removed ${CLUSTER_DIR}"
  else
    say "nothing to clean for '${NAME}'"
  fi
}

cmd_run_class() {
  (($# > 0)) || die "run-class needs a class name"
  ensure_installed >&2
  local java conf
  java="$(java_bin)"
  conf="$(tools_log4j_conf)"
  local -a extra
  read -r -a extra <<<"${KAFKA_OPTS:-}"
  exec "${java}" -Xmx512m "${extra[@]}" -Dlog4j2.configurationFile="${conf}" -cp "${LIBS}/*" "$@"
}

service_main "$@"
