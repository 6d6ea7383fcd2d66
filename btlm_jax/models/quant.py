"""Weight-only quantisation for inference: int8 per output channel, int4 per group.

Only the matrices are quantised (attention q/k/v/out, FFN, the untied output head and the token
embedding); LayerNorm parameters, biases and learned position tables stay in their own dtype.
Quantisation is symmetric with float32 scales:

* ``int8``: one scale per output channel, ``s = max|w| / 127`` over the contracted (input) axes,
  ``q = round(w / s)`` in [-127, 127], stored as int8.
* ``int4``: the contracted axes are flattened and cut into groups of ``group_size`` (zero-padded
  at the end), one scale per (output channel, group), ``s = max|w| / 7``, ``q`` in [-7, 7], two
  values packed per byte (low nibble first).

Dequantisation ``w' = s * q`` has ``|w - w'| <= s / 2`` elementwise. For the embedding
(``[vocab, d_model]``, used both to look rows up and, tied, as the output projection) the
"output channel" is the token row and ``d_model`` is contracted.

Usage: ``qp = quantize_params(params, "int4")`` (a tree whose matrices are :class:`QTensor`s),
then ``model.apply({"params": dequantize_params(qp)}, ...)`` inside ``jax.jit``: weights are
stored and moved in the quantised form and expanded to the compute dtype inside the step.
:func:`weight_bytes` counts the bytes of a tree (quantised or not) and works on
``jax.eval_shape`` output, so ``describe`` reports ``3b_8k`` without allocating it.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("none", "int8", "int4")
DEFAULT_GROUP_SIZE = 128
_QMAX = {"int8": 127, "int4": 7}


class QuantizationError(ValueError):
    """A quantisation format or group size that cannot be used; the message says which."""


@flax.struct.dataclass
class QTensor:
    """A quantised matrix. ``q``: int8 ``[*out, K]`` (int8) or packed uint8 ``[*out, K/G, G/2]``
    (int4); ``scale``: float32 ``[*out, 1]`` or ``[*out, K/G, 1]``. Static fields describe how
    to rebuild the original array (``shape``, ``dtype``, axis permutation, contracted size)."""

    q: jax.Array
    scale: jax.Array
    fmt: str = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    perm: tuple = flax.struct.field(pytree_node=False)
    k: int = flax.struct.field(pytree_node=False)
    n_in: int = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)


def _names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def contracted_axes(path, ndim: int) -> tuple[int, ...] | None:
    """Input (contracted) axes of a parameter of the BTLM tree, or None if it stays float.

    Works for stacked (``nn.scan``: leading layer axis) and unrolled layers alike because the
    axes are counted from the end.
    """
    names = _names(path)
    leaf, parent = names[-1], (names[-2] if len(names) > 1 else "")
    if leaf == "embedding":
        return None if parent == "pos_embed" else (ndim - 1,)
    if leaf != "kernel":
        return None
    if parent in ("query", "key", "value"):  # [(L,) d_model, heads, d_head]
        return (ndim - 3,)
    if parent == "out":  # [(L,) heads, d_head, d_model]
        return (ndim - 3, ndim - 2)
    return (ndim - 2,)  # Dense: [(L,) in, out]


def _check(fmt: str, group_size: int) -> None:
    if fmt not in _QMAX:
        raise QuantizationError(f"quantize={fmt!r}: must be one of int8, int4 (or none)")
    if fmt == "int4" and (group_size <= 0 or group_size % 2):
        raise QuantizationError(f"int4 group_size={group_size}: must be a positive even number")


def quantize(w: jax.Array, axes: tuple[int, ...], fmt: str,
             group_size: int = DEFAULT_GROUP_SIZE) -> QTensor:
    """Quantises one array; ``axes`` are its contracted (input) axes."""
    _check(fmt, group_size)
    nd = w.ndim
    axes = tuple(sorted(a % nd for a in axes))
    out_axes = tuple(a for a in range(nd) if a not in axes)
    perm = out_axes + axes
    out_shape = tuple(w.shape[a] for a in out_axes)
    k = int(np.prod([w.shape[a] for a in axes]))
    x = jnp.transpose(w, perm).reshape(out_shape + (k,)).astype(jnp.float32)
    qmax = _QMAX[fmt]
    g = k
    if fmt == "int4":
        g = group_size
        kp = -(-k // g) * g
        if kp != k:
            x = jnp.pad(x, [(0, 0)] * len(out_shape) + [(0, kp - k)])
        x = x.reshape(out_shape + (kp // g, g))
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(x / scale), -qmax, qmax).astype(jnp.int8)
    if fmt == "int4":
        u = q.astype(jnp.uint8) & 0xF  # two's complement nibbles
        q = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(jnp.uint8)
    return QTensor(q=q, scale=scale, fmt=fmt, shape=tuple(w.shape), dtype=jnp.dtype(w.dtype).name,
                   perm=perm, k=k, n_in=len(axes), group_size=g)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8 [..., n] holding two signed nibbles each -> int8 [..., 2n] (low nibble first)."""
    lo = (packed & 0xF).astype(jnp.int8)
    hi = (packed >> 4).astype(jnp.int8)
    lo = jnp.where(lo >= 8, lo - 16, lo)
    hi = jnp.where(hi >= 8, hi - 16, hi)
    return jnp.stack([lo, hi], axis=-1).reshape(packed.shape[:-1] + (packed.shape[-1] * 2,))


def dequantize(t: QTensor, dtype=None) -> jax.Array:
    q = unpack_int4(t.q) if t.fmt == "int4" else t.q
    x = q.astype(jnp.float32) * t.scale
    n_out = len(t.shape) - t.n_in
    if t.fmt == "int4":  # [*out, K/G, G] -> [*out, K] (drop the padding)
        x = x.reshape(x.shape[:n_out] + (-1,))[..., : t.k]
    x = x.reshape(tuple(t.shape[a] for a in t.perm))
    x = jnp.transpose(x, tuple(int(i) for i in np.argsort(t.perm)))
    return x.astype(dtype if dtype is not None else t.dtype)


def quantize_params(params: Any, fmt: str, group_size: int = DEFAULT_GROUP_SIZE) -> Any:
    """Returns ``params`` with every matrix replaced by a :class:`QTensor` (``fmt`` "none": as is)."""
    if fmt in (None, "", "none"):
        return params
    _check(fmt, group_size)

    def one(path, x):
        axes = contracted_axes(path, x.ndim)
        return x if axes is None else quantize(x, axes, fmt, group_size)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_params(params: Any, dtype=None) -> Any:
    """Inverse of :func:`quantize_params` (up to the rounding); float leaves pass through."""
    return jax.tree_util.tree_map(
        lambda x: dequantize(x, dtype) if isinstance(x, QTensor) else x, params,
        is_leaf=lambda x: isinstance(x, QTensor))


def is_quantized(params: Any) -> bool:
    return any(isinstance(x, QTensor) for x in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, QTensor)))


def weight_bytes(params: Any) -> int:
    """Bytes of all arrays in a (possibly quantised, possibly abstract) parameter tree."""
    return sum(int(math.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(params))


def bytes_by_format(abstract_params: Any, group_size: int = DEFAULT_GROUP_SIZE,
                    dtypes=("float32", "bfloat16")) -> dict[str, int]:
    """Weight bytes of a model in each storage format, from shapes only (no allocation)."""
    out = {}
    for d in dtypes:
        cast = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(d)),
                                      abstract_params)
        out[d] = weight_bytes(cast)
    for fmt in ("int8", "int4"):
        out[fmt] = weight_bytes(jax.eval_shape(
            lambda p, f=fmt: quantize_params(p, f, group_size), abstract_params))
    return out
