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
devices, so the update of a layer runs on 1/N of it per device and nothing is all-gathered.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_LAYER, _REST, _SCALAR = "layer", "rest", "scalar"


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


def streamed_update(tx: optax.GradientTransformation, grad_clip: float, *,
                    load: Callable[[Any], Any], store: Callable[[Any], Any],
                    layers_key: str = "layers"):
    """``update(params, opt_state, grad_sums, count) -> (params, opt_state, grad_norm,
    param_norm)``; ``grad_clip`` must be the ``optim.grad_clip`` that ``tx`` was built with
    (0: no clipping)."""
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

        def norm_body(i, acc):
            return acc + sumsq(leafmap(lambda g: mean(load(_at(g, i))), gstack))

        g_norm = jnp.sqrt(jax.lax.fori_loop(0, n_layers, norm_body, sumsq(rest_g)))

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
        def layer_body(i, carry):
            stack, lstate, acc = carry
            p_i = leafmap(lambda x: load(_at(x, i)), stack)
            g_i = leafmap(lambda g: clipped(mean(load(_at(g, i)))), gstack)
            it = iter(lstate)
            st_i = treedef.unflatten([load(_at(next(it), i)) if k == _LAYER else s
                                      if k == _SCALAR else None for k, s in zip(kinds, scalars)])
            upd, st_i = tx.update(_with(params, layers_key, layer=g_i), st_i,
                                  _with(params, layers_key, layer=p_i))
            new_p = optax.apply_updates(p_i, upd[layers_key])
            out_state = [x for x, k in zip(treedef.flatten_up_to(st_i), kinds) if k == _LAYER]
            stack = leafmap(lambda s, v: _put(s, store(v), i), stack, new_p)
            lstate = [_put(s, store(v), i) for s, v in zip(lstate, out_state)]
            return stack, lstate, acc + sumsq(new_p)

        stack, layer_state, p_sq = jax.lax.fori_loop(
            0, n_layers, layer_body, (stack, layer_state, p_sq))

        it = iter(layer_state)
        merged = [next(it) if k == _LAYER else (store(n) if k == _REST else n)
                  for k, n in zip(kinds, new_leaves)]
        new_params = {**new_rest, layers_key: stack}
        new_params = {k: new_params[k] for k in params}
        return new_params, treedef.unflatten(merged), g_norm, jnp.sqrt(p_sq)

    return update
