#!/usr/bin/env bash
# Local Apicurio Registry (Confluent-compatible schema registry, in-memory, no Docker) for
# modelpulse tests and development. Run `scripts/registry.sh --help` for the full description.
set -euo pipefail

SERVICE=registry
# shellcheck source=scripts/lib/service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"
POM="${REPO_ROOT}/deploy/registry/pom.xml"
VERSION="${MODELPULSE_REGISTRY_VERSION:-$(service_pom_property "${POM}" apicurio.version)}"
DIST="${CACHE_ROOT}/apicurio-${VERSION}"
MARKER="${DIST}/.installed"
HEAP_OPTS="${REGISTRY_HEAP_OPTS:--Xms64m -Xmx384m}"
START_TIMEOUT="${REGISTRY_START_TIMEOUT:-90}"
STOP_TIMEOUT="${REGISTRY_STOP_TIMEOUT:-20}"
DEFAULT_NAME="default"
DEFAULT_PORT=8081
CCOMPAT_PATH="/apis/ccompat/v7"

usage() {
  cat <<EOF
Usage: scripts/registry.sh COMMAND [OPTIONS]

Local Apicurio Registry ${VERSION} with in-memory storage (an H2 database in the JVM: a restart
starts empty), run straight from its Maven Central distribution. Its Confluent-compatible API
is at http://127.0.0.1:PORT${CCOMPAT_PATH} (what confluent-kafka's SchemaRegistryClient and the
modelpulse producer/aggregator take as schema registry URL). Needs Java 17+ and, for 'install',
Maven.

Commands:
  install
      Fetch io.apicurio:apicurio-registry-app:${VERSION}:tar.gz:all (deploy/registry/pom.xml, the
      version is pinned there) and unpack it into ${DIST}
      Idempotent: does nothing when ${MARKER##*/} is there (and the pom is unchanged).
      'start' runs it automatically when needed.

  start [--name NAME] [--port PORT] [--timeout SECONDS]
      Start a registry in the background and wait until its Confluent API answers (default
      timeout ${START_TIMEOUT}s, env REGISTRY_START_TIMEOUT). Prints 'url=http://127.0.0.1:PORT${CCOMPAT_PATH}'
      on its own line at the end. Already running: says so and returns 0. On failure prints the
      last 40 log lines and exits 1. Listens on 127.0.0.1 only. The port is remembered: a later
      'start --name NAME' reuses it. Default name '${DEFAULT_NAME}', port ${DEFAULT_PORT}.

  stop [--name NAME] [--kill]
      SIGTERM, wait up to ${STOP_TIMEOUT}s (env REGISTRY_STOP_TIMEOUT), then SIGKILL; --kill at once.
      Everything registered is gone (in-memory storage).

  status [--name NAME]
      One line; exit 0 when it runs and answers, 3 otherwise. Prints the url= line too.

  logs [--name NAME] [-n LINES] [-f]
      Tail the registry's log.

Files:
  distribution: \${MODELPULSE_CACHE:-\$HOME/.cache/modelpulse}/apicurio-<version>/
  run dir:      \${MODELPULSE_RUN_DIR:-<repo>/.run}/registry-NAME/  (registry.env, registry.pid, registry.log)

Environment:
  REGISTRY_HEAP_OPTS           default '-Xms64m -Xmx384m'
  REGISTRY_OPTS                extra JVM options (e.g. -Dapicurio.... settings)
  MODELPULSE_REGISTRY_VERSION  override the version pinned in deploy/registry/pom.xml (3.0.x; 3.3+ needs Java 21)
  JAVA_HOME                    java to use (default: java on PATH)
  MODELPULSE_CACHE, MODELPULSE_RUN_DIR  see above
EOF
}

java_bin() { service_java "Apicurio Registry ${VERSION}"; }

pom_hash() { sha256sum "${POM}" | cut -d' ' -f1; }

runner_jar() { printf '%s/apicurio-registry-app-%s-runner.jar\n' "${DIST}" "${VERSION}"; }

installed_ok() {
  [[ -f "${MARKER}" && -f "$(runner_jar)" && "$(cat "${MARKER}")" == "${VERSION} $(pom_hash)" ]]
}

# ---------------------------------------------------------------- install

cmd_install() {
  [[ $# -eq 0 ]] || die "install takes no options"
  [[ -n "${VERSION}" ]] || die "could not read <apicurio.version> from ${POM}"
  service_install "Apicurio Registry ${VERSION}" "${DIST}" installed_ok fetch_registry
}

fetch_registry() {
  local tmp log="${DIST}/install.log" tarball
  tmp="$(mktemp -d "${DIST}/fetch.tmp.XXXXXX")"
  if ! service_mvn "${log}" -f "${POM}" -Dapicurio.version="${VERSION}" \
    dependency:copy -DoutputDirectory="${tmp}"; then
    rm -rf "${tmp}"
    die "Maven could not fetch apicurio-registry-app ${VERSION} (full log: ${log})"
  fi
  tarball="$(compgen -G "${tmp}/apicurio-registry-app-*.tar.gz" | head -n 1 || true)"
  [[ -n "${tarball}" ]] || {
    rm -rf "${tmp}"
    die "Maven finished but no apicurio-registry-app tar.gz was copied (see ${log})"
  }
  mkdir -p "${tmp}/dist"
  tar -xzf "${tarball}" -C "${tmp}/dist" || {
    rm -rf "${tmp}"
    die "could not unpack ${tarball}"
  }
  [[ -f "${tmp}/dist/apicurio-registry-app-${VERSION}-runner.jar" ]] || {
    rm -rf "${tmp}"
    die "the distribution has no apicurio-registry-app-${VERSION}-runner.jar"
  }
  rm -rf "${DIST}/lib" "${DIST}/meta" "$(runner_jar)"
  mv "${tmp}/dist/"* "${DIST}/"
  rm -rf "${tmp}"
  printf '%s %s\n' "${VERSION}" "$(pom_hash)" >"${MARKER}"
  say "installed $(find "${DIST}/lib" -name '*.jar' | wc -l) jars and $(basename "$(runner_jar)")"
}

# ---------------------------------------------------------------- instance layout

NAME="${DEFAULT_NAME}"
PORT=""
RUN_DIR=""

parse_common() {
  service_opts_init "${DEFAULT_NAME}" "${START_TIMEOUT}" 40
  while (($# > 0)); do
    service_parse_opt "$@"
    shift "${SERVICE_SHIFT}"
  done
  service_check_opts
  NAME="${OPT_NAME}"
  RUN_DIR="${RUN_ROOT}/registry-${NAME}"
  PORT=""
  if [[ -f "${RUN_DIR}/registry.env" ]]; then
    PORT="$(sed -n 's/^PORT=//p' "${RUN_DIR}/registry.env")"
  fi
  if [[ -n "${OPT_PORT}" ]]; then
    PORT="${OPT_PORT}"
  fi
  PORT="${PORT:-${DEFAULT_PORT}}"
}

url() { printf 'http://127.0.0.1:%s%s\n' "${PORT}" "${CCOMPAT_PATH}"; }

registry_pid() {
  # The PID of this instance's JVM when it is alive (and really is this instance), else nothing.
  service_pid "${RUN_DIR}/registry.pid" "-Dmodelpulse.registry.dir=${RUN_DIR} "
}

answers() {
  # True when the Confluent API answers GET /subjects with 200.
  service_http_get "$(url)/subjects" >/dev/null
}

# ---------------------------------------------------------------- commands

cmd_start() {
  parse_common "$@"
  local pid java
  pid="$(registry_pid)"
  if [[ -n "${pid}" ]]; then
    wait_ready "${pid}"
    say "'${NAME}' already running (pid ${pid})"
    printf 'url=%s\n' "$(url)"
    return 0
  fi
  installed_ok || cmd_install
  java="$(java_bin)"
  if service_port_open "${PORT}"; then
    die "port ${PORT} is already in use (pick another with --port)"
  fi
  mkdir -p "${RUN_DIR}"
  printf 'NAME=%s\nPORT=%s\nVERSION=%s\n' "${NAME}" "${PORT}" "${VERSION}" >"${RUN_DIR}/registry.env"
  local -a heap extra
  read -r -a heap <<<"${HEAP_OPTS}"
  read -r -a extra <<<"${REGISTRY_OPTS:-}"
  say "starting '${NAME}' (Apicurio Registry ${VERSION}, port ${PORT}, run dir ${RUN_DIR})"
  # The marker property only lets registry_pid recognise this JVM; cwd is the run dir so the
  # registry's own files (if any) stay out of the repository.
  service_start "${RUN_DIR}/registry.pid" "${RUN_DIR}/registry.log" "${RUN_DIR}" \
    "${java}" "${heap[@]}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    "-Dmodelpulse.registry.dir=${RUN_DIR}" \
    -Dquarkus.http.host=127.0.0.1 "-Dquarkus.http.port=${PORT}" \
    -Dquarkus.log.console.color=false \
    -Dquarkus.http.access-log.enabled=false \
    "${extra[@]}" -jar "$(runner_jar)"
  wait_ready "${SERVICE_PID}"
  say "'${NAME}' ready after ${SERVICE_WAITED}s"
  printf 'url=%s\n' "$(url)"
}

wait_ready() {
  service_wait_ready "${OPT_TIMEOUT}" "$1" "${RUN_DIR}/registry.log" \
    "the registry JVM (pid $1) exited during start" \
    "the registry did not answer on $(url) within ${OPT_TIMEOUT}s" answers
}

cmd_stop() {
  parse_common "$@"
  local pid
  pid="$(registry_pid)"
  if [[ -z "${pid}" ]]; then
    say "'${NAME}' is not running"
    rm -f "${RUN_DIR}/registry.pid"
    return 0
  fi
  service_stop "${STOP_TIMEOUT}" "${OPT_KILL}" "${pid}"
  rm -f "${RUN_DIR}/registry.pid"
  say "'${NAME}' stopped"
}

cmd_status() {
  parse_common "$@"
  local pid
  pid="$(registry_pid)"
  if [[ -z "${pid}" ]]; then
    say "'${NAME}': stopped (port ${PORT})"
    return 3
  fi
  if answers; then
    say "'${NAME}': running (pid ${pid}) on port ${PORT}"
    printf 'url=%s\n' "$(url)"
    return 0
  fi
  say "'${NAME}': starting (pid ${pid}) on port ${PORT}"
  return 3
}

cmd_logs() {
  parse_common "$@"
  local f="${RUN_DIR}/registry.log"
  [[ -f "${f}" ]] || die "no log yet (${f})"
  service_logs "${f}"
}

service_main "$@"
