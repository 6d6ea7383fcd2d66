"""ALiBi (Press et al., 2022) slopes and biases, with position interpolation (Al-Khateeb et al.).

For ``n`` heads, ``n`` a power of two, head ``h`` (1-based) has slope ``m_h = 2^(-8h/n)``.
Otherwise take the slopes for the largest power of two ``p < n`` and fill the remaining
``n - p`` heads with every other slope of the ``2p`` sequence (the paper's interleaving).

The bias added to attention logits is ``-(m_h / s) * (i - j)`` for query ``i``, key ``j <= i``,
with ``s = 1`` in training and ``s = L_eval / L_train`` when evaluating beyond the training length
with position interpolation (and/or the config's ``alibi_scaling``, fixed or dynamic). A checkpoint
may carry its own slopes (``model.alibi_slopes``: the published BTLM stores them in bf16); every
forward takes its slopes from :func:`effective_slopes`.
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


def model_slopes(model_cfg) -> np.ndarray:
    """The model's own slopes [H] (float64): ``model.alibi_slopes`` when carried from a checkpoint
    (e.g. the bf16-rounded ``transformer.relative_pe.slopes`` of cerebras/btlm-3b-8k-base), else the
    standard :func:`alibi_slopes`."""
    n = int(model_cfg.n_heads)
    carried = tuple(getattr(model_cfg, "alibi_slopes", ()) or ())
    if not carried:
        return alibi_slopes(n)
    if len(carried) != n:
        raise ValueError(f"model.alibi_slopes has {len(carried)} values but model.n_heads={n}: "
                         "give one slope per head, or () for the standard slopes")
    return np.asarray(carried, np.float64)


def dynamic_train_len(model_cfg) -> int:
    """``L`` of a dynamic ``alibi_scaling`` in effect (a fixed factor other than 1 wins), else 0."""
    dyn = int(getattr(model_cfg, "alibi_scaling_train_seq_len", 0) or 0)
    return dyn if dyn > 0 and float(model_cfg.alibi_scaling) == 1.0 else 0


def scaling_divisor(model_cfg, key_len=None):
    """The divisor the config's ``alibi_scaling`` puts on the slopes for ``key_len`` keys.

    Hugging Face BTLM semantics: a fixed ``{"type": "linear", "factor": f}`` is
    ``model.alibi_scaling = f`` (it wins over a train length, as in the reference); a dynamic
    ``{"type": "linear", "train_seq_len": L}`` is ``model.alibi_scaling_train_seq_len = L``: divide
    by ``key_len / L`` in every forward whose key length exceeds ``L`` (each decode step
    recomputes it from its own key count), else by 1. ``key_len`` may be a traced scalar.
    """
    dyn = dynamic_train_len(model_cfg)
    if not dyn or key_len is None:
        return float(model_cfg.alibi_scaling)
    if isinstance(key_len, (int, np.integer)):
        return max(1.0, int(key_len) / dyn)
    return jnp.maximum(1.0, jnp.asarray(key_len, jnp.float32) / dyn)


def effective_slopes(model_cfg, key_len=None, alibi_scale=1.0):
    """The per-head slopes [H] (float32) a forward pass uses: the model's slopes
    (:func:`model_slopes`: carried or standard) divided by ``alibi_scale`` (position
    interpolation at evaluation) and the config's ``alibi_scaling`` (:func:`scaling_divisor`).

    Every attention implementation takes its slopes from here, so the slope source (computed or
    carried from a checkpoint) and the scaling semantics live in one place. ``key_len`` is the
    number of key positions of this forward (static or traced; with a KV cache the filled slots,
    prefix included), for length-dependent scaling. A dynamic ``alibi_scaling`` already
    interpolates, so there the divisor is ``max(alibi_scale, key_len / L)``, not their product
    (evaluating with position interpolation on does not interpolate twice).
    """
    slopes = jnp.asarray(model_slopes(model_cfg), jnp.float32)
    div = scaling_divisor(model_cfg, key_len)
    if dynamic_train_len(model_cfg) and key_len is not None:
        return slopes / jnp.maximum(alibi_scale, div)
    return slopes / (alibi_scale * div)


def alibi_bias(n_heads: int, q_positions, k_positions, scale=1.0, slopes=None):
    """ALiBi bias [B, H, Tq, Tk] from per-token positions [B, Tq] and [B, Tk].

    ``scale`` divides the slopes (position interpolation / alibi_scaling); it may be a traced
    scalar. ``slopes`` [H] replaces the standard slopes (pass :func:`effective_slopes`).
    Distances are clipped at 0 so masked (future) entries stay finite.
    """
    if slopes is None:
        slopes = jnp.asarray(alibi_slopes(n_heads), jnp.float32)
    dist = q_positions[:, :, None] - k_positions[:, None, :]  # [B, Tq, Tk], i - j
    dist = jnp.maximum(dist, 0).astype(jnp.float32)
    return -(slopes[None, :, None, None] / scale) * dist[:, None, :, :]


def key_only_alibi_bias(slopes, k_positions):
    """The key-only ALiBi bias ``m_h * pos_j``, float32 [B, H, 1, Tk], from slopes [H] and key
    positions [B, Tk].

    Softmax is invariant to a per-row constant, so adding ``m_h * pos_j`` instead of
    ``-m_h * (pos_i - pos_j)`` gives the same attention on every unmasked entry (also when positions
    restart inside packed documents). Kept in float32: ``m_h * pos_j`` reaches thousands at 8k
    tokens, beyond what bfloat16 resolves.
    """
    return (slopes.astype(jnp.float32)[None, :, None, None]
            * k_positions.astype(jnp.float32)[:, None, None, :])
