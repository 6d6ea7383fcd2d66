#!/usr/bin/env bash
# TPU pod slice: run the same command on every TPU VM worker; JAX finds the pod (TPU metadata)
# and jax.distributed initialises itself (btlm_jax/parallel/distributed.py).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [btlm_jax.main flags...]
#   launch/tpu_pod.sh my-v4-64 us-central2-b --config=configs/btlm.py:3b_8k \
#       --workdir=gs://bucket/runs/3b
#
# Env: PROJECT (gcloud project, optional), REPO_DIR (checkout on the workers, default
# ~/btlm_jax), PYTHON (default python3). The workdir should be a GCS path or a shared mount.
# Multislice (several slices over DCN): the data axis spans slices automatically
# (device.slice_index); set mesh.data to a multiple of the slice count.
set -eu
if [ $# -lt 2 ]; then sed -n '2,13p' "$0"; exit 2; fi
TPU=$1; ZONE=$2; shift 2
REPO_DIR=${REPO_DIR:-~/btlm_jax}
PY=${PYTHON:-python3}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all \
  --command="cd $REPO_DIR && BTLM_DISTRIBUTED=auto BTLM_HEARTBEAT_TIMEOUT=\${BTLM_HEARTBEAT_TIMEOUT:-60} $PY -m btlm_jax.main$ARGS"
