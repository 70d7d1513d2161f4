#!/usr/bin/env bash
# The main job of README.md: install what is missing, then run the local stack
# (Kafka, aggregator shards, Prometheus, a simulated fleet) with a live summary.
#   scripts/demo.sh                      until Ctrl-C
#   scripts/demo.sh --duration 600 --rate 500 --models 8
#   scripts/demo.sh --help               every flag
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${1:-}" != "-h" && "${1:-}" != "--help" ]]; then
  bash scripts/setup.sh
fi
exec .venv/bin/python -m demo "$@"
