#!/usr/bin/env bash
# Local Apicurio Registry (Confluent-compatible schema registry, in-memory, no Docker) for
# modelpulse tests and development. Run `scripts/registry.sh --help` for the full description.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
POM="${REPO_ROOT}/deploy/registry/pom.xml"

abspath() {
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "${PWD}" "$1" ;;
  esac
}

pom_version() {
  sed -n 's:.*<apicurio\.version>\([^<]*\)</apicurio\.version>.*:\1:p' "${POM}" | head -n 1
}

VERSION="${MODELPULSE_REGISTRY_VERSION:-$(pom_version)}"
CACHE_ROOT="$(abspath "${MODELPULSE_CACHE:-${HOME:-/tmp}/.cache/modelpulse}")"
DIST="${CACHE_ROOT}/apicurio-${VERSION}"
MARKER="${DIST}/.installed"
RUN_ROOT="$(abspath "${MODELPULSE_RUN_DIR:-${REPO_ROOT}/.run}")"
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

say() { printf 'registry: %s\n' "$*"; }
die() {
  printf 'registry: error: %s\n' "$*" >&2
  exit 1
}

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
    printf '%s\n' "${JAVA_HOME}/bin/java"
  else
    command -v java || die "java not found on PATH (Apicurio Registry ${VERSION} needs Java 17+; Debian: apt-get install openjdk-17-jre-headless)"
  fi
}

pom_hash() { sha256sum "${POM}" | cut -d' ' -f1; }

runner_jar() { printf '%s/apicurio-registry-app-%s-runner.jar\n' "${DIST}" "${VERSION}"; }

installed_ok() {
  [[ -f "${MARKER}" && -f "$(runner_jar)" && "$(cat "${MARKER}")" == "${VERSION} $(pom_hash)" ]]
}

# ---------------------------------------------------------------- install

cmd_install() {
  [[ $# -eq 0 ]] || die "install takes no options"
  [[ -n "${VERSION}" ]] || die "could not read <apicurio.version> from ${POM}"
  if installed_ok; then
    say "Apicurio Registry ${VERSION} already installed in ${DIST}"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Debian: apt-get install maven); needed once to fetch the registry"
  mkdir -p "${DIST}"
  if command -v flock >/dev/null 2>&1; then
    # Concurrent installs: one fetches, the others wait and reuse it.
    exec 8>"${DIST}/.install.lock"
    flock -w 600 8 || die "another registry install is still running (lock ${DIST}/.install.lock)"
    if installed_ok; then
      exec 8>&-
      say "Apicurio Registry ${VERSION} already installed in ${DIST}"
      return 0
    fi
  fi
  say "installing Apicurio Registry ${VERSION} into ${DIST} (Maven) ..."
  local tmp log="${DIST}/install.log" tarball
  tmp="$(mktemp -d "${DIST}/fetch.tmp.XXXXXX")"
  if ! mvn -B -q -f "${POM}" -Dapicurio.version="${VERSION}" \
    dependency:copy -DoutputDirectory="${tmp}" >"${log}" 2>&1; then
    tail -n 40 "${log}" >&2 || true
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
  exec 8>&- 2>/dev/null || true
  say "installed $(find "${DIST}/lib" -name '*.jar' | wc -l) jars and $(basename "$(runner_jar)")"
}

# ---------------------------------------------------------------- instance layout

NAME="${DEFAULT_NAME}"
PORT=""
RUN_DIR=""
OPT_PORT=""
OPT_TIMEOUT="${START_TIMEOUT}"
OPT_KILL=0
OPT_LINES=40
OPT_FOLLOW=0

parse_common() {
  while (($# > 0)); do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift ;;
      --port) OPT_PORT="${2:?--port needs a value}"; shift ;;
      --timeout) OPT_TIMEOUT="${2:?--timeout needs a value}"; shift ;;
      --kill) OPT_KILL=1 ;;
      -n) OPT_LINES="${2:?-n needs a value}"; shift ;;
      -f) OPT_FOLLOW=1 ;;
      *) die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  [[ "${NAME}" =~ ^[A-Za-z0-9._-]+$ ]] || die "invalid --name '${NAME}' (letters, digits, . _ - only)"
  [[ -z "${OPT_PORT}" || "${OPT_PORT}" =~ ^[0-9]+$ ]] || die "invalid --port '${OPT_PORT}'"
  [[ "${OPT_TIMEOUT}" =~ ^[0-9]+$ ]] || die "invalid --timeout '${OPT_TIMEOUT}'"
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

pid_alive() {
  local state=""
  kill -0 "$1" 2>/dev/null || return 1
  if [[ -r "/proc/$1/stat" ]]; then
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
  fi
  [[ "${state}" != "Z" ]]
}

registry_pid() {
  # The PID of this instance's JVM when it is alive (and really is this instance), else nothing.
  local pid
  [[ -f "${RUN_DIR}/registry.pid" ]] || return 0
  pid="$(cat "${RUN_DIR}/registry.pid" 2>/dev/null || true)"
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 0
  pid_alive "${pid}" || return 0
  if [[ -r "/proc/${pid}/cmdline" ]]; then
    tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -qF -- "-Dmodelpulse.registry.dir=${RUN_DIR} " || return 0
  fi
  printf '%s\n' "${pid}"
}

answers() {
  # True when the Confluent API answers GET /subjects with 200.
  if command -v curl >/dev/null 2>&1; then
    curl -sf -m 2 -o /dev/null "$(url)/subjects"
  else
    python3 - "$(url)/subjects" <<'EOF' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
EOF
  fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- commands

cmd_start() {
  parse_common "$@"
  local pid java start log
  pid="$(registry_pid)"
  if [[ -n "${pid}" ]]; then
    wait_ready "${pid}"
    say "'${NAME}' already running (pid ${pid})"
    printf 'url=%s\n' "$(url)"
    return 0
  fi
  installed_ok || cmd_install
  java="$(java_bin)"
  if port_open "${PORT}"; then
    die "port ${PORT} is already in use (pick another with --port)"
  fi
  mkdir -p "${RUN_DIR}"
  printf 'NAME=%s\nPORT=%s\nVERSION=%s\n' "${NAME}" "${PORT}" "${VERSION}" >"${RUN_DIR}/registry.env"
  log="${RUN_DIR}/registry.log"
  : >"${log}"
  local -a heap extra
  read -r -a heap <<<"${HEAP_OPTS}"
  read -r -a extra <<<"${REGISTRY_OPTS:-}"
  say "starting '${NAME}' (Apicurio Registry ${VERSION}, port ${PORT}, run dir ${RUN_DIR})"
  # The marker property only lets registry_pid recognise this JVM; cwd is the run dir so the
  # registry's own files (if any) stay out of the repository.
  (
    cd "${RUN_DIR}"
    exec "${java}" "${heap[@]}" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
      "-Dmodelpulse.registry.dir=${RUN_DIR}" \
      -Dquarkus.http.host=127.0.0.1 "-Dquarkus.http.port=${PORT}" \
      -Dquarkus.log.console.color=false \
      -Dquarkus.http.access-log.enabled=false \
      "${extra[@]}" -jar "$(runner_jar)" </dev/null >>"${log}" 2>&1
  ) &
  pid=$!
  printf '%s\n' "${pid}" >"${RUN_DIR}/registry.pid"
  start="$(date +%s)"
  wait_ready "${pid}"
  say "'${NAME}' ready after $(($(date +%s) - start))s"
  printf 'url=%s\n' "$(url)"
}

wait_ready() {
  local pid="$1" deadline=$((SECONDS + OPT_TIMEOUT))
  while ((SECONDS < deadline)); do
    if ! pid_alive "${pid}"; then
      printf -- '----- last 40 lines of %s\n' "${RUN_DIR}/registry.log" >&2
      tail -n 40 "${RUN_DIR}/registry.log" >&2 || true
      die "the registry JVM (pid ${pid}) exited during start"
    fi
    answers && return 0
    sleep 0.3
  done
  printf -- '----- last 40 lines of %s\n' "${RUN_DIR}/registry.log" >&2
  tail -n 40 "${RUN_DIR}/registry.log" >&2 || true
  die "the registry did not answer on $(url) within ${OPT_TIMEOUT}s"
}

cmd_stop() {
  parse_common "$@"
  local pid deadline
  pid="$(registry_pid)"
  if [[ -z "${pid}" ]]; then
    say "'${NAME}' is not running"
    rm -f "${RUN_DIR}/registry.pid"
    return 0
  fi
  if ((OPT_KILL)); then
    kill -9 "${pid}" 2>/dev/null || true
  else
    kill -TERM "${pid}" 2>/dev/null || true
    deadline=$((SECONDS + STOP_TIMEOUT))
    while pid_alive "${pid}" && ((SECONDS < deadline)); do sleep 0.2; done
    if pid_alive "${pid}"; then
      say "'${NAME}' did not stop within ${STOP_TIMEOUT}s: SIGKILL"
      kill -9 "${pid}" 2>/dev/null || true
    fi
  fi
  deadline=$((SECONDS + 10))
  while pid_alive "${pid}" && ((SECONDS < deadline)); do sleep 0.1; done
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
  if ((OPT_FOLLOW)); then
    exec tail -n "${OPT_LINES}" -F "${f}"
  fi
  tail -n "${OPT_LINES}" "${f}"
}

main() {
  local cmd="${1:-}"
  (($# > 0)) && shift
  case "${cmd}" in
    install) cmd_install "$@" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    logs) cmd_logs "$@" ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command '${cmd}' (see --help)" ;;
  esac
}

main "$@"
