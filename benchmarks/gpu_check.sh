#!/usr/bin/env bash
# Attention and step-speed checks that need a GPU (see benchmarks/gpu_check.py for the cases).
#   bash benchmarks/gpu_check.sh              # on one GPU (< 8 min on an H200): agreement,
#                                             # Triton lowering, attention throughput, the 1.3B
#                                             # (padded / unpadded) and 3b_8k steps, then the
#                                             # goals of issue 26 beside their anchors
#   bash benchmarks/gpu_check.sh --only=ab    # the train-step A/B list (~4 min on an H200)
#   bash benchmarks/gpu_check.sh --dry-run    # on CPU: every case compiled at tiny size
# Paste the output with its date into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || command -v "$PY" >/dev/null || PY=python
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout "${GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
