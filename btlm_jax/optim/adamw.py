"""AdamW two ways: the ordinary Optax chain, and the same update written as an EMA of updates.

Ordinary AdamW (PyTorch / Optax; weight decay coupled to the LR) with group LR multiplier ``m``::

    theta_t = theta_{t-1} - eta_t m (u_t + lambda theta_{t-1})

where ``u_t`` is the bias-corrected Adam direction. Rearranged, it is an exponential moving
average (Wang & Aitchison; the D2Z paper's view)::

    alpha_t = eta_t m lambda
    theta_t = (1 - alpha_t) theta_{t-1} + alpha_t (-u_t / lambda)

so ``theta_T = c_{T,0} theta_0 + sum_i c_{T,i} (-u_i / lambda)`` with
``c_{T,i} = alpha_i prod_{j>i} (1 - alpha_j)`` (see :mod:`btlm_jax.optim.timescales`). The
timescale of the average is ``tau_iter = 1 / alpha_t`` steps.

LR-independent weight decay (``independent_weight_decay=True``): ``theta *= 1 - lambda_t`` with
``lambda_t = lambda * eta_t / peak_lr`` (the decay follows the schedule's shape but not its
height or the group multiplier), so ``alpha_t = lambda_t`` and the EMA target becomes
``-u_t * peak_lr * m / lambda``. Note ``lambda`` is then a per-step rate at the peak: values of
order 1e-4, not 0.1.

Parameters with no weight decay (mask false or group without decay) take the plain step
``-eta_t m u_t``. Both optimizers keep a :class:`TimescaleState` with, per group, the LR of the
last update, ``tau_iter`` and ``c_{t,0}``; :func:`group_metrics` reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from btlm_jax.optim.groups import GroupRules, ParamGroup

ScalarOrSchedule = float | Callable[[Any], Any]


class TimescaleState(NamedTuple):
    """Per-group timescales after ``count`` updates (dicts keyed by group name).

    ``lr``: LR of the last update (schedule x group multiplier); ``tau``: ``1 / alpha`` of the
    last update in steps (only groups with weight decay; ``inf`` while ``alpha = 0``); ``c0``:
    ``prod_j (1 - alpha_j)``, the weight the initial parameters still have; ``total_steps``: T
    for ``tau / T`` (0 when unknown).
    """

    count: jax.Array
    lr: dict[str, jax.Array]
    tau: dict[str, jax.Array]
    c0: dict[str, jax.Array]
    total_steps: jax.Array


class _Setup:
    """Resolved groups, decay mask and timescale bookkeeping shared by both optimizers."""

    def __init__(self, learning_rate, weight_decay, mask, groups: GroupRules | None,
                 independent: bool, peak_lr: float | None, total_steps: int | None):
        if weight_decay < 0:
            raise ValueError(f"weight_decay={weight_decay}: must be >= 0")
        self.lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
        self.weight_decay = float(weight_decay)
        self.independent = bool(independent)
        if self.independent:
            if peak_lr is None:
                if callable(learning_rate):
                    raise ValueError(
                        "independent_weight_decay=True with a schedule needs peak_lr (the decay "
                        "follows learning_rate(t) / peak_lr)")
                peak_lr = float(learning_rate)
            if not peak_lr > 0:
                raise ValueError(f"peak_lr={peak_lr}: must be > 0")
        self.peak_lr = peak_lr
        self.total_steps = int(total_steps or 0)
        self.mask = mask
        self.rules = groups
        if groups is None:
            self.groups: Mapping[str, ParamGroup] = (
                {"decay": ParamGroup(1.0, True), "no_decay": ParamGroup(1.0, False)})
        else:
            self.groups = dict(groups.groups)
        self.decaying = [n for n, g in self.groups.items()
                         if g.weight_decay and self.weight_decay > 0]

    # --- per-leaf trees -------------------------------------------------------------------
    def _user_mask(self, params):
        if self.mask is None:
            return jax.tree.map(lambda _: True, params)
        m = self.mask(params) if callable(self.mask) else self.mask
        if jax.tree.structure(m) != jax.tree.structure(params):
            raise ValueError(
                "mask must be a tree of booleans with the parameters' structure (or a callable "
                f"returning one); got {jax.tree.structure(m)} for {jax.tree.structure(params)}")
        return m

    def labels(self, params):
        if self.rules is not None:
            return self.rules.labels(params)
        return jax.tree.map(lambda m: "decay" if m else "no_decay", self._user_mask(params))

    def decay_mask(self, params):
        return jax.tree.map(
            lambda label, m: bool(m) and self.groups[label].weight_decay and self.weight_decay > 0,
            self.labels(params), self._user_mask(params))

    # --- scalars of step `count` (Optax's count: updates applied so far) -------------------
    def alpha(self, name: str, eta):
        if self.independent:
            return self.weight_decay * eta / self.peak_lr
        return eta * self.groups[name].lr_mult * self.weight_decay

    def target_scale(self, name: str) -> float:
        """-u is multiplied by this to give the EMA target."""
        if self.independent:
            return self.peak_lr * self.groups[name].lr_mult / self.weight_decay
        return 1.0 / self.weight_decay

    def init_timescales(self) -> TimescaleState:
        f32 = jnp.float32
        return TimescaleState(
            count=jnp.zeros([], jnp.int32),
            lr={n: jnp.zeros([], f32) for n in self.groups},
            tau={n: jnp.full([], jnp.inf, f32) for n in self.decaying},
            c0={n: jnp.ones([], f32) for n in self.decaying},
            total_steps=jnp.asarray(self.total_steps, jnp.int32),
        )

    def advance(self, state: TimescaleState) -> TimescaleState:
        eta = jnp.asarray(self.lr_fn(state.count), jnp.float32)
        tau, c0 = {}, {}
        for n in self.decaying:
            a = self.alpha(n, eta)
            tau[n] = jnp.where(a > 0, 1.0 / jnp.where(a > 0, a, 1.0), jnp.inf)
            c0[n] = state.c0[n] * (1.0 - a)
        return TimescaleState(
            count=optax.safe_increment(state.count),
            lr={n: eta * g.lr_mult for n, g in self.groups.items()},
            tau=tau, c0=c0, total_steps=state.total_steps)


def _track(setup: _Setup) -> optax.GradientTransformation:
    """Leaves updates alone; keeps the per-group TimescaleState for the plain optimizer."""

    def init_fn(params):
        del params
        return setup.init_timescales()

    def update_fn(updates, state, params=None):
        del params
        return updates, setup.advance(state)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.95,
          eps: float = 1e-8, weight_decay: float = 0.1, mask: Any = None, *,
          groups: GroupRules | None = None, independent_weight_decay: bool = False,
          peak_lr: float | None = None, total_steps: int | None = None,
          ) -> optax.GradientTransformation:
    """Ordinary AdamW from Optax blocks, with optional parameter groups.

    ``mask`` (tree of bools or callable, as in Optax) and the groups' ``weight_decay`` flags both
    have to allow decay for a leaf to decay. Groups scale the LR (and so the coupled decay) of
    their leaves by ``lr_mult``.
    """
    s = _Setup(learning_rate, weight_decay, mask, groups, independent_weight_decay, peak_lr,
               total_steps)
    group_scale = []
    if groups is not None and any(g.lr_mult != 1.0 for g in s.groups.values()):
        group_scale = [optax.multi_transform(
            {n: optax.scale(g.lr_mult) for n, g in s.groups.items()}, s.labels)]
    if not independent_weight_decay:
        parts = [
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.add_decayed_weights(s.weight_decay, mask=s.decay_mask),
            optax.scale_by_learning_rate(learning_rate),
            *group_scale,
        ]
    else:
        def neg_decay(count):
            return -s.weight_decay * s.lr_fn(count) / s.peak_lr
        parts = [
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.scale_by_learning_rate(learning_rate),
            *group_scale,
            optax.add_decayed_weights(neg_decay, mask=s.decay_mask),
        ]
    return optax.chain(*parts, _track(s))


def ema_weight_update(learning_rate: ScalarOrSchedule, weight_decay: float = 0.1,
                      mask: Any = None, *, groups: GroupRules | None = None,
                      independent_weight_decay: bool = False, peak_lr: float | None = None,
                      total_steps: int | None = None) -> optax.GradientTransformation:
    """Turns Adam directions ``u_t`` into the EMA step ``alpha_t (-u_t * scale - theta)``.

    Chain it after :func:`optax.scale_by_adam`. Leaves without decay get ``-eta_t m u_t``.
    """
    s = _Setup(learning_rate, weight_decay, mask, groups, independent_weight_decay, peak_lr,
               total_steps)

    def init_fn(params):
        del params
        return s.init_timescales()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("adamw_ema needs params: call tx.update(grads, state, params)")
        eta = jnp.asarray(s.lr_fn(state.count), jnp.float32)

        def leaf(u, theta, label, decays):
            if decays:
                a = s.alpha(label, eta)
                target = -u.astype(jnp.float32) * s.target_scale(label)
                step = a * (target - theta.astype(jnp.float32))
            else:
                step = -(eta * s.groups[label].lr_mult) * u.astype(jnp.float32)
            return step.astype(u.dtype)

        new = jax.tree.map(leaf, updates, params, s.labels(params), s.decay_mask(params))
        return new, s.advance(state)

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_ema(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.95,
              eps: float = 1e-8, weight_decay: float = 0.1, mask: Any = None, *,
              groups: GroupRules | None = None, independent_weight_decay: bool = False,
              peak_lr: float | None = None, total_steps: int | None = None,
              ) -> optax.GradientTransformation:
    """AdamW as an explicit EMA of updates; same parameters as :func:`adamw` (to f32 rounding)."""
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        ema_weight_update(learning_rate, weight_decay, mask, groups=groups,
                          independent_weight_decay=independent_weight_decay, peak_lr=peak_lr,
                          total_steps=total_steps),
    )


def timescale_state(opt_state: Any) -> TimescaleState:
    """Finds the (single) TimescaleState inside an optimizer state."""
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TimescaleState))
             if isinstance(x, TimescaleState)]
    if len(found) != 1:
        raise ValueError(
            f"expected one TimescaleState in the optimizer state, found {len(found)}: build the "
            "optimizer with btlm_jax.optim.adamw / adamw_ema / build")
    return found[0]


def group_metrics(opt_state: Any, step: Any = None) -> dict[str, jax.Array]:
    """Per group: ``opt/<group>/lr``; for groups with weight decay also ``opt/<group>/tau_iter``,
    ``opt/<group>/tau_over_T`` (when the optimizer knows T) and ``opt/<group>/c_t0``.

    Values describe the state after its most recent update (the state counts its own steps, so
    ``step`` is only accepted for call-site symmetry). ``tau`` is ``inf`` while the LR is 0.
    Works under ``jit`` (returns jnp scalars).
    """
    del step
    ts = timescale_state(opt_state)
    out: dict[str, jax.Array] = {}
    for name, lr in ts.lr.items():
        out[f"opt/{name}/lr"] = lr
    for name, tau in ts.tau.items():
        out[f"opt/{name}/tau_iter"] = tau
        out[f"opt/{name}/tau_over_T"] = jnp.where(
            ts.total_steps > 0, tau / jnp.maximum(ts.total_steps, 1).astype(jnp.float32), jnp.nan)
        out[f"opt/{name}/c_t0"] = ts.c0[name]
    return out
