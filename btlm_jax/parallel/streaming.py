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
- the optimizer update (clipping, AdamW, weight decay) is computed on the devices between the
  placement's ``to_device`` and ``to_host`` hooks of the one train step
  (:func:`btlm_jax.train.step.train_step`): jax 0.10.2's ``compute_on("device_host")`` rejects
  host-memory inputs as soon as the function creates constants, which optax does;
- the batch is sharded over every device of the mesh (pure data parallel).

It computes the same function as the standard layout, so the losses are equal (tested).
Backends without a host memory space fall back to device memory with a log line; the program
is then the standard data-parallel one.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btlm_jax.models.btlm import BTLM
from btlm_jax.parallel.mesh import MESH_AXES

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


def placement(cfg, mesh: Mesh, model, abstract_state, rules, tx):
    """The weight-streaming :class:`~btlm_jax.parallel.sharding.Placement` on ``mesh``.

    Parameters and optimizer state replicated in host memory, the step counter on the devices,
    the batch over every device; ``to_device`` / ``to_host`` are the moves the train step makes
    around the optimizer update and for each micro-batch's gradients.
    """
    from btlm_jax.parallel.sharding import Placement

    del model, tx  # the streamed model is built here from the config
    host_kind = host_memory_kind(mesh)
    if host_kind is None:
        print("[btlm_jax] mesh.layout=weight_streaming: this backend "
              f"({jax.default_backend()}) has no host memory space; parameters and optimizer "
              "state stay in device memory (plain data parallel)", flush=True)
        home, device = NamedSharding(mesh, P()), None
    else:
        home = NamedSharding(mesh, P(), memory_kind=host_kind)
        device = NamedSharding(mesh, P(), memory_kind=_device_memory_kind(mesh))
    state_sh = jax.tree_util.tree_map(lambda _: home, abstract_state)
    state_sh = state_sh.replace(step=NamedSharding(mesh, P()))
    # activations: batch over every device, nothing else sharded (pure data parallel)
    names = [name for name, _ in rules]
    rules = tuple((name, MESH_AXES if name == "act_batch" else None) for name in names)
    streamed = StreamingModel(cfg.model, layer_params_fn=functools.partial(_move, sharding=device),
                              device_sharding=device)
    moves = device is not None
    return Placement(
        mesh=mesh, rules=rules, state_shardings=state_sh,
        batch_sharding=NamedSharding(mesh, P(MESH_AXES)), batch_axes=MESH_AXES, model=streamed,
        to_device=functools.partial(_move, sharding=device),
        to_host=functools.partial(_move, sharding=home if moves else None), streams=moves)
