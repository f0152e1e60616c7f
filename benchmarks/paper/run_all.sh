#!/usr/bin/env bash
# Run the whole small-scale reproduction (about 35-45 min on one free CPU core; each
# script prints a line per finished run with an ETA). Extra arguments go to every script,
# e.g. `bash benchmarks/paper/run_all.sh --device cuda --threads 4`.
set -euo pipefail
cd "$(dirname "$0")"
python mislabeled.py "$@"
python duplicates.py "$@"
python memorization.py "$@"
python cost.py "$@"
