# shellcheck shell=bash
# Process supervision shared by scripts/kafka.sh, scripts/prometheus.sh and scripts/registry.sh:
# messages, options, PID files, start in the background, wait until serving, stop, logs, locks.
# Sourced, never run. The caller sets SERVICE (the message prefix, e.g. "kafka") and defines
# usage() (printed by -h/--help) before it parses options.
#
# A service instance is a process in the background whose PID is in a PID file; whether that PID
# still is our process is checked against a marker in its command line (PIDs are reused).

say() { printf '%s: %s\n' "${SERVICE}" "$*"; }
warn() { printf '%s: %s\n' "${SERVICE}" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "${SERVICE}" "$*" >&2
  exit 1
}

abspath() {
  # Absolute form of a path that may not exist yet (the services run with another working dir).
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "${PWD}" "$1" ;;
  esac
}

service_java() {
  # service_java WHAT : the java to run WHAT with ($JAVA_HOME, else PATH).
  if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
    printf '%s\n' "${JAVA_HOME}/bin/java"
  else
    command -v java || die "java not found on PATH ($1 needs Java 17+; Debian: apt-get install openjdk-17-jre-headless)"
  fi
}

service_pom_property() {
  # service_pom_property POM NAME : the value of <NAME> in the pom (versions are pinned there).
  sed -n "s:.*<${2//./\\.}>\\([^<]*\\)</${2//./\\.}>.*:\\1:p" "$1" | head -n 1
}

# Where the repository, the run dirs (PID files, logs, data) and the download cache are.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RUN_ROOT="$(abspath "${MODELPULSE_RUN_DIR:-${REPO_ROOT}/.run}")"
CACHE_ROOT="$(abspath "${MODELPULSE_CACHE:-${HOME:-/tmp}/.cache/modelpulse}")"

# ---------------------------------------------------------------- options

service_opts_init() {
  # service_opts_init NAME TIMEOUT LINES : the defaults of the options service_parse_opt reads.
  OPT_NAME="$1"
  OPT_PORT=""
  OPT_TIMEOUT="$2"
  OPT_LINES="$3"
  OPT_FOLLOW=0
  OPT_KILL=0
}

service_parse_opt() {
  # service_parse_opt ARG... : parses the option at $1 (with its value) into OPT_NAME, OPT_PORT,
  # OPT_TIMEOUT, OPT_LINES, OPT_FOLLOW, OPT_KILL and sets SERVICE_SHIFT to the words it took;
  # an unknown option is an error. Callers handle their own options first.
  SERVICE_SHIFT=1
  case "$1" in
    --name | --port | --timeout | -n | --lines)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      SERVICE_SHIFT=2
      ;;
  esac
  case "$1" in
    --name) OPT_NAME="$2" ;;
    --name=*) OPT_NAME="${1#*=}" ;;
    --port) OPT_PORT="$2" ;;
    --port=*) OPT_PORT="${1#*=}" ;;
    --timeout) OPT_TIMEOUT="$2" ;;
    --timeout=*) OPT_TIMEOUT="${1#*=}" ;;
    -n | --lines) OPT_LINES="$2" ;;
    -f | --follow) OPT_FOLLOW=1 ;;
    --kill) OPT_KILL=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
}

service_check_opts() {
  # Validates what service_parse_opt read; OPT_NAME names a run dir, so it is kept plain.
  [[ "${OPT_NAME}" =~ ^[A-Za-z0-9._-]+$ ]] || die "invalid --name '${OPT_NAME}' (letters, digits, . _ - only)"
  [[ -z "${OPT_PORT}" || "${OPT_PORT}" =~ ^[0-9]+$ ]] || die "--port must be a number"
  [[ "${OPT_TIMEOUT}" =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds"
  [[ "${OPT_LINES}" =~ ^[0-9]+$ ]] || die "-n must be a number"
}

# ---------------------------------------------------------------- processes

service_pid_alive() {
  # True when process $1 exists and is not a zombie (a process killed with -9 may stay a zombie
  # for a while when nothing reaps it).
  local state=""
  kill -0 "$1" 2>/dev/null || return 1
  if [[ -r "/proc/$1/stat" ]]; then
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)"
  fi
  [[ "${state}" != "Z" ]]
}

service_pid() {
  # service_pid PIDFILE MARKER : prints the PID in PIDFILE when that process is alive and its
  # command line contains MARKER (so a reused PID is not taken for ours), else nothing.
  local pid
  [[ -f "$1" ]] || return 0
  pid="$(cat "$1" 2>/dev/null || true)"
  [[ "${pid}" =~ ^[0-9]+$ ]] || return 0
  service_pid_alive "${pid}" || return 0
  if [[ -r "/proc/${pid}/cmdline" ]]; then
    tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -qF -- "$2" || return 0
  fi
  printf '%s\n' "${pid}"
}

service_port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

service_http_get() {
  # service_http_get URL : the body on stdout; fails on a non-2xx answer or no connection.
  if command -v curl >/dev/null 2>&1; then
    curl -fs --max-time 3 "$1"
  else
    python3 - "$1" 2>/dev/null <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
    sys.stdout.write(r.read().decode())
EOF
  fi
}

service_start() {
  # service_start PIDFILE LOG DIR CMD... : runs CMD in the background in DIR with stdout and
  # stderr to LOG (the previous LOG kept as LOG.1), writes its PID to PIDFILE and SERVICE_PID.
  # No wait. The child closes fds 8 and 9 (this script's locks) so they end with the script.
  local pidfile="$1" log="$2" dir="$3"
  shift 3
  if [[ -s "${log}" ]]; then
    mv -f "${log}" "${log}.1"
  fi
  (
    cd "${dir}"
    exec 8>&- 9>&-
    exec nohup "$@" >"${log}" 2>&1 </dev/null
  ) &
  SERVICE_PID="$!"
  printf '%s\n' "${SERVICE_PID}" >"${pidfile}"
}

service_wait() {
  # service_wait TIMEOUT "PID..." CMD... : runs CMD every 0.25s until it succeeds (0), one of
  # the PIDs is gone (2, SERVICE_DEAD_PID names it) or TIMEOUT seconds passed (1); CMD runs at
  # least once. SERVICE_WAITED: the seconds it took.
  local timeout="$1" pids="$2" start pid
  shift 2
  start="$(date +%s)"
  while :; do
    for pid in ${pids}; do
      if ! service_pid_alive "${pid}"; then
        SERVICE_DEAD_PID="${pid}"
        return 2
      fi
    done
    if "$@"; then
      break
    fi
    (($(date +%s) - start < timeout)) || return 1
    sleep 0.25
  done
  SERVICE_WAITED=$(($(date +%s) - start))
}

service_wait_ready() {
  # service_wait_ready TIMEOUT PID LOG DIED LATE CMD... : service_wait for one process; when it
  # exits or is not ready in time, shows the end of LOG and dies with DIED or LATE.
  local timeout="$1" pid="$2" log="$3" died="$4" late="$5" rc=0
  shift 5
  service_wait "${timeout}" "${pid}" "$@" || rc=$?
  ((rc == 0)) && return 0
  service_show_log "${log}"
  ((rc == 2)) && die "${died}"
  die "${late}"
}

service_stop() {
  # service_stop TIMEOUT KILL(0|1) PID... : SIGTERM (KILL=1: SIGKILL), wait up to TIMEOUT
  # seconds, then SIGKILL; returns once the processes are gone (or 10s after the SIGKILL).
  local timeout="$1" kill_now="$2" pid
  shift 2
  (($# > 0)) || return 0
  if ((kill_now)); then
    kill -KILL "$@" 2>/dev/null || true
  else
    kill -TERM "$@" 2>/dev/null || true
  fi
  if ! service_wait "${timeout}" "" service_all_gone "$@"; then
    local -a alive=()
    for pid in "$@"; do
      service_pid_alive "${pid}" && alive+=("${pid}")
    done
    warn "pid(s) ${alive[*]} still alive after ${timeout}s, sending SIGKILL"
    kill -KILL "${alive[@]}" 2>/dev/null || true
    service_wait 10 "" service_all_gone "$@" || warn "pid(s) ${alive[*]} still alive after SIGKILL"
  fi
}

service_all_gone() {
  local pid
  for pid in "$@"; do
    ! service_pid_alive "${pid}" || return 1
  done
}

# ---------------------------------------------------------------- logs and locks

service_show_log() {
  # service_show_log FILE [OFFSET] : to stderr, the last 40 lines FILE got after byte OFFSET
  # (what this launch wrote; 0 when the file was rotated since).
  local f="$1" offset="${2:-0}" size
  [[ -f "${f}" ]] || return 0
  size="$(wc -c <"${f}" | tr -d ' ')"
  ((size >= offset)) || offset=0
  printf -- '----- last 40 lines of %s\n' "${f}" >&2
  tail -c "+$((offset + 1))" "${f}" | tail -n 40 >&2 || true
}

service_logs() {
  # service_logs FILE... : tail OPT_LINES lines of the files; OPT_FOLLOW: follow them.
  if ((OPT_FOLLOW)); then
    exec tail -n "${OPT_LINES}" -F "$@"
  fi
  tail -n "${OPT_LINES}" "$@"
}

service_lock() {
  # service_lock FD FILE SECONDS MESSAGE : holds an exclusive flock on FILE through fd FD (8 or
  # 9; released when this script exits) so concurrent callers take turns; dies with MESSAGE
  # after SECONDS. Without flock there is no lock.
  command -v flock >/dev/null 2>&1 || return 0
  mkdir -p "$(dirname "$2")"
  case "$1" in
    8) exec 8>"$2" ;;
    9) exec 9>"$2" ;;
    *) die "service_lock: fd $1 is neither 8 nor 9" ;;
  esac
  flock -w "$3" "$1" || die "$4"
}

service_install() {
  # service_install WHAT DIR INSTALLED FETCH [WHERE] : runs the function FETCH (which fills DIR,
  # or WHERE inside it, with Maven) unless the function INSTALLED says it is done; parallel
  # installs (CI jobs) wait for the first one and reuse what it fetched.
  local what="$1" dir="$2" installed="$3" fetch="$4" where="${5:-$2}"
  if "${installed}"; then
    say "${what} already installed in ${where}"
    return 0
  fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Debian: apt-get install maven); needed once to fetch ${what}"
  mkdir -p "${dir}"
  service_lock 8 "${dir}/.install.lock" 600 "another install of ${what} is still running (lock ${dir}/.install.lock)"
  if "${installed}"; then
    exec 8>&-
    say "${what} already installed in ${where}"
    return 0
  fi
  say "installing ${what} into ${where} (Maven) ..."
  "${fetch}"
  exec 8>&- 2>/dev/null || true
}

service_main() {
  # service_main COMMAND [ARGS...] : runs the function cmd_COMMAND (dashes as underscores).
  local cmd="${1:-}"
  (($# > 0)) && shift
  case "${cmd}" in
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *)
      [[ "${cmd}" =~ ^[a-z][a-z-]*$ ]] && declare -F "cmd_${cmd//-/_}" >/dev/null \
        || die "unknown command '${cmd}' (see --help)"
      "cmd_${cmd//-/_}" "$@"
      ;;
  esac
}

service_mvn() {
  # service_mvn LOG MVN_ARGS... : quiet Maven run with its output in LOG; on failure shows the
  # end of LOG and returns 1 (the caller cleans up and dies).
  local log="$1"
  shift
  if ! mvn -B -q "$@" >"${log}" 2>&1; then
    tail -n 40 "${log}" >&2 || true
    return 1
  fi
}
