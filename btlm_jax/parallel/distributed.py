"""Multi-host start-up: ``jax.distributed.initialize`` driven by the environment.

- Explicit: ``BTLM_COORDINATOR=host:port BTLM_NUM_PROCESSES=N BTLM_PROCESS_ID=i``.
- SLURM (``srun``) and TPU pods: JAX detects the cluster itself when ``BTLM_DISTRIBUTED=auto``
  or when SLURM_NTASKS > 1 / a TPU pod environment is present.
- Otherwise (one process) nothing is done.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> bool:
    env = os.environ
    if env.get("BTLM_COORDINATOR"):
        try:
            n, i = int(env["BTLM_NUM_PROCESSES"]), int(env["BTLM_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ValueError(
                "BTLM_COORDINATOR is set, so BTLM_NUM_PROCESSES and BTLM_PROCESS_ID must be "
                "integers too") from None
        jax.distributed.initialize(
            coordinator_address=env["BTLM_COORDINATOR"], num_processes=n, process_id=i,
            initialization_timeout=int(env.get("BTLM_INIT_TIMEOUT", "300")))
        return True
    auto = env.get("BTLM_DISTRIBUTED", "").lower() == "auto"
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    tpu_pod = bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if auto or slurm or tpu_pod:
        jax.distributed.initialize()
        return True
    return False
