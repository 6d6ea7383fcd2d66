#!/usr/bin/env bash
# One process on this machine, all its devices (CPU, one or more GPUs, or a single TPU VM).
#
#   launch/local.sh [btlm-train flags...]
#   launch/local.sh --config=tiny --workdir=runs/tiny
#   launch/local.sh --config=3b_8k --workdir=runs/3b --config.mesh.fsdp=-1
#
# Python: $PYTHON, else the repository's .venv/bin/python, else python3 (launch/python.sh); it
# must import btlm_jax. Rerun the same command to resume. Exit status: btlm-train's (0 done,
# 2 user error, 75 preempted after saving a checkpoint: rerun to resume).
set -eu
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/launch/python.sh"
btlm_python "$REPO"
exec "$PY" -m btlm_jax.main "$@"
