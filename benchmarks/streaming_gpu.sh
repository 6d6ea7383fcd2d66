#!/usr/bin/env bash
# Weight streaming on one GPU (issue 27's figures): how far the overlapped streamed step is from
# the standard step and from the host link's limit, and which optimizer placement wins.
#
#   bash benchmarks/streaming_gpu.sh            # one GPU, < 8 min on an H200; paste the output
#                                               # with its date into benchmarks/RESULTS.md
#   bash benchmarks/streaming_gpu.sh --dry-run  # on CPU: the same commands at tiny size
#
# On the lent machine (../shared/gpu/README.md) the wheels the image lacks (ml-collections,
# zstandard, ...) travel in .whl (carry [".whl"]); they are installed into .site when present.
#
# Part 1, memory flat in depth: bench width, seq 512, batch 8, 4 and 16 layers, the standard
#   layout and the default streaming options (bar: device memory 4 -> 16 layers <= 1.5x; part 2
#   has the 32-layer rows).
# Part 2, the sweep at 32 layers: global batch 8, 32, 16; the standard layout; streaming without
#   overlap, with prefetch, with prefetch and gradient write-behind (device update), and with
#   write-behind and the update on the host CPU. Goals: streamed / standard <= 2.0 at batch 8
#   and <= 1.3 at batch 32, step within 1.2x of the printed bound; the break-even batch line;
#   --hlo shows whether the compiled loops issue their copies (copy-start) before the matmuls.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && [ ! -d .site ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target .site .whl/*.whl || exit 1
fi
[ -d .site ] && export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

if [ "${1:-}" = "--dry-run" ]; then
  COMMON=(--preset=tiny --seq_len=64 --fake_devices=2 --steps=1 --probe_mib=16)
  DEPTHS=2,4; SWEEP_DEPTH=4; BATCHES=4,8
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  COMMON=(--preset=bench --seq_len=512 --fake_devices=0 --steps=3 --probe_mib=1024
          --budget_mib=81920)
  DEPTHS=4,16; SWEEP_DEPTH=32; BATCHES=8,32,16  # the goals' batches first
fi
rc=0
PWB=prefetch_writeback
echo "== part 1: memory against depth (batch 8)"
timeout "${STREAMING_PART1_TIMEOUT:-100}" "$PY" benchmarks/streaming.py "${COMMON[@]}" \
  --depths="$DEPTHS" --batches=8 --variants=standard,prefetch/device || rc=$?
echo "== part 2: batch sweep at $SWEEP_DEPTH layers"
timeout "${STREAMING_PART2_TIMEOUT:-460}" "$PY" benchmarks/streaming.py "${COMMON[@]}" \
  --depths="$SWEEP_DEPTH" --batches="$BATCHES" --hlo \
  --variants="standard,none/device,prefetch/device,$PWB/device,$PWB/host" || rc=$?
exit $rc
