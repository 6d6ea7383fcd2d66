"""Load a run directory for evaluation or generation, reusing the training driver.

The run's own ``config.json`` is read back, a :class:`~btlm_jax.train.loop.Trainer` is built from
it (same tokenizer, mesh and parameter shardings as training) and the parameters of the latest
(or a chosen) checkpoint are restored onto those shardings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

from btlm_jax.config import ConfigError, default_config


class RunError(FileNotFoundError):
    """The directory is not a usable run directory; the message says what is missing."""


def _merge(dst: ml_collections.ConfigDict, src: dict, prefix: str = "") -> None:
    for k, v in src.items():
        if k not in dst:
            raise ConfigError(
                f"config.json key {prefix}{k} is not a known config key; the run was written by "
                "a different version of btlm_jax")
        if isinstance(v, dict) and isinstance(dst[k], ml_collections.ConfigDict):
            _merge(dst[k], v, f"{prefix}{k}.")
        else:
            if isinstance(dst[k], tuple) and isinstance(v, list):
                v = tuple(v)
            dst[k] = v


def load_workdir_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a run was trained with (``WORKDIR/config.json``) over the defaults."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise RunError(
            f"{path} does not exist: --workdir must be a run directory written by "
            "`python -m btlm_jax.main` or `python -m btlm_jax.convert import`")
    cfg = default_config()
    _merge(cfg, json.loads(path.read_text()))
    return cfg


@dataclass
class Run:
    cfg: ml_collections.ConfigDict
    trainer: Any  # btlm_jax.train.loop.Trainer
    params: Any  # restored, sharded like training
    step: int

    @property
    def model(self):
        return self.trainer.model

    @property
    def tokenizer(self):
        return self.trainer.tokenizer

    @property
    def mesh(self):
        return self.trainer.mesh


def load_run(workdir: str | Path, step: int | None = None) -> Run:
    """Restores the parameters of ``workdir``'s latest checkpoint (or ``step``)."""
    from btlm_jax.train.loop import Trainer

    cfg = load_workdir_config(workdir)
    trainer = Trainer(cfg, str(workdir))
    steps = trainer.ckpt.all_steps()
    if not steps:
        trainer.ckpt.close()
        raise RunError(
            f"{Path(workdir).absolute() / 'checkpoints'} holds no checkpoint: train first "
            "(python -m btlm_jax.main ...) or import one (python -m btlm_jax.convert import ...)")
    if step is None:
        step = max(steps)
    elif step not in steps:
        trainer.ckpt.close()
        raise RunError(f"no checkpoint for step {step} in {workdir}; available: {sorted(steps)}")
    state, _ = trainer.ckpt.restore(step, trainer.abstract_state)
    trainer.ckpt.close()
    return Run(cfg=trainer.cfg, trainer=trainer, params=state.params, step=int(step))
