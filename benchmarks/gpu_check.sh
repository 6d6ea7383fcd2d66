#!/usr/bin/env bash
# Attention and step-speed checks that need a GPU (see benchmarks/gpu_check.py for the cases).
#   bash benchmarks/gpu_check.sh            # on one GPU (< 8 min on an H200); paste the output
#                                           # with its date into benchmarks/RESULTS.md
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU: every case compiled at tiny size
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
