"""The optimizer: schedules, AdamW (Optax and EMA-of-updates forms), muP groups, timescales.

``build(cfg, total_steps)`` is what the train loop calls; ``group_metrics(opt_state, step)`` gives
the per-group LR, ``tau_iter / T`` and ``c_{t,0}`` to log.
"""

from __future__ import annotations

import optax

from btlm_jax.optim.adamw import (TimescaleState, adamw, adamw_ema, ema_weight_update,
                                  group_metrics, timescale_state)
from btlm_jax.optim.groups import (MUP_RULES, GroupRules, ParamGroup, mup_groups,
                                   width_multipliers)
from btlm_jax.optim.schedules import SCHEDULES, schedule
from btlm_jax.optim.timescales import (ema_coefficients, power_lines_tau, tau_iter, tau_over_T,
                                       weight_decay_for_tau)

__all__ = [
    "SCHEDULES", "MUP_RULES", "GroupRules", "ParamGroup", "TimescaleState", "adamw", "adamw_ema",
    "build", "build_schedule", "ema_coefficients", "ema_weight_update", "group_metrics",
    "mup_groups", "power_lines_tau", "schedule", "tau_iter", "tau_over_T", "timescale_state",
    "weight_decay_for_tau", "width_multipliers",
]

_OPTIMIZERS = {"adamw": adamw, "adamw_ema": adamw_ema}


def build_schedule(cfg, total_steps: int):
    """The LR schedule named by ``cfg.optim.schedule`` (errors name the ``optim.*`` key)."""
    o = cfg.optim
    try:
        return schedule(
            o.schedule, peak_lr=o.peak_lr, total_steps=total_steps,
            warmup_steps=o.warmup_steps, decay_ratio=o.decay_ratio, final_lr=o.final_lr,
            cooldown_fraction=o.cooldown_fraction, step_fractions=tuple(o.step_fractions),
            step_factor=o.step_factor)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("total_steps"):
            raise ValueError(msg) from None
        raise ValueError(f"optim.{msg}") from None


def build(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, lr_schedule)`` from the full config: global-norm clipping (``optim.grad_clip``,
    0 disables), then AdamW (``optim.name``) with the muP parameter groups of ``model.mup``."""
    o = cfg.optim
    if o.name not in _OPTIMIZERS:
        raise ValueError(f"optim.name={o.name!r}: must be one of {', '.join(_OPTIMIZERS)}")
    if o.grad_clip < 0:
        raise ValueError(f"optim.grad_clip={o.grad_clip}: must be >= 0 (0 disables clipping)")
    if o.weight_decay < 0:
        raise ValueError(f"optim.weight_decay={o.weight_decay}: must be >= 0")
    lr = build_schedule(cfg, total_steps)
    opt = _OPTIMIZERS[o.name](
        lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
        groups=mup_groups(cfg), independent_weight_decay=bool(o.independent_weight_decay),
        peak_lr=float(o.peak_lr), total_steps=int(total_steps))
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    return optax.chain(*parts, opt), lr
