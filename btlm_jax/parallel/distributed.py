"""Multi-host start-up: ``jax.distributed.initialize`` driven by the environment.

- Explicit: ``BTLM_COORDINATOR=host:port BTLM_NUM_PROCESSES=N BTLM_PROCESS_ID=i``.
- SLURM (``srun``) and TPU pods: JAX detects the cluster itself when ``BTLM_DISTRIBUTED=auto``
  or when SLURM_NTASKS > 1 / a TPU pod environment is present.
- Otherwise (one process) nothing is done.

Bounded failure: every process sends heartbeats to the coordination service. If a process dies,
the coordinator marks it unhealthy after ``BTLM_HEARTBEAT_TIMEOUT`` seconds (default 60) and the
service makes every other process abort with an error naming the dead task (if the coordinator,
process 0, dies, the others abort at once). So a job never hangs in a collective waiting for a
peer that is gone; the launcher (srun, the TPU VM script, multiprocess_cpu.sh) sees a non-zero
exit. ``BTLM_SHUTDOWN_TIMEOUT`` (default 60) bounds the barrier at normal exit.
"""

from __future__ import annotations

import os

import jax


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be an integer number of seconds") from None
    if v <= 0:
        raise ValueError(f"{name}={raw!r}: must be > 0")
    return v


def timeouts() -> dict:
    return {
        "initialization_timeout": _int_env("BTLM_INIT_TIMEOUT", 300),
        "heartbeat_timeout_seconds": _int_env("BTLM_HEARTBEAT_TIMEOUT", 60),
        "shutdown_timeout_seconds": _int_env("BTLM_SHUTDOWN_TIMEOUT", 60),
    }


def maybe_initialize() -> bool:
    env = os.environ
    if env.get("BTLM_COORDINATOR"):
        try:
            n, i = int(env["BTLM_NUM_PROCESSES"]), int(env["BTLM_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ValueError(
                "BTLM_COORDINATOR is set, so BTLM_NUM_PROCESSES and BTLM_PROCESS_ID must be "
                "integers too") from None
        if not 0 <= i < n:
            raise ValueError(f"BTLM_PROCESS_ID={i} must be in [0, BTLM_NUM_PROCESSES={n})")
        jax.distributed.initialize(
            coordinator_address=env["BTLM_COORDINATOR"], num_processes=n, process_id=i,
            **timeouts())
        return True
    auto = env.get("BTLM_DISTRIBUTED", "").lower() == "auto"
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    tpu_pod = bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))
    if auto or slurm or tpu_pod:
        jax.distributed.initialize(**timeouts())
        return True
    return False
