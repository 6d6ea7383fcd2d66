"""Load a run directory for evaluation, generation or export, without writing to it.

The run's own ``config.json`` and pinned tokenizer are read back (:meth:`RunDir.open`), the
training :class:`~btlm_jax.train.program.Program` is built from that config (same mesh and
parameter shardings as training) and the parameters of the latest (or a chosen) checkpoint are
restored onto those shardings. Nothing is written, no corpus is built, no tokenizer trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

from btlm_jax.train.run_dir import RunDir, RunError, load_config_json

__all__ = ["Run", "RunError", "load_run", "load_workdir_config"]


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (``WORKDIR/config.json``) over the defaults."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise RunError(
            f"{path} does not exist: --workdir must be a run directory written by "
            "`python -m btlm_jax.main` or `python -m btlm_jax.convert import`")
    return load_config_json(path)


@dataclass
class Run:
    cfg: ml_collections.ConfigDict
    program: Any  # btlm_jax.train.program.Program
    params: Any  # restored, sharded like training
    step: int
    tokenizer: Any
    path: Path

    @property
    def model(self):
        return self.program.place.model

    @property
    def mesh(self):
        return self.program.mesh


def load_run(workdir: str | Path, step: int | None = None, devices=None) -> Run:
    """Restores the parameters of ``workdir``'s latest checkpoint (or ``step``)."""
    from btlm_jax.train.program import Program

    rd = RunDir.open(workdir)
    program = Program.from_config(rd.cfg, devices)
    ckpt = rd.checkpointer()
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise RunError(
                f"{rd.checkpoint_dir} holds no checkpoint: train first (python -m btlm_jax.main "
                "...) or import one (python -m btlm_jax.convert import ...)")
        if step is None:  # the newest readable one (a corrupt latest step is skipped, said)
            step, state, _ = ckpt.restore_latest(program.abstract_state)
        elif step not in steps:
            raise RunError(f"no checkpoint for step {step} in {workdir}; available: {sorted(steps)}")
        else:
            state, _ = ckpt.restore(step, program.abstract_state)
    finally:
        ckpt.close()
    return Run(cfg=rd.cfg, program=program, params=state.params, step=int(step),
               tokenizer=rd.tokenizer, path=rd.path)
