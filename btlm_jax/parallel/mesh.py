"""Device meshes, and the checks that a placement fits them.

Parameters carry logical axis names (see :mod:`btlm_jax.models.btlm`); the config's rule table
(``mesh.rules``, see :mod:`btlm_jax.parallel.sharding`) maps them to the mesh axes ``data``,
``fsdp`` and ``tensor``. Changing parallelism is a config change (``mesh.*``) only.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

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


def _granules(devices) -> tuple[int, str]:
    """Number of slices (TPU multislice: ``device.slice_index``) the devices span."""
    slices = {getattr(d, "slice_index", 0) for d in devices}
    return len(slices), "slice"


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh.

    Multi-slice / multi-node: the data axis is the only one that crosses the slow network (DCN
    between TPU slices, Ethernet/InfiniBand between GPU nodes). ``mesh.dcn_data`` (if the config
    has it; default: the number of TPU slices) splits the data axis into that many groups of
    devices, one per slice or, on GPUs, per process (one process per node); fsdp and tensor stay
    inside a slice/node. Without it, devices are laid out in process order, so the data axis
    (the slowest-varying) is the one spanning hosts.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    n_slices, _ = _granules(devices)
    dcn = int(mesh_cfg.get("dcn_data", 0) or 0) if hasattr(mesh_cfg, "get") else 0
    by_process = dcn > 1 and n_slices == 1
    dcn = dcn or n_slices
    if dcn > 1:
        if shape[0] % dcn:
            raise ValueError(
                f"mesh.data={shape[0]} must be a multiple of the {dcn} slices/nodes the data axis "
                "spans (fsdp and tensor stay within a slice or node)")
        ici = (shape[0] // dcn,) + tuple(shape[1:])
        try:
            arr = jax.experimental.mesh_utils.create_hybrid_device_mesh(
                ici, (dcn, 1, 1), devices=devices, process_is_granule=by_process)
        except Exception as e:  # noqa: BLE001 - report the layout that failed
            raise ValueError(
                f"mesh: cannot lay out {len(devices)} devices as {dcn} slices/nodes x {ici} "
                f"(data, fsdp, tensor) per slice: {e}; check mesh.dcn_data (0 = the TPU slices) "
                "and mesh.data / mesh.fsdp / mesh.tensor") from e
        return Mesh(arr, MESH_AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception as e:  # noqa: BLE001 - see below
        platforms = sorted({d.platform for d in devices})
        if platforms != ["cpu"]:  # a real topology the shape does not fit: say so, no guess
            raise ValueError(
                f"mesh: cannot lay out the {len(devices)} {'/'.join(platforms)} devices as "
                f"(data, fsdp, tensor) = {shape} ({type(e).__name__}: {e}); change mesh.data / "
                "mesh.fsdp / mesh.tensor to a shape that fits the device topology (e.g. put the "
                "large factor on mesh.fsdp or mesh.data), or set mesh.dcn_data for a job "
                "spanning slices or nodes") from e
        arr = np.asarray(devices).reshape(shape)  # CPU devices have no topology: plain order
    return Mesh(arr, MESH_AXES)


def logical_to_sharding(logical_spec_tree, mesh: Mesh, rules):
    """Maps a tree of logical PartitionSpecs to NamedShardings on ``mesh``."""
    return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_key(path) -> tuple[str, ...]:
    out = []
    for k in path:
        name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))
        out.append(str(name))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# Checks: divisibility and "every large parameter is actually sharded".

# logical axis -> the config key that sets the size of that dimension (for error messages)
_AXIS_KEYS = {
    "vocab": "model.vocab_size", "embed": "model.d_model", "heads": "model.n_heads",
    "kv": "model.d_model / model.n_heads", "mlp": "model.d_ff", "layers": "model.n_layers",
    "batch": "train.batch_size", "act_batch": "train.batch_size",
}

# A parameter with at least this many elements must not be replicated when fsdp or tensor > 1.
LARGE_PARAM_ELEMENTS = 1 << 20


class ShardingError(ValueError):
    """A parameter or batch cannot be placed on the configured mesh (the message names it)."""


def path_name(path) -> str:
    return "/".join(_path_key(path))


def _axes_of(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_param_shardings(abstract_params, logical_specs, shardings, mesh: Mesh, *,
                          min_elements: int = LARGE_PARAM_ELEMENTS) -> None:
    """Raises :class:`ShardingError` naming every parameter that cannot be placed as configured.

    Two checks: (1) every sharded dimension is divisible by the product of its mesh axes (e.g.
    ``model.n_heads`` by ``mesh.tensor``); (2) when ``fsdp`` or ``tensor`` > 1, every parameter
    with at least ``min_elements`` elements is split over at least one of them (a large parameter
    whose logical axes map to no mesh axis would silently be replicated on every device).
    """
    flat_p = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_l = jax.tree_util.tree_leaves(
        logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
    flat_s = jax.tree_util.tree_leaves(shardings)
    if not len(flat_p) == len(flat_l) == len(flat_s):
        raise ShardingError("internal: parameter, logical-axis and sharding trees differ")
    param_axes = [a for a in ("fsdp", "tensor") if mesh.shape.get(a, 1) > 1]
    errors = []
    for (path, leaf), logical, sh in zip(flat_p, flat_l, flat_s):
        name, shape = path_name(path), tuple(leaf.shape)
        logical = tuple(logical) if logical is not None else (None,) * len(shape)
        spec = tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec))
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            axes = _axes_of(entry)
            n = math.prod(mesh.shape[a] for a in axes)
            if n > 1 and size % n:
                lax_name = logical[dim] if dim < len(logical) else None
                key = _AXIS_KEYS.get(lax_name, f"logical axis {lax_name!r}")
                errors.append(
                    f"parameter {name} {shape}: dimension {dim} (logical axis {lax_name!r}, "
                    f"size {size}, set by {key}) is not divisible by "
                    + " * ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
                    + (f" = {n}" if len(axes) > 1 else "")
                    + f"; make {key} a multiple of {n} or change the mesh")
        numel = math.prod(shape)
        used = {a for e in spec for a in _axes_of(e)}
        if param_axes and numel >= min_elements and not used & set(param_axes):
            errors.append(
                f"parameter {name} {shape} ({numel:,} elements) would be replicated on every "
                f"device although " + ", ".join(f"mesh.{a}={mesh.shape[a]}" for a in param_axes)
                + f": its logical axes {logical} map to none of those mesh axes in "
                "mesh.rules; give it logical axes the rules shard, or change mesh.rules")
    if errors:
        raise ShardingError(
            f"the parameters do not fit mesh {dict(mesh.shape)}:\n  " + "\n  ".join(errors))


def check_batch(batch_size: int, mesh: Mesh, what: str, spec_axes: tuple[str, ...]) -> None:
    """The global batch must split evenly over the batch mesh axes and over processes."""
    n = math.prod(mesh.shape[a] for a in spec_axes)
    if batch_size % n:
        raise ShardingError(
            f"{what}={batch_size} is not divisible by the {n} batch shards ("
            + " * ".join(f"mesh.{a}={mesh.shape[a]}" for a in spec_axes)
            + f"); use a multiple of {n}")
    if batch_size % jax.process_count():
        raise ShardingError(
            f"{what}={batch_size} is not divisible by the {jax.process_count()} processes")
