"""Bidirectional QRNN punctuation model (Flax linen).

Token projections -> dense bottleneck -> [concat projected acoustic features] -> stacked
bidirectional QRNN layers -> per-token classifier.

QRNN layer (Bradbury et al. 2017), fo-pooling, per direction:
    Z = tanh(conv(X)), F = sigmoid(conv(X)), O = sigmoid(conv(X))   (causal conv, width k)
    c_t = f_t * c_{t-1} + (1 - f_t) * z_t,   h_t = o_t * tanh(c_t)
The recurrence is linear in c, so it runs as ``jax.lax.associative_scan`` over pairs (a, b)
meaning c -> a * c + b. Zoneout (training only) sets a random subset of forget gates to 1, i.e.
keeps the previous cell state. Padded positions get f = 0, z = 0 (state reset to c_0 = 0), which
makes the reversed pass over a right-padded batch exact.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def fo_pool(f: jax.Array, z: jax.Array) -> jax.Array:
    """c_t = f_t c_{t-1} + (1 - f_t) z_t with c_0 = 0, along axis 1, as a parallel scan."""

    def combine(x, y):
        a1, b1 = x
        a2, b2 = y
        return a1 * a2, a2 * b1 + b2

    _, c = jax.lax.associative_scan(combine, (f, (1.0 - f) * z), axis=1)
    return c


class QRNNDirection(nn.Module):
    """One direction of a QRNN layer over right-padded (B, T, D) input."""

    hidden: int
    kernel_width: int = 3
    zoneout: float = 0.0
    reverse: bool = False

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        m = mask[..., None].astype(x.dtype)
        if self.reverse:
            x, m = x[:, ::-1], m[:, ::-1]
        x = x * m
        gates = nn.Conv(3 * self.hidden, (self.kernel_width,), padding=[(self.kernel_width - 1, 0)],
                        name="conv")(x)
        z, f, o = jnp.split(gates, 3, axis=-1)
        z, f, o = jnp.tanh(z), nn.sigmoid(f), nn.sigmoid(o)
        if train and self.zoneout > 0:
            keep_state = jax.random.bernoulli(self.make_rng("dropout"), self.zoneout, f.shape)
            f = jnp.where(keep_state, 1.0, f)
        f, z = f * m, z * m
        h = o * jnp.tanh(fo_pool(f, z)) * m
        return h[:, ::-1] if self.reverse else h


class BiQRNNLayer(nn.Module):
    hidden: int
    kernel_width: int = 3
    zoneout: float = 0.0

    @nn.compact
    def __call__(self, x, mask, *, train: bool):
        kw = dict(hidden=self.hidden, kernel_width=self.kernel_width, zoneout=self.zoneout)
        fwd = QRNNDirection(**kw, reverse=False, name="fwd")(x, mask, train=train)
        bwd = QRNNDirection(**kw, reverse=True, name="bwd")(x, mask, train=train)
        return jnp.concatenate([fwd, bwd], axis=-1)


class PunctuationModel(nn.Module):
    """Per-token punctuation logits. ``acoustic=False`` is the text-only variant (same code,
    the acoustic branch is simply not built)."""

    n_classes: int = 4
    bottleneck_dim: int = 64
    acoustic_dim: int = 16
    hidden_dim: int = 64
    n_layers: int = 2
    kernel_width: int = 3
    zoneout: float = 0.1
    dropout: float = 0.1
    acoustic: bool = True

    @nn.compact
    def __call__(self, proj, acoustic_feats, mask, *, train: bool = False):
        x = nn.relu(nn.Dense(self.bottleneck_dim, name="bottleneck")(proj.astype(jnp.float32)))
        if self.acoustic:
            a = nn.relu(nn.Dense(self.acoustic_dim, name="acoustic")(acoustic_feats))
            x = jnp.concatenate([x, a], axis=-1)
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        for i in range(self.n_layers):
            x = BiQRNNLayer(self.hidden_dim, self.kernel_width, self.zoneout, name=f"qrnn_{i}")(
                x, mask, train=train)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.n_classes, name="classifier")(x)


def from_config(mcfg, *, acoustic: bool, n_classes: int = 4) -> PunctuationModel:
    return PunctuationModel(
        n_classes=n_classes, bottleneck_dim=mcfg.bottleneck_dim, acoustic_dim=mcfg.acoustic_dim,
        hidden_dim=mcfg.hidden_dim, n_layers=mcfg.n_layers, kernel_width=mcfg.kernel_width,
        zoneout=mcfg.zoneout, dropout=mcfg.dropout, acoustic=acoustic)
