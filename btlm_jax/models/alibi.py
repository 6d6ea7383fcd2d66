"""ALiBi (Press et al., 2022) slopes and biases, with position interpolation (Al-Khateeb et al.).

For ``n`` heads, ``n`` a power of two, head ``h`` (1-based) has slope ``m_h = 2^(-8h/n)``.
Otherwise take the slopes for the largest power of two ``p < n`` and fill the remaining
``n - p`` heads with every other slope of the ``2p`` sequence (the paper's interleaving).

The bias added to attention logits is ``-(m_h / s) * (i - j)`` for query ``i``, key ``j <= i``,
with ``s = 1`` in training and ``s = L_eval / L_train`` when evaluating beyond the training length
with position interpolation (and/or a fixed ``alibi_scaling`` from the model config).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Per-head ALiBi slopes as a float64 NumPy array of shape [n_heads]."""
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    if n_heads & (n_heads - 1) == 0:
        return np.asarray(power_of_two(n_heads), np.float64)
    p = 2 ** int(math.floor(math.log2(n_heads)))
    extra = power_of_two(2 * p)[0::2][: n_heads - p]
    return np.asarray(power_of_two(p) + extra, np.float64)


def interpolation_scale(eval_len: int, train_len: int) -> float:
    """Position-interpolation divisor for ALiBi slopes: L_eval / L_train when L_eval > L_train."""
    if train_len <= 0:
        raise ValueError(f"train_len must be positive, got {train_len}")
    return max(1.0, eval_len / train_len)


def effective_slopes(model_cfg, key_len=None, alibi_scale=1.0):
    """The per-head slopes [H] (float32) a forward pass uses: the model's slopes divided by
    ``alibi_scale`` (position interpolation at evaluation) and the config's ``alibi_scaling``.

    Every attention implementation takes its slopes from here, so the slope source (computed or
    carried from a checkpoint) and the scaling semantics live in one place. ``key_len`` is the
    number of key positions of this forward (static or traced), for length-dependent scaling.
    """
    slopes = jnp.asarray(alibi_slopes(model_cfg.n_heads), jnp.float32)
    return slopes / (alibi_scale * model_cfg.alibi_scaling)


def alibi_bias(n_heads: int, q_positions, k_positions, scale=1.0):
    """ALiBi bias [B, H, Tq, Tk] from per-token positions [B, Tq] and [B, Tk].

    ``scale`` divides the slopes (position interpolation / alibi_scaling); it may be a traced
    scalar. Distances are clipped at 0 so masked (future) entries stay finite.
    """
    slopes = jnp.asarray(alibi_slopes(n_heads), jnp.float32)
    dist = q_positions[:, :, None] - k_positions[:, None, :]  # [B, Tq, Tk], i - j
    dist = jnp.maximum(dist, 0).astype(jnp.float32)
    return -(slopes[None, :, None, None] / scale) * dist[:, None, :, :]
