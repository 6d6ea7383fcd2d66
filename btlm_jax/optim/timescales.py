"""Timescales of AdamW viewed as an EMA of updates (D2Z paper; Power Lines), in float64 NumPy.

With ``alpha_t = eta_t * lambda`` for steps ``t = 1..T``:

    c_{T,0} = prod_{j=1..T} (1 - alpha_j)                     (weight of the initial parameters)
    c_{T,i} = alpha_i prod_{j=i+1..T} (1 - alpha_j)           (weight of update i)

and the ``c_{T,i}`` sum to 1. ``tau_iter = 1 / (eta lambda)`` is the EMA's timescale in steps;
divided by ``T`` it is the normalised timescale the D2Z paper sweeps. Power Lines measures it in
epochs: ``tau = B / (eta lambda D)`` with batch size ``B`` and dataset size ``D`` in the same unit
(sequences or tokens), and finds the optimal ``tau`` falling as a power law in tokens per
parameter (exponent about -0.53); as the batch size changes, keep ``tau`` by changing ``lambda``.

For LR-independent weight decay (``theta *= 1 - lambda * eta_t / peak``) pass the schedule's
*shape* ``eta_t / peak`` as ``lrs``: then ``alpha_t = lambda * eta_t / peak``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

POWER_LINES_EXPONENT = -0.53


def alphas(lrs, weight_decay) -> np.ndarray:
    """``alpha_t = lr_t * lambda`` in float64 (``weight_decay`` scalar or per step)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    if lrs.ndim != 1:
        raise ValueError(f"lrs must be a 1-D sequence of per-step LRs, got shape {lrs.shape}")
    wd = np.broadcast_to(np.asarray(weight_decay, dtype=np.float64), lrs.shape)
    if np.any(lrs < 0) or np.any(wd < 0):
        raise ValueError("learning rates and weight decay must be >= 0")
    a = lrs * wd
    if np.any(a > 1):
        t = int(np.argmax(a > 1)) + 1
        raise ValueError(
            f"lr * weight_decay = {a[t - 1]:g} > 1 at step {t}: the EMA view needs alpha_t <= 1")
    return a


def ema_coefficients(lrs, weight_decay) -> np.ndarray:
    """``c_{T,0..T}`` (float64, length T + 1) for the LRs of steps ``1..T``; sums to 1."""
    a = alphas(lrs, weight_decay)
    keep = 1.0 - a
    # suffix[i] = prod_{j=i+1..T} (1 - alpha_j) for i = 0..T (empty product = 1 at i = T).
    suffix = np.ones(a.size + 1, dtype=np.float64)
    suffix[:-1] = np.cumprod(keep[::-1])[::-1]
    coeffs = np.empty(a.size + 1, dtype=np.float64)
    coeffs[0] = suffix[0]
    coeffs[1:] = a * suffix[1:]
    return coeffs


def init_weight(lrs, weight_decay) -> np.ndarray:
    """``c_{t,0}`` for every ``t = 1..T`` (how much each step's parameters still owe to init)."""
    return np.cumprod(1.0 - alphas(lrs, weight_decay))


def tau_iter(lr, weight_decay):
    """EMA timescale in steps, ``1 / (lr * lambda)`` (``inf`` where either is 0)."""
    a = np.asarray(lr, dtype=np.float64) * np.asarray(weight_decay, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(a > 0, 1.0 / np.where(a > 0, a, 1.0), np.inf)


def tau_over_T(lr, weight_decay, total_steps: int):
    """Normalised timescale ``tau_iter / T``."""
    if total_steps <= 0:
        raise ValueError(f"total_steps={total_steps}: must be > 0")
    return tau_iter(lr, weight_decay) / float(total_steps)


def power_lines_tau(batch_size, lr, weight_decay, dataset_size):
    """EMA timescale as a fraction of an epoch: ``B / (eta * lambda * D)``."""
    if np.any(np.asarray(dataset_size) <= 0) or np.any(np.asarray(batch_size) <= 0):
        raise ValueError("batch_size and dataset_size must be > 0")
    return np.asarray(batch_size, np.float64) * tau_iter(lr, weight_decay) / np.asarray(
        dataset_size, np.float64)


def weight_decay_for_tau(tau, batch_size, lr, dataset_size):
    """The ``lambda`` that gives epoch timescale ``tau``: ``B / (tau * eta * D)``."""
    tau, b, lr, d = (np.asarray(x, np.float64) for x in (tau, batch_size, lr, dataset_size))
    if np.any(tau <= 0) or np.any(lr <= 0) or np.any(d <= 0):
        raise ValueError("tau, lr and dataset_size must be > 0")
    return b / (tau * lr * d)


def scale_tau(tau_ref, tpp_ref, tpp, exponent: float = POWER_LINES_EXPONENT):
    """Moves an optimal ``tau`` measured at ``tpp_ref`` tokens/parameter to ``tpp`` by the power
    law ``tau ~ tpp ** exponent``."""
    if np.any(np.asarray(tpp_ref) <= 0) or np.any(np.asarray(tpp) <= 0):
        raise ValueError("tokens per parameter must be > 0")
    return np.asarray(tau_ref, np.float64) * (np.asarray(tpp, np.float64) / tpp_ref) ** exponent


def lr_sequence(schedule: Callable[[Any], Any], total_steps: int) -> np.ndarray:
    """The LRs of steps ``1..T`` of an Optax schedule (step t uses ``schedule(t - 1)``)."""
    return np.asarray(schedule(np.arange(total_steps)), dtype=np.float64)
