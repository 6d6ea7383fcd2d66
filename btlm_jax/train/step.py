"""The pure train and eval steps: loss, gradients (with accumulation), clipping and update.

No I/O and no Python-side randomness; everything is a function of (state, batch). The driver in
:mod:`btlm_jax.train.loop` jits these with explicit shardings.
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


def train_step(state: TrainState, batch, *, model: BTLM, tx: optax.GradientTransformation,
               lr_schedule, grad_accum_steps: int = 1):
    """One optimizer step. The loss is the mean over all unmasked tokens of the global batch.

    With ``grad_accum_steps = k`` the batch is split into k micro-batches along the batch axis and
    their gradients are summed in a ``lax.scan``; the result equals the one-shot gradient.
    """
    batch = {k: batch[k] for k in BATCH_KEYS}

    def summed(params, mb):
        return loss_sum_and_count(model, params, mb)

    grad_fn = jax.value_and_grad(summed, has_aux=True)
    if grad_accum_steps == 1:
        (loss_sum, count), grads = grad_fn(state.params, batch)
    else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:]),
            batch)

        def body(carry, mb):
            g_acc, l_acc, c_acc = carry
            (l, c), g = grad_fn(state.params, mb)
            return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss_sum, count), _ = jax.lax.scan(
            body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
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
