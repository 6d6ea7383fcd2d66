"""The pure train and eval steps: loss, gradients (with accumulation), clipping and update.

No I/O and no Python-side randomness; everything is a function of (state, batch).
:class:`btlm_jax.train.program.Program` jits them with explicit shardings and the placement's
hooks (weight streaming's per-layer update and accumulation).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from btlm_jax.models.btlm import BTLM

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def token_losses(model: BTLM, params, batch, alibi_scale=1.0):
    """Per-token cross-entropy [B, L] (float32), unmasked.

    With ``model.cfg.loss_chunk_size > 0`` the logits are computed chunk by chunk along the
    sequence under ``jax.checkpoint``, so the [B, L, vocab] array never exists whole.
    """
    chunk = int(model.cfg.loss_chunk_size)
    if chunk <= 0:
        logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                             batch["positions"], alibi_scale)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    hidden = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                         batch["positions"], alibi_scale, return_hidden=True)
    b, length, d = hidden.shape
    if length % chunk:
        raise ValueError(f"model.loss_chunk_size={chunk} must divide the sequence length {length}")
    hs = hidden.reshape(b, length // chunk, chunk, d).swapaxes(0, 1)
    ts = batch["targets"].reshape(b, length // chunk, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, t):
        logits = model.apply({"params": params}, h, method=BTLM.logits_from_hidden)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t)

    losses = jax.lax.map(lambda xs: one(*xs), (hs, ts))
    return losses.swapaxes(0, 1).reshape(b, length)


def loss_sum_and_count(model, params, batch):
    losses = token_losses(model, params, batch)
    w = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * w), jnp.sum(w)


def _identity(x):
    return x


def _accumulated_grads(grad_fn, params, batch, k: int, to_host, unrolled: bool, add_fn=None):
    """Gradient sums, loss sum and token count over ``k`` micro-batches along the batch axis.

    A ``lax.scan`` by default; ``unrolled`` (weight streaming) uses a Python loop so each
    micro-batch's gradients go to the state's home (``to_host``) and are summed there, with no
    stacked gradient buffer on the devices.
    """
    if k == 1:
        (loss_sum, count), grads = grad_fn(params, batch)
        return to_host(grads), loss_sum, count
    micro = jax.tree_util.tree_map(
        lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)
    if unrolled:
        grads, loss_sum, count = None, jnp.float32(0), jnp.float32(0)
        for i in range(k):
            (l, c), g = grad_fn(params, jax.tree_util.tree_map(lambda x, i=i: x[i], micro))
            g = to_host(g)
            grads = (g if grads is None else add_fn(grads, g) if add_fn is not None
                     else jax.tree_util.tree_map(jnp.add, grads, g))
            loss_sum, count = loss_sum + l, count + c
        return grads, loss_sum, count

    def body(carry, mb):
        g_acc, l_acc, c_acc = carry
        (l, c), g = grad_fn(params, mb)
        return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    return grads, loss_sum, count


def train_step(state: TrainState, batch, *, model: BTLM, tx: optax.GradientTransformation,
               lr_schedule, grad_accum_steps: int = 1, to_device=_identity, to_host=_identity,
               streams: bool = False, update_fn=None, add_fn=None):
    """One optimizer step. The loss is the mean over all unmasked tokens of the global batch.

    With ``grad_accum_steps = k`` the batch is split into k micro-batches along the batch axis and
    their gradients summed; the result equals the one-shot gradient. ``to_device`` / ``to_host``
    are the placement's hooks (identity in the standard layout; weight streaming moves the
    gradients to host memory as they arrive and runs the update on device copies of the state).
    ``update_fn`` / ``add_fn`` (the placement's, weight streaming) replace the update below and
    the micro-batch gradient sum with layer-by-layer streamed versions computing the same.
    """
    batch = {k: batch[k] for k in BATCH_KEYS}
    grad_fn = jax.value_and_grad(lambda p, mb: loss_sum_and_count(model, p, mb), has_aux=True)
    grads, loss_sum, count = _accumulated_grads(
        grad_fn, state.params, batch, grad_accum_steps, to_host, streams, add_fn)

    def update(params, opt_state, grads, count):
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, optax.tree.norm(grads), optax.tree.norm(params)

    if update_fn is not None:
        params, opt_state, grad_norm, param_norm = update_fn(
            state.params, state.opt_state, grads, count)
    else:
        params, opt_state, grad_norm, param_norm = update(
            *to_device((state.params, state.opt_state, grads, to_host(count))))
        params, opt_state = to_host((params, opt_state))
    metrics = {
        "loss": loss_sum / jnp.maximum(count, 1.0),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "lr": lr_schedule(state.step),
        "num_tokens": count,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model: BTLM, num_sources: int, alibi_scale=1.0):
    """Loss sums for one eval batch: total, per source (by ``source_ids``), per position."""
    losses = token_losses(model, params, {k: batch[k] for k in BATCH_KEYS}, alibi_scale)
    w = batch["loss_mask"].astype(jnp.float32)
    onehot = jax.nn.one_hot(batch["source_ids"], num_sources, dtype=jnp.float32) * w[..., None]
    return {
        "loss_sum": jnp.sum(losses * w),
        "count": jnp.sum(w),
        "source_loss_sum": jnp.einsum("bl,bls->s", losses, onehot),
        "source_count": jnp.sum(onehot, axis=(0, 1)),
        "position_loss_sum": jnp.sum(losses * w, axis=0),
        "position_count": jnp.sum(w, axis=0),
    }
