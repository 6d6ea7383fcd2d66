#!/usr/bin/env bash
# One process on this machine, all its devices (CPU, one or more GPUs, or a single TPU VM).
#
#   launch/local.sh [btlm_jax.main flags...]
#   launch/local.sh --config=configs/btlm.py:tiny --workdir=runs/tiny
#   launch/local.sh --config=configs/btlm.py:3b_8k --workdir=runs/3b --config.mesh.fsdp=-1
#
# Env: PYTHON (default python). Rerun the same command to resume.
set -eu
PY=${PYTHON:-python}
exec "$PY" -m btlm_jax.main "$@"
