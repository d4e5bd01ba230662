#!/usr/bin/env bash
# The device benchmark suite (see gpu_suite.py): bash benchmarks/gpu_suite.sh [--cpu] [--small] [--out DIR]
# PYTHON: the interpreter of the installed project (default: python on PATH).
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_suite.py" "$@"
