#!/usr/bin/env bash
# The test command of README.md and CI (.ci/run calls exactly this).
#
# Installs whatever is missing (scripts/setup.sh: venv + pip, Kafka jars, Apicurio Registry,
# Prometheus), lints (ruff, mypy strict), then runs pytest against a real Kafka broker and
# schema registry that the test session starts itself (scripts/kafka.sh, scripts/registry.sh)
# unless KAFKA_BOOTSTRAP_SERVERS / SCHEMA_REGISTRY_URL are set.
#
#   scripts/test.sh                 everything, short fault/soak modes (CI)
#   scripts/test.sh --long          long soak and fault modes too
#   scripts/test.sh -k producer     any pytest arguments pass through
#   SKIP_LINT=1 scripts/test.sh     tests only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${ROOT}"

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

start=$(date +%s)
bash scripts/setup.sh

if [[ -z "${SKIP_LINT:-}" ]]; then
  echo "test: ruff check, ruff format --check, mypy --strict"
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  .venv/bin/mypy
fi

echo "test: pytest $*"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ ${rc} -eq 5 ]]; then
  echo "test: pytest collected no tests: that is a failure here" >&2
  rc=1
fi
echo "test: finished in $(($(date +%s) - start))s (exit ${rc})"
exit "${rc}"
