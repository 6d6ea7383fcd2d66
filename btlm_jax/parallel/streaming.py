"""The weight-streaming layout (``mesh.layout=weight_streaming``): an approximation of Cerebras.

On Cerebras the weights and optimizer state live off the wafer (MemoryX); each layer's weights
stream in for the forward pass and again for the backward pass, gradients stream back, and the
optimizer update runs off the wafer; the batch is split data-parallel over the systems. Here:

- parameters and optimizer state live in *host* memory (JAX memory kind ``pinned_host``), each
  leaf sharded over all devices of the mesh along its largest divisible dimension (for the
  stacked layers: a dimension other than the layer axis), so the hosts hold one copy between
  them; nothing of the model is resident on the devices between steps;
- the non-layer weights (embedding, final norm) are all-gathered onto the devices at the start of
  the step (:meth:`Streamer.gather`, whose backward reduce-scatters the gradient to the host);
- the layer stack runs as one streamed loop with its own VJP (:func:`streamed_stack`): the
  forward moves layer ``i``'s weights in, runs the block and keeps only the layer's input; the
  backward moves each layer in again, recomputes the block, and reduce-scatters the layer's
  gradient back to host memory (the block is always rematerialised, whatever ``model.remat``
  says, so device memory holds O(1) layers of weights);
- **overlap** (``mesh.stream_overlap``): with ``prefetch`` (default) the loops are
  double-buffered: the iteration that computes layer ``i`` also issues the move of layer
  ``i + 1`` (forward; ``i - 1`` in the backward), carried to the next iteration, so the copy
  depends on nothing the compute produces and XLA's asynchronous host-to-device copies can run
  under the compute. The forward's last prefetch is the backward's first layer (kept on the
  device across the head). With ``prefetch_writeback`` the backward also sends layer ``i``'s
  gradient to the host one iteration later, under layer ``i - 1``'s compute (into a host buffer
  XLA must place in host memory: not yet compiled on a GPU, hence not the default). ``none``
  moves each layer inside the iteration that uses it. All three compute the same numbers
  (bit-equal; tested);
- the optimizer update streams too (``mesh.stream_update``, :mod:`btlm_jax.optim.streamed`):
  ``device`` runs the configured optax transform one layer at a time on device copies (the
  global gradient norm first; double-buffered like the layers when overlap is on); ``host`` runs
  the whole one-shot update on the host CPU (``compute_on('device_host')``, as Cerebras'
  MemoryX does), moving no optimizer state at all. Gradient accumulation adds the micro-batches'
  gradients layer by layer (``add_fn``);
- the batch is sharded over every device of the mesh (pure data parallel).

It computes the same function as the standard layout, so the losses are equal (tested). A
backend without a host memory space is an error, not a silent fallback. What crosses the
host-device link per step is :func:`transfer_bytes`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btlm_jax.models.btlm import BTLM, Block
from btlm_jax.optim.streamed import _at, _put, host_update, layer_loop, streamed_update
from btlm_jax.parallel.mesh import MESH_AXES, ShardingError

HOST_KINDS = ("pinned_host", "unpinned_host")
LAYERS = "layers"
OVERLAPS = ("none", "prefetch", "prefetch_writeback")
# The streamed loops read layer i + 1 of a host stack and write layer i of it in place (the
# double-buffered optimizer update and accumulation). XLA's default copy insertion cannot order
# the two and copies the whole stack every iteration (on XLA:CPU 1.54x instead of 1.36x device
# memory from 4 to 16 layers at d_model 1024); its region analysis sees they are disjoint in time.
COMPILER_OPTIONS = {"cpu": {"xla_cpu_copy_insertion_use_region_analysis": True},
                    "gpu": {"xla_gpu_copy_insertion_use_region_analysis": True}}
UPDATES = ("device", "host")


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
    def fetch(self, v):
        """Host shard -> the devices, all-gathered (no VJP of its own)."""
        dev = self._sh(leaf_spec(v.shape, self.n), self.device_kind)
        # The barrier keeps the all-gather's operand layout (gathered dimension major) from
        # propagating to the layer stack ``v`` is sliced from: without it XLA relays out each
        # whole stack once per step, a device copy that grows with depth (1.66x from 4 to 16
        # layers at d_model 1024 instead of 1.41x; tests/test_streaming.py).
        v = jax.lax.optimization_barrier(v)
        return jax.lax.with_sharding_constraint(jax.device_put(v, dev),
                                                self._sh(P(), self.device_kind))

    def scatter(self, ct):
        """A full-shape gradient (each device's partial sum) reduce-scattered on the devices."""
        return jax.lax.with_sharding_constraint(
            ct, self._sh(leaf_spec(ct.shape, self.n), self.device_kind))

    def to_home(self, shard):
        """A reduce-scattered gradient to host memory."""
        return jax.device_put(shard, self._sh(leaf_spec(shard.shape, self.n), self.host_kind))

    def gather(self, x):
        """:meth:`fetch` with a VJP that reduce-scatters the gradient back to host memory."""

        @jax.custom_vjp
        def move(v):
            return self.fetch(v)

        def fwd(v):
            return move(v), None

        def bwd(_, ct):
            return (self.to_home(self.scatter(ct)),)

        move.defvjp(fwd, bwd)
        return move(x)

    def fetch_layer(self, stack, i):
        """Layer ``i`` of a stacked tree, on the devices, all-gathered."""
        return jax.tree_util.tree_map(lambda s: self.fetch(_at(s, i)), stack)

    # trees ----------------------------------------------------------------------------------
    def home_spec(self, path_top: str, shape) -> P:
        return stacked_spec(shape, self.n) if path_top == LAYERS else leaf_spec(shape, self.n)

    def to_host_tree(self, tree):
        """A parameter-shaped tree (e.g. gradients) to its host sharding."""
        def put(path, x):
            top = path[0].key if path and isinstance(path[0], jax.tree_util.DictKey) else None
            if top == LAYERS:  # the layer stack's backward already sent these (streamed_stack)
                return x
            return jax.device_put(x, self._sh(self.home_spec(top, x.shape), self.host_kind))
        return jax.tree_util.tree_map_with_path(put, tree)

    def add_trees(self, a, b, prefetch: bool = False):
        """``a + b`` for two host-resident gradient trees, one layer at a time (double-buffered
        with ``prefetch``)."""
        out = {}
        for k in a:
            if k != LAYERS:
                out[k] = jax.tree_util.tree_map(
                    lambda x, y: self.store(self.load(x) + self.load(y)), a[k], b[k])
        if LAYERS in a:
            n_layers = jax.tree_util.tree_leaves(a[LAYERS])[0].shape[0]

            def fetch(i, acc):
                return jax.tree_util.tree_map(lambda s, y: (self.load(_at(s, i)),
                                                            self.load(_at(y, i))), acc, b[LAYERS])

            def body(i, pairs, acc):
                return jax.tree_util.tree_map(
                    lambda s, xy: _put(s, self.store(xy[0] + xy[1]), i), acc, pairs,
                    is_leaf=lambda t: isinstance(t, tuple))

            out[LAYERS] = layer_loop(n_layers, fetch, body, a[LAYERS], prefetch)
        return {k: out[k] for k in a}


def _split_static(tree):
    """(arrays, rebuild): the array leaves of ``tree`` and a function putting new ones back
    (Python scalars such as the attention context's ``q_offset`` stay as they are)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_arr = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def rebuild(arrays):
        it = iter(arrays)
        return treedef.unflatten([next(it) if a else x for x, a in zip(leaves, is_arr)])

    return [x for x, a in zip(leaves, is_arr) if a], rebuild


def streamed_stack(s: Streamer, block, stack, x, ctx, overlap: str = "prefetch"):
    """``x`` through every layer of the host-resident ``stack`` (a tree of [n_layers, ...]
    leaves), ``block(layer_params, x, ctx) -> x`` per layer, moving one layer at a time.

    Its VJP (below) recomputes each block in the backward from the saved layer inputs and returns
    the stack's gradient in host memory. ``overlap`` (``mesh.stream_overlap``): ``none`` moves
    layer ``i`` inside iteration ``i``; ``prefetch`` moves layer ``i + 1`` (forward) or ``i - 1``
    (backward) in iteration ``i``, carried to the next; ``prefetch_writeback`` also delays each
    layer's gradient send by one iteration. The compute is the same in all three.
    """
    if overlap not in OVERLAPS:
        raise ValueError(f"mesh.stream_overlap={overlap!r}: must be one of {', '.join(OVERLAPS)}")
    n = jax.tree_util.tree_leaves(stack)[0].shape[0]
    prefetch = overlap != "none"
    arrays, rebuild = _split_static(ctx)

    def forward(stack, x, arrays, save: bool):
        c = rebuild(arrays)
        if prefetch:
            def body(carry, i):
                h, w = carry
                w_next = s.fetch_layer(stack, jnp.minimum(i + 1, n - 1))  # issued first
                return (block(w, h, c), w_next), (h if save else None)

            (y, w_last), hs = jax.lax.scan(body, (x, s.fetch_layer(stack, 0)), jnp.arange(n))
        else:
            def body(h, i):
                return block(s.fetch_layer(stack, i), h, c), (h if save else None)

            y, hs = jax.lax.scan(body, x, jnp.arange(n))
            w_last = None
        return y, hs, w_last

    def layer_vjp(w, h, c, dy):
        _, pull = jax.vjp(lambda w, h: block(w, h, c), w, h)
        return pull(dy)

    def backward(res, dy):
        stack, hs, w_last, arrays = res
        grads, dx = _stack_backward(s, layer_vjp, stack, hs, w_last, rebuild(arrays), dy,
                                    overlap)
        return grads, dx, [None] * len(arrays)

    @jax.custom_vjp
    def run(stack, x, arrays):
        return forward(stack, x, arrays, save=False)[0]

    def run_fwd(stack, x, arrays):
        y, hs, w_last = forward(stack, x, arrays, save=True)
        return y, (stack, hs, w_last, arrays)

    run.defvjp(run_fwd, backward)
    return run(stack, x, arrays)


def _stack_backward(s: Streamer, layer_vjp, stack, hs, w_last, c, dy, overlap: str):
    """The backward loop of :func:`streamed_stack`, layer ``n - 1`` down to 0: (the stack's
    gradient in host memory, the input's cotangent)."""
    n = jax.tree_util.tree_leaves(stack)[0].shape[0]
    tmap = jax.tree_util.tree_map
    if overlap == "prefetch_writeback":
        # gradient buffer in host memory, written one iteration behind the compute
        home = tmap(lambda v: jax.device_put(jnp.zeros(v.shape, v.dtype), s._sh(
            stacked_spec(v.shape, s.n), s.host_kind)), stack)

        def body(j, carry):
            i = n - 1 - j
            dy, w, pending, home = carry
            w_prev = s.fetch_layer(stack, jnp.maximum(i - 1, 0))  # issued first
            # layer i + 1's gradient leaves now (j = 0 writes zeros that j = 1 overwrites)
            home = tmap(lambda b, g: _put(b, s.to_home(g), jnp.minimum(i + 1, n - 1)),
                        home, pending)
            dw, dx = layer_vjp(w, _at(hs, i), c, dy)
            return dx, w_prev, tmap(s.scatter, dw), home

        pending = tmap(lambda v: s.scatter(jnp.zeros(v.shape[1:], v.dtype)), stack)
        dx, _, pending, home = jax.lax.fori_loop(0, n, body, (dy, w_last, pending, home))
        return tmap(lambda b, g: _put(b, s.to_home(g), 0), home, pending), dx
    if overlap == "prefetch":
        def body(carry, i):
            dy, w = carry
            w_prev = s.fetch_layer(stack, jnp.maximum(i - 1, 0))  # issued first
            dw, dx = layer_vjp(w, _at(hs, i), c, dy)
            return (dx, w_prev), tmap(lambda g: s.to_home(s.scatter(g)), dw)

        (dx, _), grads = jax.lax.scan(body, (dy, w_last), jnp.arange(n), reverse=True)
        return grads, dx

    def body(dy, i):
        dw, dx = layer_vjp(s.fetch_layer(stack, i), _at(hs, i), c, dy)
        return dx, tmap(lambda g: s.to_home(s.scatter(g)), dw)

    dx, grads = jax.lax.scan(body, dy, jnp.arange(n), reverse=True)
    return grads, dx


def _block_fn(model_cfg):
    """One transformer block as a pure function of its parameters (the model's own ``Block``)."""
    def block(w, x, ctx):
        return Block(model_cfg, parent=None).apply({"params": w}, x, ctx)[0]
    return block


class StreamingModel(BTLM):
    """``BTLM`` whose ``apply`` moves weights from host memory to the devices as they are used.

    Same parameters and the same function as :class:`BTLM`; only where the weights live differs.
    The non-layer weights are moved (``gather_fn``) when ``apply`` starts. The forward's call of
    the layer stack goes to ``stack_fn`` (the streamed, double-buffered loop
    :func:`streamed_stack`); decoding with a KV cache keeps the model's own scan, which moves
    each layer inside it (``layer_params_fn``).
    """

    gather_fn: Any = None
    stack_fn: Any = None  # (stacked layer params, x, ctx) -> x

    def setup(self):
        super().setup()
        if self.stack_fn is None or not self.cfg.scan_layers:
            return
        scanned = self.layers

        def layers(x, ctx, cache=None, cache_index=None):
            if cache is not None:
                return scanned(x, ctx, cache, cache_index)
            return self.stack_fn(self.variables["params"][LAYERS], x, ctx), None

        # BTLM.__call__ calls ``self.layers(x, ctx, None, None)``: the attribute is shadowed by
        # a plain function (not a submodule), so the scanned stack keeps its name and parameters.
        object.__setattr__(self, "layers", layers)

    def apply(self, variables, *args, **kwargs):
        params = dict(variables["params"])
        # everything except the scanned layer stack moves now (embedding, final norm, head)
        moved = {k: (v if k == LAYERS else jax.tree_util.tree_map(self.gather_fn, v))
                 for k, v in params.items()}
        return super().apply({**variables, "params": moved}, *args, **kwargs)


def _compiler_options(mesh: Mesh) -> dict | None:
    platform = mesh.devices.flat[0].platform
    opts = COMPILER_OPTIONS.get("gpu" if platform in ("gpu", "cuda", "rocm") else platform)
    return dict(opts) if opts else None


def options(cfg) -> tuple[str, str]:
    """(``mesh.stream_overlap``, ``mesh.stream_update``), validated."""
    overlap = str(cfg.mesh.get("stream_overlap", "prefetch"))
    update = str(cfg.mesh.get("stream_update", "device"))
    if overlap not in OVERLAPS:
        raise ShardingError(f"mesh.stream_overlap={overlap!r}: must be one of "
                            f"{', '.join(OVERLAPS)}")
    if update not in UPDATES:
        raise ShardingError(f"mesh.stream_update={update!r}: must be one of {', '.join(UPDATES)}")
    return overlap, update


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
    overlap, update = options(cfg)
    prefetch = overlap != "none"
    s = Streamer(mesh, host_kind)
    param_sh = jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, s.home_spec(path[0].key, x.shape),
                                      memory_kind=host_kind), abstract_state.params)
    host_rep = NamedSharding(mesh, P(), memory_kind=host_kind)
    opt_sh = optimizer_shardings(tx, abstract_state.opt_state, param_sh, host_rep)
    state_sh = abstract_state.replace(step=NamedSharding(mesh, P()), params=param_sh,
                                      opt_state=opt_sh)
    # activations: batch over every device, nothing else sharded (pure data parallel)
    names = [name for name, _ in rules]
    rules = tuple((name, MESH_AXES if name == "act_batch" else None) for name in names)
    block = _block_fn(cfg.model)
    streamed = StreamingModel(
        cfg.model, layer_params_fn=functools.partial(jax.tree_util.tree_map, s.gather),
        gather_fn=s.gather,
        stack_fn=lambda stack, x, ctx: streamed_stack(s, block, stack, x, ctx, overlap))
    if update == "host":
        update_fn = host_update(tx, to_host=lambda t: jax.tree_util.tree_map(
            lambda x: jax.device_put(x, host_rep), t),
            to_device=lambda t: jax.tree_util.tree_map(
                lambda x: jax.device_put(x, NamedSharding(mesh, P())), t))
    else:
        update_fn = streamed_update(tx, cfg.optim.grad_clip, load=s.load, store=s.store,
                                    layers_key=LAYERS, prefetch=prefetch)
    return Placement(
        mesh=mesh, rules=rules, state_shardings=state_sh,
        batch_sharding=NamedSharding(mesh, P(MESH_AXES)), batch_axes=MESH_AXES, model=streamed,
        to_device=lambda t: jax.tree_util.tree_map(s.load, t), to_host=s.to_host_tree,
        streams=True, add_fn=functools.partial(s.add_trees, prefetch=prefetch),
        update_fn=update_fn, compiler_options=_compiler_options(mesh))


# ------------------------------------------------------------------------------------------
# What crosses the host-device link.


def transfer_bytes(cfg, tx, abstract_state, n_devices: int) -> dict:
    """Bytes one device moves over its host link per train step, from the state's shapes.

    ``layers`` / ``rest``: one device's host shard of the stacked layer parameters / of the other
    parameters (a leaf's shard is 1/n_devices of it where :func:`leaf_spec` splits it, whole where
    it stays replicated); ``state``: likewise for the parameter-shaped optimizer state leaves
    (AdamW's two moments); gradients have the parameters' shapes and dtypes. Per micro-batch
    (``k = train.grad_accum_steps``): the forward moves ``rest`` and the stack in, the backward
    the stack again and sends ``rest`` and the stack's gradients out. Double-buffered, one layer
    more comes in (the forward's last iteration fetches the backward's first layer, kept on the
    device; the backward's last iteration fetches a layer it does not use) and, with
    ``prefetch_writeback``, one layer of zeros more goes out (the first delayed write). Each of
    the ``k - 1`` accumulation passes moves two gradients in and one out. The ``device`` update
    moves the gradients in for the global norm, then parameters, state and gradients in and
    parameters and state out; the ``host`` update moves nothing. Scalars (counts, schedule
    state, the loss) are left out, and so is anything XLA finds it need not move (the backward
    never reads the MLP output projection's bias, ``wo``: no gradient depends on its value).
    """
    overlap, update = options(cfg)
    k = int(cfg.train.grad_accum_steps)
    n_layers = int(cfg.model.n_layers)

    def shard_bytes(x, stacked):
        spec = stacked_spec(x.shape, n_devices) if stacked else leaf_spec(x.shape, n_devices)
        split = any(p is not None for p in spec)
        return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize // (n_devices if split else 1)

    params = abstract_state.params
    is_layer = {key: jax.tree_util.tree_map(lambda _, key=key: key == LAYERS, v)
                for key, v in params.items()}
    layers = sum(shard_bytes(x, True) for x in jax.tree_util.tree_leaves(params[LAYERS]))
    rest = sum(shard_bytes(x, False) for key, v in params.items() if key != LAYERS
               for x in jax.tree_util.tree_leaves(v))
    per_leaf = optax.tree_map_params(tx, shard_bytes, abstract_state.opt_state, is_layer,
                                     transform_non_params=lambda _: 0)
    state = sum(jax.tree_util.tree_leaves(per_leaf))
    one_layer = layers // max(n_layers, 1)
    h2d = k * (rest + 2 * layers + (one_layer if overlap != "none" else 0))
    d2h = k * (rest + layers + (one_layer if overlap == "prefetch_writeback" else 0))
    h2d += (k - 1) * 2 * (rest + layers)
    d2h += (k - 1) * (rest + layers)
    if update == "device":
        h2d += (rest + layers) + (rest + layers) * 2 + state
        d2h += rest + layers + state
    return {"h2d": h2d, "d2h": d2h, "layers": layers, "rest": rest, "state": state}
