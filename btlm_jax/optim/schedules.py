"""Learning-rate schedules: linear warmup, then one of the decay shapes compared in the D2Z paper.

Every schedule is an Optax schedule ``step -> lr`` (jnp-traceable, so it runs inside ``jit``).
``step`` is Optax's update count: the update that turns ``theta_{t-1}`` into ``theta_t`` uses
``lr(t - 1)``. With ``W = warmup_steps`` and ``T = total_steps``:

- warmup: ``lr(s) = peak * s / W`` for ``s < W`` (so ``lr(W) = peak``);
- after warmup the progress ``p = (s - W) / (T - W)`` (clipped to [0, 1]) drives the decay:

====================  ==========================================================================
``constant``          ``peak``
``d2z``               linear to exactly 0 at ``T`` (decay-to-zero)
``linear``            linear to ``final_lr`` (``< 0``: ``peak / decay_ratio``); BTLM's schedule
``linear_10x``        linear to ``peak / decay_ratio`` (default ratio 10)
``cosine_10x``        cosine to ``peak / decay_ratio``
``cosine_d2z``        cosine to 0
``step``              ``peak * step_factor ** k``, k = number of ``step_fractions * T`` passed
``wsd``               constant, then linear to 0 over the last ``cooldown_fraction * T`` steps
``inv_sqrt``          ``peak * sqrt(max(W, 1) / max(s, W, 1))``
====================  ==========================================================================

Steps past ``T`` keep the end value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp

Schedule = Callable[[Any], Any]

# Options a schedule may receive, with their defaults (the same as btlm_jax.config's optim.*).
OPTION_DEFAULTS: dict[str, Any] = {
    "decay_ratio": 10.0,
    "final_lr": -1.0,
    "cooldown_fraction": 0.2,
    "step_fractions": (0.5, 0.75),
    "step_factor": 0.1,
}


def _check_positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}={value!r}: must be a positive finite number")
    return value


def _remaining(step, warmup_steps: int, total_steps: int):
    """Fraction of the decay still to go, ``1 - p`` (computed directly: no cancellation at T)."""
    span = max(total_steps - warmup_steps, 1)
    s = jnp.asarray(step, jnp.float32)
    return jnp.clip((total_steps - s) / span, 0.0, 1.0)


def _ratio_end(options) -> Callable[[float], float]:
    ratio = _check_positive_finite("decay_ratio", options["decay_ratio"])
    if ratio < 1:
        raise ValueError(f"decay_ratio={ratio}: must be >= 1 (final lr = peak_lr / decay_ratio)")
    return lambda peak: peak / ratio


def _constant(peak_lr, total_steps, warmup_steps, **options):
    return lambda step: jnp.full(jnp.shape(step), peak_lr, jnp.float32)


def _linear_decay(peak_lr, total_steps, warmup_steps, end):
    def f(step):
        r = _remaining(step, warmup_steps, total_steps)
        return end + (peak_lr - end) * r
    return f


def _cosine_decay(peak_lr, total_steps, warmup_steps, end):
    def f(step):
        r = _remaining(step, warmup_steps, total_steps)
        # (1 + cos(pi p)) / 2 = sin^2(pi r / 2): accurate near the end, where r is small
        return end + (peak_lr - end) * jnp.square(jnp.sin(0.5 * jnp.pi * r))
    return f


def _d2z(peak_lr, total_steps, warmup_steps, **options):
    return _linear_decay(peak_lr, total_steps, warmup_steps, 0.0)


def _linear(peak_lr, total_steps, warmup_steps, **options):
    final = float(options["final_lr"])
    if final < 0:
        final = _ratio_end(options)(peak_lr)
    if final > peak_lr:
        raise ValueError(f"final_lr={final}: must not exceed peak_lr={peak_lr}")
    return _linear_decay(peak_lr, total_steps, warmup_steps, final)


def _linear_10x(peak_lr, total_steps, warmup_steps, **options):
    return _linear_decay(peak_lr, total_steps, warmup_steps, _ratio_end(options)(peak_lr))


def _cosine_10x(peak_lr, total_steps, warmup_steps, **options):
    return _cosine_decay(peak_lr, total_steps, warmup_steps, _ratio_end(options)(peak_lr))


def _cosine_d2z(peak_lr, total_steps, warmup_steps, **options):
    return _cosine_decay(peak_lr, total_steps, warmup_steps, 0.0)


def _step(peak_lr, total_steps, warmup_steps, **options):
    fractions: Sequence[float] = tuple(float(x) for x in options["step_fractions"])
    factor = float(options["step_factor"])
    boundaries = [f * total_steps for f in fractions]

    def f(step):
        s = jnp.asarray(step, jnp.float32)
        k = sum((s >= b).astype(jnp.float32) for b in boundaries)
        return peak_lr * jnp.power(jnp.float32(factor), k)
    return f


def _wsd(peak_lr, total_steps, warmup_steps, **options):
    frac = float(options["cooldown_fraction"])
    cooldown = frac * total_steps
    start = total_steps - cooldown
    if start < warmup_steps:
        raise ValueError(
            f"cooldown_fraction={frac}: the cooldown ({cooldown:g} steps) overlaps the "
            f"{warmup_steps} warmup steps of a {total_steps}-step run")

    def f(step):
        s = jnp.asarray(step, jnp.float32)
        return peak_lr * jnp.clip((total_steps - s) / cooldown, 0.0, 1.0)
    return f


def _inv_sqrt(peak_lr, total_steps, warmup_steps, **options):
    w = float(max(warmup_steps, 1))

    def f(step):
        s = jnp.asarray(step, jnp.float32)
        return peak_lr * jnp.sqrt(w / jnp.maximum(s, w))
    return f


def _check_options(o: dict[str, Any]) -> None:
    """Range checks for every option, used or not, so a bad config value fails at start."""
    _ratio_end(o)
    if not math.isfinite(float(o["final_lr"])):
        raise ValueError(f"final_lr={o['final_lr']!r}: must be finite (< 0: derived)")
    frac = float(o["cooldown_fraction"])
    if not 0 < frac <= 1:
        raise ValueError(f"cooldown_fraction={frac}: must be in (0, 1]")
    factor = float(o["step_factor"])
    if not 0 < factor <= 1:
        raise ValueError(f"step_factor={factor}: must be in (0, 1]")
    fractions = tuple(float(x) for x in o["step_fractions"])
    if not fractions:
        raise ValueError("step_fractions=(): give at least one fraction of total_steps")
    if any(not 0 < f < 1 for f in fractions) or list(fractions) != sorted(fractions):
        raise ValueError(
            f"step_fractions={fractions}: must be increasing fractions of total_steps in (0, 1)")


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": _constant,
    "d2z": _d2z,
    "linear": _linear,
    "linear_10x": _linear_10x,
    "cosine_10x": _cosine_10x,
    "cosine_d2z": _cosine_d2z,
    "step": _step,
    "wsd": _wsd,
    "inv_sqrt": _inv_sqrt,
}


def schedule(name: str, *, peak_lr: float, total_steps: int, warmup_steps: int,
             **options) -> Schedule:
    """Returns the Optax schedule ``step -> lr`` called ``name`` (see the module docstring).

    ``options`` are any of ``decay_ratio``, ``final_lr``, ``cooldown_fraction``,
    ``step_fractions``, ``step_factor``; a schedule ignores the ones it does not use, so a config
    can pass all of them.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule={name!r}: must be one of {', '.join(sorted(SCHEDULES))}")
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown schedule option(s) {', '.join(unknown)}: valid options are "
            f"{', '.join(OPTION_DEFAULTS)}")
    peak_lr = _check_positive_finite("peak_lr", peak_lr)
    if int(total_steps) != total_steps or total_steps <= 0:
        raise ValueError(f"total_steps={total_steps!r}: must be a positive integer")
    if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps={warmup_steps!r}: must be an integer in [0, total_steps={total_steps}]")
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    opts = {**OPTION_DEFAULTS, **options}
    _check_options(opts)
    after = SCHEDULES[name](peak_lr, total_steps, warmup_steps, **opts)
    if warmup_steps == 0:
        return after

    def with_warmup(step):
        s = jnp.asarray(step, jnp.float32)
        return jnp.where(s < warmup_steps, peak_lr * s / warmup_steps, after(s))

    return with_warmup
