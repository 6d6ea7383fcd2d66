"""train (or resume) a model.

    btlm-train --config=tiny --workdir=runs/tiny                 (= python -m btlm_jax.main ...)
    btlm-train --config=3b_8k --workdir=/shared/runs/3b --config.mesh.fsdp=-1
    python -m btlm_jax.main --config=configs/btlm.py:tiny --workdir=runs/tiny   (in the repository)

Rerunning the same command on the same workdir resumes from the latest checkpoint. SIGTERM (or
Ctrl-C) saves a checkpoint at the next step, prints `preempted at step N ...: saved checkpoint
RUN/checkpoints/N; resume with: COMMAND` and exits with status 75 (EX_TEMPFAIL, "try again":
requeue the job; launch/slurm_gpu.sbatch does). A finished run prints `done: step=...` and exits 0.
"""

from __future__ import annotations

import os
import shlex
import sys

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app, start
from btlm_jax.cli.overrides import define_config_flag

with errors.cli():  # a misspelt --config.KEY override fails here, while the flag is defined
    # the one --config flag definition (sweeps parse their cells with it too)
    _CONFIG = define_config_flag()
errors.define_verbose_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")


def resume_command(argv: list[str]) -> str:
    """The command line that resumes this run (the same one)."""
    prog = os.path.basename(argv[0])
    head = ["python", "-m", "btlm_jax.main"] if prog in ("main.py", "__main__.py") else [prog]
    return shlex.join(head + list(argv[1:]))


def ending(result: dict, workdir: str, total_steps: int, argv: list[str]) -> tuple[str, int]:
    """The run's last line and exit status: ``done: ...`` (0), or for a preempted run the step,
    the checkpoint it saved there and the command that resumes it (EXIT_PREEMPTED)."""
    if result.get("preempted"):
        step = result["step"]
        ckpt = os.path.join(workdir, "checkpoints", str(step))
        return (f"preempted at step {step} of {total_steps}: saved checkpoint {ckpt}; resume "
                f"with: {resume_command(argv)}", errors.EXIT_PREEMPTED)
    keys = [k for k in ("step", "loss", "eval_loss", "tokens_per_sec") if k in result]
    return "done: " + ", ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float)
                                else f"{k}={result[k]}" for k in keys), 0


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv)
    from btlm_jax.config import parse_phases
    from btlm_jax.train.loop import train

    result = train(_CONFIG.value, _WORKDIR.value)
    total = sum(p[2] for p in parse_phases(_CONFIG.value))
    line, status = ending(result, _WORKDIR.value, total, sys.argv)
    print(line, flush=True)
    if status:
        sys.exit(status)


def run():
    run_app(main, "workdir", prog="btlm-train")


if __name__ == "__main__":
    run()
