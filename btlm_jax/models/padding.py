"""Physical padding of the vocabulary and FFN axes (``model.pad_multiple``) on parameter trees.

The model (:mod:`btlm_jax.models.btlm`) allocates the ``vocab`` and ``mlp`` axes rounded up to a
multiple of ``model.pad_multiple`` and keeps the padding exactly zero; this module converts
between the physical trees it trains and the logical trees the rest of the world sees (exports,
imports, parameter counts) and checks the padding is still zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def padded_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    multiple = max(1, int(multiple))
    return -(-int(n) // multiple) * multiple


def physical_sizes(model_cfg) -> dict[str, tuple[int, int]]:
    """Logical axis name -> (logical size, physical size) for the padded axes."""
    mult = int(getattr(model_cfg, "pad_multiple", 1) or 1)
    v, f = int(model_cfg.vocab_size), int(model_cfg.d_ff)
    return {"vocab": (v, padded_size(v, mult)), "mlp": (f, padded_size(f, mult))}


# Where the padded axes sit in each parameter (negative: counted from the end, so a scanned
# layer stack's leading axis does not move them). tests/test_padding.py checks this table against
# the logical axis names the model gives its parameters.
PADDED_PARAM_AXES: tuple[tuple[str, str, int], ...] = (
    ("embed/embedding", "vocab", -2),
    ("lm_head/kernel", "vocab", -1),
    ("mlp/wi/kernel", "mlp", -1), ("mlp/wi/bias", "mlp", -1),
    ("mlp/wi_0/kernel", "mlp", -1), ("mlp/wi_0/bias", "mlp", -1),
    ("mlp/wi_1/kernel", "mlp", -1), ("mlp/wi_1/bias", "mlp", -1),
    ("mlp/wo/kernel", "mlp", -2),
)


def _leaf_path(key_path) -> str:
    parts = []
    for k in key_path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if name != "value":  # flax partitioning boxes
            parts.append(str(name))
    return "/".join(parts)


def padded_axis(path: str) -> tuple[str, int] | None:
    """(logical axis name, array axis) of the padded axis of parameter ``path``, or None."""
    for suffix, name, axis in PADDED_PARAM_AXES:
        if path == suffix or path.endswith("/" + suffix):
            return name, axis
    return None


def _map_padded(params, model_cfg, fn):
    """``fn(x, axis, logical, physical)`` on each padded leaf, whose padded axis must have one of
    the two sizes (ValueError naming the parameter otherwise); other leaves unchanged."""
    sizes = physical_sizes(model_cfg)

    def one(key_path, x):
        path = _leaf_path(key_path)
        hit = padded_axis(path)
        if hit is None:
            return x
        name, axis = hit
        axis %= x.ndim
        logical, physical = sizes[name]
        if x.shape[axis] not in (logical, physical):
            raise ValueError(f"{path}: axis {axis} has size {x.shape[axis]}, expected {logical} "
                             f"(logical) or {physical} (padded, model.pad_multiple)")
        return fn(x, axis, logical, physical)

    return jax.tree_util.tree_map_with_path(one, params)


def to_logical(params, model_cfg):
    """A parameter tree (physical shapes) cut to the logical shapes: the padded vocabulary rows
    and FFN units removed. Works on NumPy, jax arrays and under ``jax.eval_shape``; a tree that
    already has the logical shapes is returned unchanged."""
    def cut(x, axis, logical, physical):
        if x.shape[axis] == logical:
            return x
        return x[(slice(None),) * axis + (slice(0, logical),)]
    return _map_padded(params, model_cfg, cut)


def to_physical(params, model_cfg):
    """A parameter tree with logical shapes padded with zeros to the physical shapes (an
    imported checkpoint); a tree already at the physical shapes is returned unchanged."""
    def pad(x, axis, logical, physical):
        if x.shape[axis] == physical:
            return x
        xp = np if isinstance(x, np.ndarray) else jnp
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, physical - logical)
        return xp.pad(x, widths)
    return _map_padded(params, model_cfg, pad)


def nonzero_padding(params, model_cfg) -> list[str]:
    """The parameters (paths) whose padded rows / units hold anything but zeros (concrete
    arrays): such a tree is not the logical model, since training keeps the padding exactly zero
    (see the module docstring)."""
    sizes, bad = physical_sizes(model_cfg), []
    for key_path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        hit = padded_axis(_leaf_path(key_path))
        if hit is None:
            continue
        logical, physical = sizes[hit[0]]
        axis = hit[1] % x.ndim
        if physical != logical and x.shape[axis] == physical:
            tail = np.asarray(x)[(slice(None),) * axis + (slice(logical, None),)]
            if np.any(tail != 0):
                bad.append(_leaf_path(key_path))
    return bad


def logical_num_params(params, model_cfg) -> int:
    """The number of parameters of the logical model (padding excluded) of a physical tree
    (arrays or ShapeDtypeStructs)."""
    sizes = physical_sizes(model_cfg)
    total = 0
    for key_path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = list(x.shape)
        hit = padded_axis(_leaf_path(key_path))
        if hit is not None:
            name, axis = hit
            shape[axis % len(shape)] = min(shape[axis % len(shape)], sizes[name][0])
        total += int(np.prod(shape))
    return total
