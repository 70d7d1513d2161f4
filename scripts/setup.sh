#!/usr/bin/env bash
# One-stop, idempotent installer for modelpulse development, the demo and CI:
#   1. checks Java >= 17 and Python >= 3.11 (installs them with apt-get on Debian as root when
#      missing),
#   2. creates .venv and runs `pip install -e '.[dev]'` when pyproject.toml changed since the
#      last successful install (hash stamp in .venv),
#   3. scripts/kafka.sh install       (Kafka jars via Maven, cached in ~/.cache/modelpulse),
#      scripts/registry.sh install    (Apicurio Registry via Maven, cached there too),
#   4. scripts/prometheus.sh install  (Debian package, no service left running),
#   5. kubeconform and kustomize (Kubernetes manifests: validate, build) from the Go module proxy.
# Takes a few seconds when everything is already there.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
VENV="${REPO_ROOT}/.venv"
STAMP="${VENV}/.modelpulse-install.sha256"
MIN_JAVA=17
KUBECONFORM_VERSION=v0.7.0
KUSTOMIZE_VERSION=v5.7.1
MIN_PY_MAJOR=3
MIN_PY_MINOR=11

usage() {
  cat <<EOF
Usage: scripts/setup.sh [--no-venv] [--no-kafka] [--no-registry] [--no-prometheus] [--force]

Idempotent installer for modelpulse (development, demo, CI). Steps:
  1. Java >= ${MIN_JAVA} and python3 >= ${MIN_PY_MAJOR}.${MIN_PY_MINOR} (on Debian as root, missing ones are installed with
     apt-get: openjdk-17-jre-headless, python3-venv, maven when needed).
  2. .venv in the repo root (created if missing); '.venv/bin/pip install -e .[dev]' runs only
     when pyproject.toml changed since the last successful install (stamp: ${STAMP#"${REPO_ROOT}"/}).
  3. scripts/kafka.sh install        Kafka jars (Maven, cached under \${MODELPULSE_CACHE:-~/.cache/modelpulse})
     scripts/registry.sh install     Apicurio Registry (Maven, cached there too), for tests/test_registry.py
  4. scripts/prometheus.sh install   Prometheus (apt-get), no daemon left running
  5. kubeconform ${KUBECONFORM_VERSION} and kustomize ${KUSTOMIZE_VERSION} (go install from the
     Go module proxy) into \${MODELPULSE_CACHE:-~/.cache/modelpulse}/bin, for tests/test_k8s.py

Options:
  --no-venv, --no-kafka, --no-registry, --no-prometheus, --no-k8s   skip that step
  --force                                  re-run pip install even when pyproject.toml is unchanged
Environment: PYTHON (interpreter used to create .venv, default python3).
EOF
}

say() { printf 'setup: %s\n' "$*"; }
die() {
  printf 'setup: error: %s\n' "$*" >&2
  exit 1
}

DO_VENV=1
DO_KAFKA=1
DO_REGISTRY=1
DO_PROMETHEUS=1
DO_K8S=1
FORCE=0
while (($# > 0)); do
  case "$1" in
    --no-venv) DO_VENV=0 ;;
    --no-kafka) DO_KAFKA=0 ;;
    --no-registry) DO_REGISTRY=0 ;;
    --no-prometheus) DO_PROMETHEUS=0 ;;
    --no-k8s) DO_K8S=0 ;;
    --force) FORCE=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

START_TS="$(date +%s)"

can_apt() {
  [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1
}

APT_UPDATED=0
apt_install() {
  # apt_install PKG... : quiet install; runs apt-get update first when the lists are empty,
  # and once more before a retry.
  can_apt || return 1
  local log
  log="$(mktemp)"
  if ((APT_UPDATED == 0)) && ! compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null; then
    say "apt-get update ..."
    apt-get update -qq >"${log}" 2>&1 || true
    APT_UPDATED=1
  fi
  say "apt-get install $* ..."
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >"${log}" 2>&1; then
    if ((APT_UPDATED == 0)); then
      say "apt-get update ..."
      apt-get update -qq >>"${log}" 2>&1 || true
      APT_UPDATED=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >>"${log}" 2>&1; then
      tail -n 30 "${log}" >&2 || true
      rm -f "${log}"
      return 1
    fi
  fi
  rm -f "${log}"
}

# ---------------------------------------------------------------- 1. java + python

java_cmd() {
  if [[ -n "${JAVA_HOME:-}" && -x "${JAVA_HOME}/bin/java" ]]; then
    printf '%s\n' "${JAVA_HOME}/bin/java"
  else
    command -v java || true
  fi
}

java_major() {
  # Prints the major version of the java given ("1.8.0_392" -> 8, "17.0.15" -> 17).
  local version major
  version="$("$1" -version 2>&1 | sed -n 's/.*version "\([^"]*\)".*/\1/p' | head -n 1)"
  major="${version%%.*}"
  if [[ "${major}" == "1" ]]; then
    major="$(printf '%s' "${version}" | cut -d. -f2)"
  fi
  printf '%s\n' "${major:-0}"
}

check_java() {
  local java major
  java="$(java_cmd)"
  if [[ -z "${java}" ]] || (($(java_major "${java}") < MIN_JAVA)); then
    if [[ -n "${java}" ]]; then
      say "java at ${java} is version $(java_major "${java}"), Kafka 4 needs ${MIN_JAVA}+"
    else
      say "java not found, Kafka 4 needs Java ${MIN_JAVA}+"
    fi
    if apt_install openjdk-17-jre-headless; then
      # A newer default java may exist but not be first on PATH; prefer the 17 we just installed.
      if [[ -x /usr/lib/jvm/java-17-openjdk-amd64/bin/java && -z "$(java_cmd)" ]]; then
        export PATH="/usr/lib/jvm/java-17-openjdk-amd64/bin:${PATH}"
      fi
    fi
    java="$(java_cmd)"
    if [[ -z "${java}" ]] || (($(java_major "${java}") < MIN_JAVA)); then
      die "Java ${MIN_JAVA}+ is required (Kafka 4.x brokers). Install it (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME to a JDK/JRE ${MIN_JAVA}+."
    fi
  fi
  major="$(java_major "${java}")"
  say "java ${major} ok (${java})"
}

python_cmd() {
  command -v "${PYTHON:-python3}" || true
}

python_ok() {
  "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] >= (${MIN_PY_MAJOR}, ${MIN_PY_MINOR}) else 1)" 2>/dev/null
}

check_python() {
  local py
  py="$(python_cmd)"
  [[ -n "${py}" || -z "${PYTHON:-}" ]] || die "PYTHON=${PYTHON} not found"
  if [[ -z "${py}" ]]; then
    say "python3 not found"
    apt_install python3 python3-venv || true
    py="$(python_cmd)"
  fi
  [[ -n "${py}" ]] || die "python3 >= ${MIN_PY_MAJOR}.${MIN_PY_MINOR} is required (Debian 12: apt-get install python3 python3-venv)"
  if ! python_ok "${py}"; then
    die "python3 >= ${MIN_PY_MAJOR}.${MIN_PY_MINOR} is required, ${py} is $("${py}" -c 'import platform; print(platform.python_version())' 2>/dev/null || printf '?') (set PYTHON=/path/to/python3.11+)"
  fi
  PY="${py}"
  say "python $("${PY}" -c 'import platform; print(platform.python_version())') ok (${PY})"
}

# ---------------------------------------------------------------- 2. venv

make_venv() {
  say "creating ${VENV} ..."
  if ! "${PY}" -m venv "${VENV}" >/dev/null 2>&1; then
    # Debian's python3 ships venv/ensurepip separately.
    rm -rf "${VENV}"
    apt_install python3-venv || true
    "${PY}" -m venv "${VENV}" || die "could not create ${VENV} with ${PY} -m venv (Debian: apt-get install python3-venv)"
  fi
}

setup_venv() {
  if [[ -x "${VENV}/bin/python" ]] && ! "${VENV}/bin/python" -c 'import sys' >/dev/null 2>&1; then
    say "${VENV} is broken (its python does not run); recreating it"
    rm -rf "${VENV}"
  fi
  if [[ ! -x "${VENV}/bin/python" ]]; then
    make_venv
  fi
  if ! "${VENV}/bin/python" -m pip --version >/dev/null 2>&1; then
    "${VENV}/bin/python" -m ensurepip --upgrade >/dev/null 2>&1 || die "${VENV} has no pip (recreate it: rm -rf .venv)"
  fi
  local pyproject="${REPO_ROOT}/pyproject.toml" want have=""
  if [[ ! -f "${pyproject}" ]]; then
    say "no pyproject.toml yet: skipping pip install"
    return 0
  fi
  want="$(cat "${pyproject}" <("${VENV}/bin/python" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"
  [[ -f "${STAMP}" ]] && have="$(cat "${STAMP}")"
  if ((FORCE == 0)) && [[ "${want}" == "${have}" ]]; then
    say "venv up to date (.venv, pyproject.toml unchanged)"
    return 0
  fi
  say "pip install -e '.[dev]' into .venv ..."
  rm -f "${STAMP}"
  local log="${VENV}/pip-install.log"
  if ! (
    cd "${REPO_ROOT}"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 "${VENV}/bin/pip" install -e '.[dev]'
  ) >"${log}" 2>&1; then
    tail -n 40 "${log}" >&2 || true
    die "pip install -e '.[dev]' failed (last lines above, full log: ${log})"
  fi
  printf '%s\n' "${want}" >"${STAMP}"
  say "venv ready"
}

# ---------------------------------------------------------------- 3. + 4.

setup_kafka() {
  if ! command -v mvn >/dev/null 2>&1; then
    # Only needed when the jars are not cached yet; kafka.sh install says when.
    if ! "${SCRIPT_DIR}/kafka.sh" install >/dev/null 2>&1; then
      say "maven not found (needed once to fetch the Kafka jars)"
      apt_install maven || die "Maven is required to fetch the Kafka jars (Debian: apt-get install maven)"
    fi
  fi
  "${SCRIPT_DIR}/kafka.sh" install | sed 's/^/setup: /'
}

setup_registry() {
  if ! command -v mvn >/dev/null 2>&1; then
    if ! "${SCRIPT_DIR}/registry.sh" install >/dev/null 2>&1; then
      say "maven not found (needed once to fetch Apicurio Registry)"
      apt_install maven || die "Maven is required to fetch Apicurio Registry (Debian: apt-get install maven)"
    fi
  fi
  "${SCRIPT_DIR}/registry.sh" install | sed 's/^/setup: /'
}

setup_prometheus() {
  "${SCRIPT_DIR}/prometheus.sh" install | sed 's/^/setup: /'
}

go_tool() {
  # go_tool NAME MODULE/CMD VERSION: built from source by the go command (the module proxy
  # is reachable where GitHub release downloads are not); a version stamp makes reruns free.
  local name="$1" pkg="$2" version="$3" cache bin stamp go log
  cache="${MODELPULSE_CACHE:-${HOME:-/tmp}/.cache/modelpulse}"
  bin="${cache}/bin"
  stamp="${bin}/.${name}-version"
  if [[ -x "${bin}/${name}" && "$(cat "${stamp}" 2>/dev/null)" == "${version}" ]]; then
    say "${name} ${version} ok (${bin}/${name})"
    return 0
  fi
  go="$(command -v go || true)"
  [[ -n "${go}" || ! -x /usr/local/go/bin/go ]] || go=/usr/local/go/bin/go
  if [[ -z "${go}" ]]; then
    apt_install golang-go || die "go is required to build ${name} (Debian: apt-get install golang-go)"
    go="$(command -v go)"
  fi
  say "go install ${name} ${version} ..."
  mkdir -p "${bin}"
  log="${bin}/${name}-install.log"
  if ! GOBIN="${bin}" GOFLAGS=-buildvcs=false "${go}" install "${pkg}@${version}" >"${log}" 2>&1; then
    tail -n 20 "${log}" >&2 || true
    die "could not build ${name} (full log: ${log})"
  fi
  printf '%s\n' "${version}" >"${stamp}"
  say "${name} ${version} installed in ${bin}"
}

setup_k8s_tools() {
  go_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "${KUBECONFORM_VERSION}"
  go_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "${KUSTOMIZE_VERSION}"
}

check_java
check_python
if ((DO_VENV)); then setup_venv; fi
if ((DO_KAFKA)); then setup_kafka; fi
if ((DO_REGISTRY)); then setup_registry; fi
if ((DO_PROMETHEUS)); then setup_prometheus; fi
if ((DO_K8S)); then setup_k8s_tools; fi
say "done in $(($(date +%s) - START_TS))s"
