"""The weight-streaming layout (``mesh.layout=weight_streaming``): an approximation of Cerebras.

On Cerebras the weights and optimizer state live off the wafer (MemoryX); each layer's weights
stream in for the forward pass and again for the backward pass, gradients stream back, and the
optimizer update runs off the wafer; the batch is split data-parallel over the systems. Here:

- parameters and optimizer state live in *host* memory (JAX memory kind ``pinned_host``), each
  leaf sharded over all devices of the mesh along its largest divisible dimension (for the
  stacked layers: a dimension other than the layer axis), so the hosts hold one copy between
  them; nothing of the model is resident on the devices between steps;
- the non-layer weights (embedding, final norm) are all-gathered onto the devices at the start of
  the step; each layer's weights are moved and all-gathered inside the layer scan
  (``BTLM.layer_params_fn``). The streamed block is always rematerialised, so the backward pass
  moves each layer again instead of keeping it; the move's backward reduce-scatters the layer's
  gradient and sends it to host memory (a custom VJP);
- the optimizer update streams too (:func:`btlm_jax.optim.streamed.streamed_update`, the
  placement's ``update_fn``): the global gradient norm first, then a loop over the layer axis
  that moves one layer's parameters, moments and gradient shard to the devices, runs the
  configured optimizer on it and moves it back. Gradient accumulation adds the micro-batches'
  gradients layer by layer the same way (``add_fn``). Device memory holds O(1) layers of state;
- the batch is sharded over every device of the mesh (pure data parallel).

It computes the same function as the standard layout, so the losses are equal (tested). A
backend without a host memory space is an error, not a silent fallback.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btlm_jax.models.btlm import BTLM
from btlm_jax.optim.streamed import streamed_update
from btlm_jax.parallel.mesh import MESH_AXES, ShardingError

HOST_KINDS = ("pinned_host", "unpinned_host")
LAYERS = "layers"


def host_memory_kind(mesh: Mesh) -> str | None:
    """The host memory kind the devices can address, or None."""
    dev = mesh.devices.flat[0]
    try:
        kinds = {m.kind for m in dev.addressable_memories()}
    except Exception:  # noqa: BLE001 - very old runtimes have no memories API
        kinds = set()
    for k in HOST_KINDS:
        if k in kinds:
            return k
    return None


def _device_memory_kind(mesh: Mesh) -> str:
    return mesh.devices.flat[0].default_memory().kind


def leaf_spec(shape, n: int) -> P:
    """Host sharding of one (unstacked) leaf: its largest dimension divisible by ``n`` split
    over all mesh axes; replicated when none divides."""
    dims = [d for d in range(len(shape)) if shape[d] >= n and shape[d] % n == 0]
    if n == 1 or not dims:
        return P()
    d = max(dims, key=lambda d: (shape[d], -d))
    return P(*([None] * d + [MESH_AXES]))


def stacked_spec(shape, n: int) -> P:
    """Host sharding of a stacked layer leaf [n_layers, ...]: never along the layer axis."""
    return P(None, *leaf_spec(shape[1:], n))


class Streamer:
    """The moves between the state's home (host memory, sharded) and the devices."""

    def __init__(self, mesh: Mesh, host_kind: str):
        self.mesh, self.n = mesh, mesh.size
        self.host_kind, self.device_kind = host_kind, _device_memory_kind(mesh)

    def _sh(self, spec, kind):
        return NamedSharding(self.mesh, spec, memory_kind=kind)

    # one leaf, kept sharded (the optimizer update works on shards) --------------------------
    def load(self, x):
        return jax.device_put(x, self._sh(leaf_spec(x.shape, self.n), self.device_kind))

    def store(self, x):
        return jax.device_put(x, self._sh(leaf_spec(x.shape, self.n), self.host_kind))

    # one leaf, all-gathered for compute; its gradient reduce-scattered back to host ----------
    def gather(self, x):
        spec = leaf_spec(x.shape, self.n)
        dev, host = self._sh(spec, self.device_kind), self._sh(spec, self.host_kind)
        full = self._sh(P(), self.device_kind)

        @jax.custom_vjp
        def move(v):
            # The barrier keeps the all-gather's operand layout (gathered dimension major) from
            # propagating to the layer stack ``v`` is sliced from: without it XLA relays out
            # each whole stack once per step, a device copy that grows with depth (1.66x from 4
            # to 16 layers at d_model 1024 instead of 1.41x; tests/test_streaming.py).
            v = jax.lax.optimization_barrier(v)
            return jax.lax.with_sharding_constraint(jax.device_put(v, dev), full)

        def fwd(v):
            return move(v), None

        def bwd(_, ct):
            return (jax.device_put(jax.lax.with_sharding_constraint(ct, dev), host),)

        move.defvjp(fwd, bwd)
        return move(x)

    # trees ----------------------------------------------------------------------------------
    def home_spec(self, path_top: str, shape) -> P:
        return stacked_spec(shape, self.n) if path_top == LAYERS else leaf_spec(shape, self.n)

    def to_host_tree(self, tree):
        """A parameter-shaped tree (e.g. gradients) to its host sharding."""
        def put(path, x):
            top = path[0].key if path and isinstance(path[0], jax.tree_util.DictKey) else None
            if top == LAYERS:  # the layer scan's backward already sent these (Streamer.gather)
                return x
            return jax.device_put(x, self._sh(self.home_spec(top, x.shape), self.host_kind))
        return jax.tree_util.tree_map_with_path(put, tree)

    def add_trees(self, a, b):
        """``a + b`` for two host-resident gradient trees, one layer at a time."""
        out = {}
        for k in a:
            if k != LAYERS:
                out[k] = jax.tree_util.tree_map(
                    lambda x, y: self.store(self.load(x) + self.load(y)), a[k], b[k])
        if LAYERS in a:
            n_layers = jax.tree_util.tree_leaves(a[LAYERS])[0].shape[0]

            def body(i, acc):
                return jax.tree_util.tree_map(
                    lambda s, y: jax.lax.dynamic_update_index_in_dim(s, self.store(
                        self.load(_at(s, i)) + self.load(_at(y, i))), i, 0),
                    acc, b[LAYERS])

            out[LAYERS] = jax.lax.fori_loop(0, n_layers, body, a[LAYERS])
        return {k: out[k] for k in a}


def _at(x, i):
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


class StreamingModel(BTLM):
    """``BTLM`` whose ``apply`` moves weights from host memory to the devices as they are used.

    Same parameters and the same function as :class:`BTLM`; only where the weights live differs.
    The layer stack is moved one layer at a time by ``layer_params_fn`` inside the scan (always
    rematerialised, see :class:`BTLM`).
    """

    gather_fn: Any = None

    def apply(self, variables, *args, **kwargs):
        params = dict(variables["params"])
        # everything except the scanned layer stack moves now (embedding, final norm, head)
        moved = {k: (v if k == LAYERS else jax.tree_util.tree_map(self.gather_fn, v))
                 for k, v in params.items()}
        return super().apply({**variables, "params": moved}, *args, **kwargs)


def placement(cfg, mesh: Mesh, model, abstract_state, rules, tx):
    """The weight-streaming :class:`~btlm_jax.parallel.sharding.Placement` on ``mesh``.

    Parameters and optimizer state sharded over all devices in host memory (scalars replicated
    there), the step counter on the devices, the batch over every device; the hooks are the
    per-micro-batch gradient move (``to_host``), the layer-by-layer gradient sum (``add_fn``)
    and the streamed optimizer update (``update_fn``).
    """
    from btlm_jax.parallel.sharding import Placement, optimizer_shardings

    del model  # the streamed model is built here from the config
    host_kind = host_memory_kind(mesh)
    if host_kind is None:
        raise ShardingError(
            f"mesh.layout=weight_streaming: the {jax.default_backend()} backend exposes no host "
            "memory space (pinned_host) to hold the weights; use mesh.layout=standard")
    if not cfg.model.scan_layers:
        raise ShardingError("mesh.layout=weight_streaming streams the scanned layer stack: set "
                            "model.scan_layers=True")
    s = Streamer(mesh, host_kind)
    param_sh = jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, s.home_spec(path[0].key, x.shape),
                                      memory_kind=host_kind), abstract_state.params)
    opt_sh = optimizer_shardings(tx, abstract_state.opt_state, param_sh,
                                 NamedSharding(mesh, P(), memory_kind=host_kind))
    state_sh = abstract_state.replace(step=NamedSharding(mesh, P()), params=param_sh,
                                      opt_state=opt_sh)
    # activations: batch over every device, nothing else sharded (pure data parallel)
    names = [name for name, _ in rules]
    rules = tuple((name, MESH_AXES if name == "act_batch" else None) for name in names)
    streamed = StreamingModel(cfg.model, layer_params_fn=functools.partial(
        jax.tree_util.tree_map, s.gather), gather_fn=s.gather)
    return Placement(
        mesh=mesh, rules=rules, state_shardings=state_sh,
        batch_sharding=NamedSharding(mesh, P(MESH_AXES)), batch_axes=MESH_AXES, model=streamed,
        to_device=lambda t: jax.tree_util.tree_map(s.load, t), to_host=s.to_host_tree,
        streams=True, add_fn=s.add_trees,
        update_fn=streamed_update(tx, cfg.optim.grad_clip, load=s.load, store=s.store,
                                  layers_key=LAYERS))

