"""The weight-streaming layout (``mesh.layout=weight_streaming``): an approximation of Cerebras.

On Cerebras the weights and optimizer state live off the wafer (MemoryX); each layer's weights
stream in for the forward pass and again for the backward pass, gradients stream back, and the
optimizer update runs off the wafer; the batch is split data-parallel over the systems. Here:

- parameters and optimizer state are replicated in *host* memory (JAX memory kind
  ``pinned_host``) on every device; nothing of the model is resident on the devices between steps;
- the non-layer weights (embedding, final norm) are moved to the devices at the start of the step;
  each layer's weights are moved inside the layer scan (``BTLM.layer_params_fn``), under
  rematerialisation, so the backward pass moves them again instead of keeping all layers on the
  devices; the transpose of that move sends each layer's gradient back to host memory;
- the optimizer update (clipping, AdamW, weight decay) reads the state from host memory and writes
  it back there (see :meth:`StreamingLayout.via_device` for why it is not ``compute_on`` host);
- the batch is sharded over every device of the mesh (pure data parallel).

It computes the same function as the standard layout, so the losses are equal (tested).
Backends without a host memory space fall back to device memory with a log line; the program
is then the standard data-parallel one.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btlm_jax.models.btlm import BTLM
from btlm_jax.parallel.mesh import LOGICAL_RULES, MESH_AXES

log = logging.getLogger(__name__)

HOST_KINDS = ("pinned_host", "unpinned_host")


def host_memory_kind(mesh: Mesh) -> str | None:
    """The host memory kind the devices can address, or None (then weights stay on device)."""
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


class StreamingModel(BTLM):
    """``BTLM`` whose ``apply`` moves weights from host memory to the devices as they are used.

    Same parameters and the same function as :class:`BTLM`; only where the weights live differs.
    The layer stack is moved one layer at a time by ``layer_params_fn`` inside the scan.
    """

    device_sharding: Any = None

    def apply(self, variables, *args, **kwargs):
        params = dict(variables["params"])
        to_dev = functools.partial(_move, sharding=self.device_sharding)
        # everything except the scanned layer stack moves now (embedding, final norm, head)
        moved = {k: (v if k == "layers" else to_dev(v)) for k, v in params.items()}
        return super().apply({**variables, "params": moved}, *args, **kwargs)


def _move(tree, sharding):
    if sharding is None:
        return tree
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


class StreamingLayout:
    """Shardings and the compiled-step pieces of the weight-streaming layout on ``mesh``."""

    def __init__(self, model_cfg, mesh: Mesh):
        self.mesh = mesh
        self.host_kind = host_memory_kind(mesh)
        self.device_kind = _device_memory_kind(mesh)
        if self.host_kind is None:
            print("[btlm_jax] mesh.layout=weight_streaming: this backend "
                  f"({jax.default_backend()}) has no host memory space; parameters and optimizer "
                  "state stay in device memory (plain data parallel)", flush=True)
            self.state_sharding = NamedSharding(mesh, P())
            self.device_sharding = None
        else:
            self.state_sharding = NamedSharding(mesh, P(), memory_kind=self.host_kind)
            self.device_sharding = NamedSharding(mesh, P(), memory_kind=self.device_kind)
        self.batch_sharding = NamedSharding(mesh, P(MESH_AXES))
        self.batch_axes = MESH_AXES
        # activations: batch over every device, nothing else sharded (pure data parallel)
        self.rules = tuple((name, MESH_AXES if name == "batch" else None)
                           for name, _ in LOGICAL_RULES)
        self.model = StreamingModel(
            model_cfg, layer_params_fn=functools.partial(_move, sharding=self.device_sharding),
            device_sharding=self.device_sharding)

    def state_shardings(self, abstract_state):
        """Parameters and optimizer state in host memory, replicated; the step counter on device."""
        host = jax.tree_util.tree_map(lambda _: self.state_sharding, abstract_state)
        return host.replace(step=NamedSharding(self.mesh, P()))

    def via_device(self, fn):
        """Runs ``fn`` on device copies of its (host-resident) inputs; results go back to host.

        jax 0.10.2's ``compute_on("device_host")`` rejects functions whose inputs live in host
        memory as soon as they create constants (optax does, e.g. in ``tree.norm``), so the
        optimizer update is computed on the devices inside the same program, between a move in
        and a move out; the state still lives in host memory between steps.
        """
        if self.host_kind is None:
            return fn

        def run(*args):
            out = fn(*_move(args, self.device_sharding))
            return _move(out, self.state_sharding)
        return run


def train_step(state, batch, *, layout: StreamingLayout, tx: optax.GradientTransformation,
               lr_schedule, grad_accum_steps: int = 1):
    """The weight-streaming train step; same numbers as :func:`btlm_jax.train.step.train_step`.

    The forward/backward runs on the devices with weights streamed in per layer; the gradients
    arrive in host memory, where the optimizer update runs.
    """
    from btlm_jax.train.step import BATCH_KEYS, loss_sum_and_count

    model = layout.model
    batch = {k: batch[k] for k in BATCH_KEYS}
    grad_fn = jax.value_and_grad(lambda p, mb: loss_sum_and_count(model, p, mb), has_aux=True)
    to_host = functools.partial(_move, sharding=layout.state_sharding
                                if layout.host_kind is not None else None)
    add = layout.via_device(lambda a, b: jax.tree_util.tree_map(jnp.add, a, b))
    if grad_accum_steps == 1:
        (loss_sum, count), grads = grad_fn(state.params, batch)
        grads = to_host(grads)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
            batch)
        grads, loss_sum, count = None, jnp.float32(0), jnp.float32(0)
        # a Python loop (not a scan): each micro-batch's gradients go to host memory and are
        # summed there, so no stacked gradient buffer lives on the devices
        for i in range(grad_accum_steps):
            mb = jax.tree_util.tree_map(lambda x, i=i: x[i], micro)
            (l, c), g = grad_fn(state.params, mb)
            g = to_host(g)
            grads = g if grads is None else add(grads, g)
            loss_sum, count = loss_sum + l, count + c

    def update(params, opt_state, grads, count):
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, grad_norm, optax.tree.norm(params)

    count_h = to_host(count)
    params, opt_state, grad_norm, param_norm = layout.via_device(update)(
        state.params, state.opt_state, grads, count_h)
    metrics = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "lr": lr_schedule(state.step),
        "num_tokens": count,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_model(layout: StreamingLayout) -> nn.Module:
    return layout.model
