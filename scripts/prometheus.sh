#!/usr/bin/env bash
# Local Prometheus for modelpulse development and tests (no systemd, no Docker).
# Run `scripts/prometheus.sh --help` for the full description.
set -euo pipefail

SERVICE=prometheus
# shellcheck source=scripts/lib/service.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/service.sh"
DEFAULT_CONFIG="${REPO_ROOT}/prometheus/prometheus.yml"
DEFAULT_PORT=9090
DEFAULT_NAME="default"
START_TIMEOUT="${PROMETHEUS_START_TIMEOUT:-60}"
STOP_TIMEOUT="${PROMETHEUS_STOP_TIMEOUT:-30}"

usage() {
  cat <<EOF
Usage: scripts/prometheus.sh COMMAND [OPTIONS]

Commands:
  install
      Install Prometheus with apt-get (Debian package 'prometheus') when 'prometheus' is not on
      PATH. Runs 'apt-get update' only when the package is unknown to apt. Makes sure the
      package's own service is not left running (no systemd/init service is used).

  start [--config FILE] [--port PORT] [--name NAME] [--timeout SECONDS]
      Run prometheus in the background and wait for /-/ready (default timeout ${START_TIMEOUT}s):
        prometheus --config.file=FILE --web.listen-address=127.0.0.1:PORT
                   --storage.tsdb.path=<run dir>/data --web.enable-lifecycle
      Defaults: --config prometheus/prometheus.yml (created with a minimal content when
      missing), --port ${DEFAULT_PORT}, --name ${DEFAULT_NAME}. Already running: says so, returns 0.
      Prints 'url=http://127.0.0.1:PORT' on its own line at the end.

  stop [--name NAME] [--kill]
      SIGTERM, wait up to ${STOP_TIMEOUT}s, then SIGKILL (--kill: SIGKILL at once).

  status [--name NAME]     exit 0 when running and ready, 3 otherwise
  reload [--name NAME]     re-read the config (POST /-/reload)
  logs [--name NAME] [-n LINES] [-f]
  clean [--name NAME]      stop and delete the run dir (TSDB data included)

Files: \${MODELPULSE_RUN_DIR:-<repo>/.run}/prometheus-NAME/
         data/            TSDB (--storage.tsdb.path)
         prometheus.log   stdout/stderr
         prometheus.pid   PID file
         port, config     what it was started with
EOF
}

# ---------------------------------------------------------------- install

as_root() {
  if [[ "$(id -u)" -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

prometheus_pids() {
  if command -v pgrep >/dev/null 2>&1; then
    pgrep -x prometheus 2>/dev/null || true
  else
    local d
    for d in /proc/[0-9]*; do
      [[ "$(cat "${d}/comm" 2>/dev/null || true)" == "prometheus" ]] && printf '%s\n' "${d#/proc/}"
    done
    return 0
  fi
}

stop_package_service() {
  # stop_package_service PIDS_BEFORE: the package's postinst may start its own daemon (init
  # script, :9090) where services are allowed to start. Stop it: we run our own instances.
  local before=" $1 " pid
  if [[ -x /etc/init.d/prometheus ]]; then
    as_root /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  fi
  for pid in $(prometheus_pids); do
    if [[ "${before}" != *" ${pid} "* ]]; then
      warn "stopping the prometheus daemon started by the package (pid ${pid})"
      as_root kill "${pid}" 2>/dev/null || true
    fi
  done
}

cmd_install() {
  [[ $# -eq 0 ]] || die "install takes no options"
  if command -v prometheus >/dev/null 2>&1; then
    say "already installed: $(prometheus --version 2>&1 | head -n 1)"
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 || die "prometheus is not on PATH and there is no apt-get; install Prometheus 2.x by hand"
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    say "apt-get update ..."
    as_root apt-get update -qq >/dev/null || die "apt-get update failed"
  fi
  # Keep the package from starting its service where no policy says otherwise (restored after).
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e "${policy}" ]]; then
    printf '#!/bin/sh\n# temporary, by modelpulse scripts/prometheus.sh install\nexit 101\n' | as_root tee "${policy}" >/dev/null
    as_root chmod 755 "${policy}"
    created_policy=1
  fi
  say "apt-get install prometheus ..."
  local rc=0 before
  before="$(prometheus_pids | tr '\n' ' ')"
  local apt_log
  apt_log="$(mktemp)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >"${apt_log}" 2>&1 || rc=$?
  if ((created_policy)); then
    as_root rm -f "${policy}"
  fi
  if ((rc != 0)); then
    tail -n 40 "${apt_log}" >&2 || true
    rm -f "${apt_log}"
    die "apt-get install prometheus failed (exit ${rc}, output above)"
  fi
  rm -f "${apt_log}"
  stop_package_service "${before}"
  command -v prometheus >/dev/null 2>&1 || die "prometheus installed but not on PATH"
  say "installed: $(prometheus --version 2>&1 | head -n 1)"
}

# ---------------------------------------------------------------- instances

NAME="${DEFAULT_NAME}"
INST_DIR=""

inst_pid() {
  # PID of this instance when alive (and really a prometheus on this run dir), else nothing.
  service_pid "${INST_DIR}/prometheus.pid" "--storage.tsdb.path=${INST_DIR}/data"
}

inst_port() {
  cat "${INST_DIR}/port" 2>/dev/null || printf '%s\n' "${DEFAULT_PORT}"
}

http_post() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 10 -X POST "$1"
  else
    python3 - "$1" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(urllib.request.Request(sys.argv[1], data=b"", method="POST"), timeout=10) as r:
    sys.stdout.write(r.read().decode())
EOF
  fi
}

ensure_default_config() {
  # Minimal config, only when the repo has none yet (other files extend it).
  [[ -f "${DEFAULT_CONFIG}" ]] && return 0
  mkdir -p "$(dirname "${DEFAULT_CONFIG}")"
  cat >"${DEFAULT_CONFIG}" <<'EOF'
# Prometheus configuration for local modelpulse runs (scripts/prometheus.sh start).
global:
  scrape_interval: 5s
  evaluation_interval: 5s

scrape_configs:
  - job_name: prometheus
    static_configs:
      - targets: ["127.0.0.1:9090"]
EOF
  say "wrote a minimal ${DEFAULT_CONFIG}"
}

parse_opts() {
  service_opts_init "${DEFAULT_NAME}" "${START_TIMEOUT}" 100
  OPT_CONFIG=""
  while (($# > 0)); do
    case "$1" in
      --config) OPT_CONFIG="${2:?--config needs a value}"; shift 2 ;;
      --config=*) OPT_CONFIG="${1#*=}"; shift ;;
      *) service_parse_opt "$@"; shift "${SERVICE_SHIFT}" ;;
    esac
  done
  service_check_opts
  NAME="${OPT_NAME}"
  INST_DIR="${RUN_ROOT}/prometheus-${NAME}"
}

wait_ready() {
  # wait_ready PID PORT TIMEOUT
  service_wait_ready "$3" "$1" "${INST_DIR}/prometheus.log" \
    "prometheus '${NAME}' exited during startup (last log lines above)" \
    "prometheus '${NAME}' not ready on port $2 within $3s (still running; last log lines above)" \
    ready "$2"
}

ready() { service_http_get "http://127.0.0.1:$1/-/ready" >/dev/null; }

cmd_start() {
  parse_opts "$@"
  local pid port config
  pid="$(inst_pid)"
  if [[ -n "${pid}" ]]; then
    port="$(inst_port)"
    if [[ -n "${OPT_PORT}" && "${OPT_PORT}" != "${port}" ]]; then
      die "prometheus '${NAME}' already runs on port ${port} (pid ${pid}); stop it first"
    fi
    wait_ready "${pid}" "${port}" "${OPT_TIMEOUT}"
    say "'${NAME}' already running (pid ${pid})"
    printf 'url=http://127.0.0.1:%s\n' "${port}"
    return 0
  fi
  command -v prometheus >/dev/null 2>&1 || die "prometheus not found; run scripts/prometheus.sh install (or scripts/setup.sh)"
  port="${OPT_PORT:-${DEFAULT_PORT}}"
  if [[ -n "${OPT_CONFIG}" ]]; then
    config="$(cd "$(dirname "${OPT_CONFIG}")" 2>/dev/null && pwd)/$(basename "${OPT_CONFIG}")" ||
      die "config ${OPT_CONFIG} not found"
  else
    ensure_default_config
    config="${DEFAULT_CONFIG}"
  fi
  [[ -f "${config}" ]] || die "config ${config} not found"
  if service_port_open "${port}"; then
    die "port ${port} is already in use by another process (use --port)"
  fi
  mkdir -p "${INST_DIR}/data"
  printf '%s\n' "${port}" >"${INST_DIR}/port"
  printf '%s\n' "${config}" >"${INST_DIR}/config"
  service_start "${INST_DIR}/prometheus.pid" "${INST_DIR}/prometheus.log" "${INST_DIR}" \
    prometheus \
    --config.file="${config}" \
    --web.listen-address="127.0.0.1:${port}" \
    --storage.tsdb.path="${INST_DIR}/data" \
    --web.enable-lifecycle
  pid="${SERVICE_PID}"
  say "'${NAME}' launched (pid ${pid}, config ${config})"
  wait_ready "${pid}" "${port}" "${OPT_TIMEOUT}"
  say "'${NAME}' ready after ${SERVICE_WAITED}s"
  printf 'url=http://127.0.0.1:%s\n' "${port}"
}

cmd_stop() {
  parse_opts "$@"
  local pid
  pid="$(inst_pid)"
  if [[ -z "${pid}" ]]; then
    say "'${NAME}': not running"
    rm -f "${INST_DIR}/prometheus.pid"
    return 0
  fi
  local how=SIGTERM
  ((OPT_KILL)) && how=SIGKILL
  say "'${NAME}': stopping pid ${pid} with ${how}"
  service_stop "${STOP_TIMEOUT}" "${OPT_KILL}" "${pid}"
  rm -f "${INST_DIR}/prometheus.pid"
}

cmd_status() {
  parse_opts "$@"
  local pid port
  pid="$(inst_pid)"
  port="$(inst_port)"
  if [[ -z "${pid}" ]]; then
    say "'${NAME}': stopped"
    return 3
  fi
  if ready "${port}"; then
    say "'${NAME}': running (pid ${pid}) on 127.0.0.1:${port}, config $(cat "${INST_DIR}/config" 2>/dev/null || printf '?')"
    printf 'url=http://127.0.0.1:%s\n' "${port}"
    return 0
  fi
  say "'${NAME}': starting / not ready (pid ${pid}) on 127.0.0.1:${port}"
  return 3
}

cmd_reload() {
  parse_opts "$@"
  [[ -n "$(inst_pid)" ]] || die "prometheus '${NAME}' is not running"
  http_post "http://127.0.0.1:$(inst_port)/-/reload" >/dev/null || die "reload failed (see scripts/prometheus.sh logs)"
  say "'${NAME}': configuration reloaded"
}

cmd_logs() {
  parse_opts "$@"
  [[ -f "${INST_DIR}/prometheus.log" ]] || die "no log yet for '${NAME}'"
  service_logs "${INST_DIR}/prometheus.log"
}

cmd_clean() {
  parse_opts "$@"
  local -a args=(--name "${NAME}")
  ((OPT_KILL)) && args+=(--kill)
  cmd_stop "${args[@]}"
  if [[ -d "${INST_DIR}" ]]; then
    rm -rf "${INST_DIR}"
    say "removed ${INST_DIR}"
  fi
}

service_main "$@"
