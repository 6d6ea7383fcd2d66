"""SLURM submission through ``submitit``: one job array per sweep, one array element per unfinished
task, with a time limit, an array throttle and requeue on timeout or preemption.

Each element runs :func:`btlm_jax.experiments.local.run_task` (a ``submitit`` checkpointable
callable): when SLURM signals a timeout or a preemption, submitit requeues the element and the
rerun resumes the run from its latest checkpoint. ``cluster="local"`` / ``"debug"`` run the same
jobs as local processes / in this process (tests, machines without SLURM).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments.grid import Task, check_unique, write_tasks
from btlm_jax.cli.overrides import SweepError

try:  # optional: the `slurm` extra
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover - reported by submit()
    submitit = None
    Checkpointable = object


class TaskJob(Checkpointable):
    """One array element: trains one task (resuming it). Requeued as-is on timeout/preemption."""

    def __init__(self, task: Task):
        self.task = task

    def __call__(self) -> dict:
        from absl import logging as absl_logging

        from btlm_jax.experiments.local import run_task

        absl_logging.set_verbosity(absl_logging.WARNING)
        return run_task(self.task)


def minutes(text: str) -> int:
    """A SLURM time limit (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``, ``D-HH``) in minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SweepError(f"--time={text!r}: expected MINUTES, HH:MM:SS or D-HH:MM:SS")
    d, a, b, c = (int(x) if x else None for x in m.groups())
    if d is None and b is None:  # plain minutes
        return a
    if d is not None and b is None:  # D-HH
        return d * 1440 + a * 60
    hours, mins, secs = (a, b, c or 0) if c is not None or d is not None else (0, a, b)
    return (d or 0) * 1440 + hours * 60 + mins + (1 if secs else 0)


def executor(out_dir: str | Path, *, cluster: str | None = None, job_name: str = "sweep",
             partition: str = "", time_limit: str = "04:00:00", cpus_per_task: int = 8,
             gpus_per_task: int = 0, max_parallel: int = 0, requeues: int = 3):
    """A ``submitit`` executor for a sweep, logs under ``OUT/slurm/``."""
    if submitit is None:
        raise SweepError("--slurm needs the submitit package: pip install 'btlm_jax[slurm]'")
    try:
        ex = submitit.AutoExecutor(folder=str(Path(out_dir) / "slurm" / "%j"), cluster=cluster,
                                   slurm_max_num_timeout=requeues)
    except RuntimeError as e:  # no srun/sbatch here
        raise SweepError(f"--slurm: {e} (--cluster local runs the array as local processes)")
    params = dict(name=job_name, timeout_min=minutes(time_limit), cpus_per_task=cpus_per_task,
                  tasks_per_node=1, nodes=1, slurm_signal_delay_s=120)
    if gpus_per_task:
        params["gpus_per_node"] = gpus_per_task
    if partition:
        params["slurm_partition"] = partition
    if max_parallel > 0:
        params["slurm_array_parallelism"] = max_parallel
    ex.update_parameters(**params)
    return ex


def submit(tasks: Sequence[Task], out_dir: str | Path, ex) -> list:
    """Writes ``OUT/tasks.jsonl`` and submits the unfinished tasks as one job array; returns the
    submitit jobs (empty: every task is finished)."""
    check_unique(tasks)
    write_tasks(tasks, Path(out_dir) / "tasks.jsonl")
    pending = [t for t in tasks if not t.finished()]
    if not pending:
        return []
    with ex.batch():
        jobs = [ex.submit(TaskJob(t)) for t in pending]
    return jobs
