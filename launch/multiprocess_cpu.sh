#!/usr/bin/env bash
# Several JAX processes on this machine, each with its own fake CPU devices, joined by
# jax.distributed on localhost: the multi-host code path without a cluster (for testing).
#
#   launch/multiprocess_cpu.sh NUM_PROCESSES DEVICES_PER_PROCESS [btlm-train flags...]
#   launch/multiprocess_cpu.sh 2 4 --config=tiny --workdir=runs/mp
#
# Env: PYTHON (default: the repository's .venv/bin/python, else python3; launch/python.sh),
# BTLM_PORT (coordinator port, default random), BTLM_MODULE (default btlm_jax.main),
# BTLM_HEARTBEAT_TIMEOUT (seconds before a dead process is noticed; see
# btlm_jax/parallel/distributed.py). Output lines are prefixed with [pI].
# SIGTERM/SIGINT to this script are forwarded to every process (they agree on a step, save a
# checkpoint there and exit 75, "preempted: rerun to resume"). Exit status: 0 if every process
# succeeded, else the first non-zero status (75 after a preemption).
set -u
if [ $# -lt 2 ]; then
  sed -n '2,14p' "$0"; exit 2
fi
N=$1; D=$2; shift 2
REPO=$(cd "$(dirname "$0")/.." && pwd)
. "$REPO/launch/python.sh"
btlm_python "$REPO"
PORT=${BTLM_PORT:-$((20000 + RANDOM % 20000))}
MODULE=${BTLM_MODULE:-btlm_jax.main}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D ${XLA_FLAGS:-}" JAX_PLATFORMS=cpu \
  BTLM_COORDINATOR="localhost:$PORT" BTLM_NUM_PROCESSES=$N BTLM_PROCESS_ID=$i \
    "$PY" -u -m "$MODULE" "$@" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
trap 'kill -INT "${pids[@]}" 2>/dev/null' INT
rc=0
for p in "${pids[@]}"; do
  # a trapped signal interrupts `wait` (status > 128) while the process still runs: wait again
  while :; do
    wait "$p"; s=$?
    if [ $s -le 128 ] || ! kill -0 "$p" 2>/dev/null; then break; fi
  done
  if [ $s -ne 0 ] && [ $rc -eq 0 ]; then rc=$s; fi
done
exit $rc
