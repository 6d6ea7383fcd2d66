"""Device meshes and the one table of logical-axis rules.

Parameters carry logical axis names (see :mod:`btlm_jax.models.btlm`); :data:`LOGICAL_RULES` maps
them to the mesh axes ``data``, ``fsdp`` and ``tensor``. Parameters, optimizer state and batches are
all placed from that table, so changing parallelism is a config change (``mesh.*``) only.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) sizes; one of them may be -1 (fill)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split with fixed axes "
                f"{dict(zip(MESH_AXES, sizes))}: {num_devices} is not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {num_devices} devices; "
            "set the sizes so their product is the device count, or one of them to -1")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001 - fake/CPU devices have no topology; plain order is fine
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_sharding(logical_spec_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Maps a tree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def batch_sharding(mesh: Mesh, rules=LOGICAL_RULES) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_key(path) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        out.append(str(name))
    return tuple(out)


def tree_shardings_like_params(tree, param_shardings, mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

    A leaf whose path ends with a parameter's path and has that parameter's shape gets the
    parameter's sharding (Adam moments, EMA buffers); everything else (counts, scalars) is
    replicated. This is how one rule table covers the optimizer state too.
    """
    flat_params = {
        _path_key(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    suffixes = sorted(flat_params, key=len, reverse=True)

    def pick(path, leaf):
        key = _path_key(path)
        shape = getattr(leaf, "shape", ())
        for suf in suffixes:
            if len(key) >= len(suf) and key[-len(suf):] == suf:
                sh = flat_params[suf]
                spec = sh.spec
                if len(spec) <= len(shape):
                    return sh
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)
