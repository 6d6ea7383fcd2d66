"""The optimizer update one layer at a time (weight streaming): the configured ``tx``, streamed.

:func:`streamed_update` returns ``update(params, opt_state, grad_sums, count)`` that computes the
same new parameters and state as the one-shot update of the train step,

    grads = grad_sums / max(count, 1)
    updates, opt_state = tx.update(grads, opt_state, params)      # tx = chain(clip, adamw...)
    params = optax.apply_updates(params, updates)

while holding only one layer's slice of parameters, moments and gradient on the devices at a time:

1. the global gradient norm is accumulated first (non-layer leaves, then a loop over the layer
   axis of the stacked ``layers`` subtree moving each layer's gradient in and reducing it);
2. the gradients are clipped with that norm exactly as ``optax.clip_by_global_norm`` does;
3. ``tx`` itself (the same transformation object: AdamW, muP groups, masks, schedules) is applied
   to the non-layer leaves, then inside a ``lax.fori_loop`` to each layer's slice, with the other
   leaves left out of the trees (``None``). The clip inside ``tx`` sees already clipped slices,
   whose norm is at most the threshold, so it leaves them alone. The optimizer's scalar state
   (counts, schedule bookkeeping) is advanced once: every slice starts from the same counts.

``load`` / ``store`` move one (unstacked) leaf to the devices and back to the state's home; the
weight-streaming placement (:mod:`btlm_jax.parallel.streaming`) keeps each slice sharded over the
devices, so the update of a layer runs on 1/N of it per device and nothing is all-gathered. With
``prefetch`` both layer loops are double-buffered (:func:`layer_loop`): layer ``i + 1``'s slices
move in while layer ``i`` is updated and moved out.

:func:`host_update` is the other place the update can run (``mesh.stream_update=host``): the
one-shot update of the train step, compiled for the host CPU (``compute_on('device_host')``) and
run on the host-resident state where it lies, as Cerebras' MemoryX does; nothing but scalars
crosses the link.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_LAYER, _REST, _SCALAR = "layer", "rest", "scalar"


def layer_loop(n: int, fetch, body, init, prefetch: bool):
    """``carry = body(i, fetch(i, carry), carry)`` for ``i`` in ``0 .. n-1``.

    With ``prefetch`` the loop is double-buffered: iteration ``i`` issues ``fetch(i + 1)`` (from
    the carry as it enters the iteration) before running ``body(i)`` on the slice fetched one
    iteration earlier, so the move depends on nothing ``body(i)`` computes and can overlap it; the
    last iteration is peeled off, so every slice moves exactly once. ``body`` sees the same values
    either way (the results are bit-equal).
    """
    if not prefetch or n < 2:
        return jax.lax.fori_loop(0, n, lambda i, c: body(i, fetch(i, c), c), init)

    def step(i, c):
        cur, carry = c
        nxt = fetch(i + 1, carry)
        return nxt, body(i, cur, carry)

    cur, carry = jax.lax.fori_loop(0, n - 1, step, (fetch(0, init), init))
    return body(n - 1, cur, carry)


def _split_kinds(tx, opt_state, params, layers_key):
    """The optimizer state's leaves and, per leaf, whether it is a layer-stack parameter copy,
    another parameter copy, or a non-parameter field (count, schedule state)."""
    where = {k: jax.tree_util.tree_map(lambda _, k=k: _LAYER if k == layers_key else _REST, v)
             for k, v in params.items()}
    kinds = optax.tree_map_params(tx, lambda _, w: w, opt_state, where,
                                  transform_non_params=lambda _: _SCALAR)
    leaves, treedef = jax.tree_util.tree_flatten(opt_state)
    return leaves, treedef, treedef.flatten_up_to(kinds)


def _at(x, i):
    """Layer ``i`` of a stacked leaf (a dynamic slice)."""
    return jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _put(x, v, i):
    """``x`` with layer ``i`` replaced by ``v`` (an in-place dynamic-update-slice in a loop)."""
    return jax.lax.dynamic_update_index_in_dim(x, v.astype(x.dtype), i, 0)


def _with(params_like: dict, layers_key: str, rest=None, layer=None) -> dict:
    """A tree with the parameters' top-level keys: the layer stack part from ``layer``, the others
    from ``rest``; a missing part is a tree of ``None`` (left out of every optax tree map)."""
    out = {}
    for k, v in params_like.items():
        src = layer if k == layers_key else (None if rest is None else rest[k])
        out[k] = src if src is not None else jax.tree_util.tree_map(lambda _: None, v)
    return out


def leafmap(f, *trees):
    return jax.tree_util.tree_map(f, *trees)


def sumsq(tree):
    """Sum of squares of every leaf, in float32."""
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32)))
                for x in jax.tree_util.tree_leaves(tree)), jnp.float32(0))


def _global_norm(rest_g, gstack, mean, load, prefetch: bool):
    """The norm of the mean gradient: the non-layer leaves (already loaded), then the stacked
    layer gradients one layer at a time."""
    n_layers = jax.tree_util.tree_leaves(gstack)[0].shape[0]
    return jnp.sqrt(layer_loop(
        n_layers, lambda i, _: leafmap(lambda g: load(_at(g, i)), gstack),
        lambda i, g_i, acc: acc + sumsq(leafmap(mean, g_i)), sumsq(rest_g), prefetch))


def streamed_update(tx: optax.GradientTransformation, grad_clip: float, *,
                    load: Callable[[Any], Any], store: Callable[[Any], Any],
                    layers_key: str = "layers", prefetch: bool = False):
    """``update(params, opt_state, grad_sums, count) -> (params, opt_state, grad_norm,
    param_norm)``; ``grad_clip`` must be the ``optim.grad_clip`` that ``tx`` was built with
    (0: no clipping). ``prefetch``: double-buffered layer loops (:func:`layer_loop`)."""
    clip = float(grad_clip)

    def update(params, opt_state, grads, count):
        denom = jnp.maximum(count, 1.0)
        stack = params[layers_key]
        gstack = grads[layers_key]
        n_layers = jax.tree_util.tree_leaves(stack)[0].shape[0]
        rest_p = {k: v for k, v in params.items() if k != layers_key}
        rest_g = {k: v for k, v in grads.items() if k != layers_key}

        def mean(g):
            return g / denom.astype(g.dtype)

        # 1. the global norm of the mean gradient, one layer at a time
        rest_g = leafmap(lambda g: mean(load(g)), rest_g)
        g_norm = _global_norm(rest_g, gstack, mean, load, prefetch)

        def clipped(g):  # optax.clip_by_global_norm, applied leaf by leaf
            if clip <= 0:
                return g
            return jax.lax.select(g_norm < clip, g, (g / g_norm.astype(g.dtype)) * clip)

        leaves, treedef, kinds = _split_kinds(tx, opt_state, params, layers_key)
        scalars = [load(x) if k == _SCALAR else None for x, k in zip(leaves, kinds)]

        # 2. non-layer parameters (embedding, final norm, ...); advances the scalar state once
        st = treedef.unflatten([load(x) if k == _REST else s if k == _SCALAR else None
                                for x, k, s in zip(leaves, kinds, scalars)])
        p_rest = leafmap(load, rest_p)
        upd, st = tx.update(_with(params, layers_key, rest=leafmap(clipped, rest_g)), st,
                            _with(params, layers_key, rest=p_rest))
        new_rest = optax.apply_updates(_with(params, layers_key, rest=p_rest), upd)
        new_rest = {k: v for k, v in new_rest.items() if k != layers_key}
        new_leaves = treedef.flatten_up_to(st)
        p_sq = sumsq(new_rest)
        new_rest = leafmap(store, new_rest)

        # 3. the layer stack, one layer per iteration, written back in place
        layer_state = [x for x, k in zip(leaves, kinds) if k == _LAYER]

        def fetch(i, carry):
            stack, lstate, _ = carry
            return (leafmap(lambda x: load(_at(x, i)), stack),
                    leafmap(lambda g: load(_at(g, i)), gstack),
                    [load(_at(x, i)) for x in lstate])

        def layer_body(i, moved, carry):
            stack, lstate, acc = carry
            p_i, g_i, lst_i = moved
            g_i = leafmap(lambda g: clipped(mean(g)), g_i)
            it = iter(lst_i)
            st_i = treedef.unflatten([next(it) if k == _LAYER else s
                                      if k == _SCALAR else None for k, s in zip(kinds, scalars)])
            upd, st_i = tx.update(_with(params, layers_key, layer=g_i), st_i,
                                  _with(params, layers_key, layer=p_i))
            new_p = optax.apply_updates(p_i, upd[layers_key])
            out_state = [x for x, k in zip(treedef.flatten_up_to(st_i), kinds) if k == _LAYER]
            stack = leafmap(lambda s, v: _put(s, store(v), i), stack, new_p)
            lstate = [_put(s, store(v), i) for s, v in zip(lstate, out_state)]
            return stack, lstate, acc + sumsq(new_p)

        stack, layer_state, p_sq = layer_loop(
            n_layers, fetch, layer_body, (stack, layer_state, p_sq), prefetch)

        it = iter(layer_state)
        merged = [next(it) if k == _LAYER else (store(n) if k == _REST else n)
                  for k, n in zip(kinds, new_leaves)]
        new_params = {**new_rest, layers_key: stack}
        new_params = {k: new_params[k] for k in params}
        return new_params, treedef.unflatten(merged), g_norm, jnp.sqrt(p_sq)

    return update


def host_update(tx: optax.GradientTransformation, *, to_host: Callable[[Any], Any],
                to_device: Callable[[Any], Any]):
    """``update(params, opt_state, grad_sums, count) -> (params, opt_state, grad_norm,
    param_norm)`` computed on the host CPU, where the weight-streaming state lives.

    The train step's one-shot update (mean gradient, ``tx`` with its clip, apply) under
    ``compute_on('device_host')``: XLA compiles it for the host and runs it on the host-resident
    buffers, so neither the state nor the gradients cross the link; ``to_host`` moves the device
    scalar ``count`` in, ``to_device`` moves the two norms out. On XLA:CPU host and device are the
    same processor and the annotation changes nothing.
    """
    from jax.experimental.compute_on import compute_on

    def relabel(tree, space):
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, space), tree)

    @jax.jit
    def one_shot(params, opt_state, grads, count):
        # Inside the host computation every value is typed as the compute's own memory; optax
        # creates constants (zeros_like ...) there, which JAX types as device memory, so the
        # host-resident inputs are relabelled alike on the way in and back on the way out.
        params, opt_state, grads = relabel((params, opt_state, grads), jax.memory.Space.Device)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        g_norm, p_norm = optax.tree.norm(grads), optax.tree.norm(params)
        params, opt_state = relabel((params, opt_state), jax.memory.Space.Host)
        return params, opt_state, g_norm, p_norm

    def update(params, opt_state, grads, count):
        with compute_on("device_host"):
            params, opt_state, g_norm, p_norm = one_shot(params, opt_state, grads,
                                                         to_host(count))
        g_norm, p_norm = to_device((g_norm, p_norm))
        return params, opt_state, g_norm, p_norm

    return update
