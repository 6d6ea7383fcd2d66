"""A configurable GPT-style decoder covering BTLM-3B-8K and the Cerebras-GPT family.

BTLM: pre-LayerNorm blocks, ALiBi, SwiGLU, biases on QKV / attention output / FFN, tied
embeddings, muP. Cerebras-GPT (GPT-3 style): learned absolute positions and a GELU MLP, same code
(``model.position = "learned"``, ``model.activation = "gelu"``).

Functional Linen: ``logits = BTLM(cfg.model).apply({"params": params}, tokens)``. Parameters carry
logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``, ``norm``, ``layers``) that
:mod:`btlm_jax.parallel.mesh` maps to mesh axes; layers are stacked with ``nn.scan``.

Physical padding (``model.pad_multiple``, default 128): the arrays along the ``vocab`` and ``mlp``
axes are rounded up to a multiple of it (vocabulary 50257 -> 50304, SwiGLU 6826 -> 6912), so every
matmul has aligned dimensions (1.6x the step rate of the 1.3B model on an H200). The *logical*
model does not change: initial values are drawn at the logical shape and padded with zeros
(same seed, same logical parameters), padded FFN units and embedding rows get exactly zero
gradients so they stay zero under any optimizer that maps a zero gradient and a zero parameter
to a zero update (AdamW, weight decay, clipping), and :meth:`BTLM.logits_from_hidden` -- the one
place logits are made -- slices the padded logits off, so every consumer (loss, sampling,
perplexity, the harness, ``load_model``) sees ``[..., vocab_size]``. The parameter-tree side
(logical <-> physical trees, counts, checks) is :mod:`btlm_jax.models.padding`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from btlm_jax.models import attention as attention_lib
from btlm_jax.models.alibi import effective_slopes
from btlm_jax.models.mup import mup_scales
from btlm_jax.models.padding import physical_sizes

# The mesh the activation sharding constraints refer to (set by the training program around
# tracing, see :func:`activation_mesh`). Passed explicitly to Flax instead of a global mesh, so
# the parameters' own boxes inside the layer scan stay unconstrained.
_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh):
    """Within this context the model's activations are constrained to ``mesh`` by the logical
    axis rules in force (``act_batch``, ``act_length``, ``act_embed``, ``act_mlp``, ...)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x, axes):
    """``nn.with_logical_constraint`` on the activation mesh (a no-op outside one)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    return nn.with_logical_constraint(x, axes, mesh=mesh)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _init(std: float, axes: tuple[str | None, ...], logical: tuple[int | None, ...] = ()):
    """Truncated normal clipped at 2 sigma (sigma of the untruncated normal, as in PyTorch).

    ``logical`` (one entry per axis, None = the physical size) draws the values at the logical
    shape and pads them with zeros to the physical one, so a padded model starts from the same
    logical parameters as an unpadded one with the same seed.
    """
    init = jax.nn.initializers.truncated_normal(std, lower=-2.0, upper=2.0)
    if any(n is not None for n in logical):
        init = _drawn_at(init, logical)
    return nn.with_logical_partitioning(init, axes)


def _drawn_at(init, logical):
    def padded_init(key, shape, dtype=jnp.float32):
        want = tuple(s if n is None else n for s, n in zip(shape, logical))
        return jnp.pad(init(key, want, dtype), [(0, s - w) for s, w in zip(shape, want)])
    return padded_init


def _zeros(axes):
    return nn.with_logical_partitioning(jax.nn.initializers.zeros, axes)


def _ones(axes):
    return nn.with_logical_partitioning(jax.nn.initializers.ones, axes)


def remat_policy(name: str):
    """Named rematerialisation policies (``model.remat``)."""
    cp = jax.checkpoint_policies
    if name == "minimal":
        return cp.dots_with_no_batch_dims_saveable
    if name == "full":
        return cp.nothing_saveable
    if name == "offload":
        return cp.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
    if name == "minimal_flash":  # MaxText's idea: minimal, plus what the attention backward
        # needs from its forward (output and log-sum-exp of flash / pallas), so the backward
        # pass does not rerun the attention forward
        return cp.save_from_both_policies(
            cp.dots_with_no_batch_dims_saveable,
            cp.save_only_these_names("attention_residual", "attention_lse"))
    # policies by the names the model tags with checkpoint_name: keep those, recompute the rest
    if name in _SAVED_NAMES:
        return cp.save_only_these_names(*_SAVED_NAMES[name])
    raise ValueError(f"model.remat={name!r} has no policy (use none, minimal, minimal_flash, "
                     "full, offload, "
                     + ", ".join(_SAVED_NAMES) + ")")


_SAVED_NAMES = {
    "save_qkv": ("query", "key", "value"),
    "save_attention_out": ("attention",),
    "save_qkv_attention_out": ("query", "key", "value", "attention"),
}


def _layer_norm(cfg, name):
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype],
        scale_init=_ones(("norm",)), bias_init=_zeros(("norm",)), name=name)


class Attention(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x, ctx, cache=None, cache_index=None):
        """Returns (output, new_cache). Without ``cache`` the keys/values are those of ``x``.

        With a KV ``cache`` ({"k", "v"}: [B, S, heads, d_head]) the new keys/values are written
        at slots ``[cache_index, cache_index + T)`` and the queries attend over all S slots.
        ``ctx`` is what :func:`btlm_jax.models.attention.prepare` built for ``cfg.attention``
        (positions, segment ids and slopes, or a dense mask and bias), shared by all layers.
        """
        cfg = self.cfg
        sc = mup_scales(cfg)
        n_heads, d_head = cfg.n_heads, cfg.d_model // cfg.n_heads
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]

        def proj(name):
            return nn.DenseGeneral(
                features=(n_heads, d_head), use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype,
                kernel_init=_init(sc.hidden_std, ("embed", "heads", "kv")),
                bias_init=_zeros(("heads", "kv")), name=name)(x)

        q, k, v = proj("query"), proj("key"), proj("value")
        q, k, v = (checkpoint_name(t, n) for t, n in ((q, "query"), (k, "key"), (v, "value")))
        new_cache = None
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
        out = attention_lib.attend(cfg.attention, q, k, v, ctx, sc.attn_scale,
                                   *_attention_blocks(cfg))
        out = checkpoint_name(out, "attention")
        out = nn.DenseGeneral(
            features=cfg.d_model, axis=(-2, -1), use_bias=cfg.use_bias, dtype=dtype,
            param_dtype=pdtype, kernel_init=_init(sc.out_proj_std, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)), name="out")(out)
        return out, new_cache


class Mlp(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        sc = mup_scales(cfg)
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]

        d_ff, d_ff_phys = physical_sizes(cfg)["mlp"]

        def dense(features, std, axes, name, logical):
            # padded units: zero weights and biases, so silu(0) * 0 = gelu(0) = 0 and zero rows
            # of wo; their gradients are exactly zero (see the module docstring)
            return nn.Dense(
                features, use_bias=cfg.use_bias, dtype=dtype, param_dtype=pdtype,
                kernel_init=_init(std, axes, logical), bias_init=_zeros((axes[-1],)), name=name)

        wi = functools.partial(dense, d_ff_phys, sc.hidden_std, ("embed", "mlp"),
                               logical=(None, d_ff))
        if cfg.activation == "swiglu":
            h = nn.silu(wi("wi_0")(x)) * wi("wi_1")(x)
        else:
            h = nn.gelu(wi("wi")(x), approximate=(cfg.activation == "gelu_tanh"))
        h = constrain(checkpoint_name(h, "mlp_hidden"), ("act_batch", "act_length", "act_mlp"))
        return dense(cfg.d_model, sc.out_proj_std, ("mlp", "embed"), "wo", (d_ff, None))(h)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    cfg: Any

    @nn.compact
    def __call__(self, x, ctx, cache=None, cache_index=None):
        h, new_cache = Attention(self.cfg, name="attn")(
            _layer_norm(self.cfg, "ln_1")(x), ctx, cache, cache_index)
        x = x + h
        x = x + Mlp(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x))
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        return x, new_cache


def attention_mask(segment_ids, positions, q_positions=None, q_segment_ids=None):
    """Boolean [B, 1, Tq, Tk]: causal (by position) and within the same segment."""
    qs = segment_ids if q_segment_ids is None else q_segment_ids
    qp = positions if q_positions is None else q_positions
    return attention_lib.dense_mask(qs, qp, segment_ids, positions)


def _attention_blocks(cfg):
    """(block_q, block_k) of the blockwise implementations (``model.attention_block_q/k``)."""
    return (int(getattr(cfg, "attention_block_q", 512)),
            int(getattr(cfg, "attention_block_k", 512)))


def init_cache(model_cfg, batch_size: int, length: int, dtype=None) -> dict:
    """An empty KV cache for :meth:`BTLM.decode` holding ``length`` positions per sequence."""
    d_head = model_cfg.d_model // model_cfg.n_heads
    dtype = DTYPES[model_cfg.dtype] if dtype is None else dtype
    shape = (model_cfg.n_layers, batch_size, length, model_cfg.n_heads, d_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "positions": jnp.zeros((batch_size, length), jnp.int32),
            "segment_ids": jnp.zeros((batch_size, length), jnp.int32)}


class BTLM(nn.Module):
    """The decoder. ``__call__`` returns float32 logits [B, L, vocab] (or hidden states)."""

    cfg: Any
    # Optional function applied to each layer's parameters inside the layer scan (before remat,
    # so the backward pass re-applies it). The weight-streaming layout uses it to move one
    # layer's weights from host memory to the devices at a time (btlm_jax/parallel/streaming.py);
    # such a block is always rematerialised (model.remat=none: nothing saved but the carry), so
    # the backward pass moves the layer again instead of keeping every layer's copy.
    layer_params_fn: Any = None

    def setup(self):
        cfg = self.cfg
        sc = mup_scales(cfg)
        pdtype = DTYPES[cfg.param_dtype]
        self.scales = sc
        vocab, vocab_phys = physical_sizes(cfg)["vocab"]
        self.embed = nn.Embed(
            vocab_phys, cfg.d_model, dtype=DTYPES[cfg.dtype], param_dtype=pdtype,
            embedding_init=_init(sc.embed_std, ("vocab", "embed"), (vocab, None)), name="embed")
        if cfg.position == "learned":
            self.pos_embed = nn.Embed(
                cfg.max_seq_len, cfg.d_model, dtype=DTYPES[cfg.dtype], param_dtype=pdtype,
                embedding_init=_init(sc.embed_std, (None, "embed")), name="pos_embed")
        block = Block
        if self.layer_params_fn is not None:
            block = nn.map_variables(block, "params", trans_in_fn=self.layer_params_fn)
        if cfg.remat != "none" or self.layer_params_fn is not None:
            policy = (remat_policy(cfg.remat) if cfg.remat != "none"
                      else jax.checkpoint_policies.nothing_saveable)
            block = nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True},
                in_axes=(nn.broadcast, 0, nn.broadcast), length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg, name="layers")
        else:
            self.blocks = [block(cfg, name=f"layers_{i}") for i in range(cfg.n_layers)]
        self.ln_f = _layer_norm(cfg, "ln_f")
        if not cfg.tie_embeddings:
            self.lm_head = nn.Dense(
                vocab_phys, use_bias=False, dtype=DTYPES[cfg.dtype], param_dtype=pdtype,
                kernel_init=_init(sc.hidden_std, ("embed", "vocab"), (None, vocab)),
                name="lm_head")

    def __call__(self, tokens, segment_ids=None, positions=None, alibi_scale=1.0,
                 return_hidden=False):
        """tokens [B, L] int32; segment_ids (0 = padding) and positions [B, L] are optional.

        ``alibi_scale`` divides the ALiBi slopes (position interpolation); it multiplies with the
        config's fixed ``alibi_scaling``. With ``return_hidden`` the final-LayerNorm outputs are
        returned instead of logits (for a chunked loss; see :meth:`logits_from_hidden`).
        """
        cfg = self.cfg
        b, length = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        x = self._embed(tokens, positions)
        # key_len for the slopes: the T keys of this forward
        ctx = self._attention_inputs(positions, segment_ids, positions, segment_ids, alibi_scale,
                                     length, 0)
        if cfg.scan_layers:
            x, _ = self.layers(x, ctx, None, None)
        else:
            for blk in self.blocks:
                x, _ = blk(x, ctx)
        x = self.ln_f(x)
        if return_hidden:
            return x
        return self.logits_from_hidden(x)

    def _embed(self, tokens, positions):
        x = self.embed(tokens)
        if self.cfg.position == "learned":
            x = x + self.pos_embed(positions)
        x = x * self.scales.embed_mult
        return constrain(x, ("act_batch", "act_length", "act_embed"))

    def _attention_inputs(self, q_positions, q_segment_ids, k_positions, k_segment_ids,
                          alibi_scale, key_len, q_offset):
        """The per-forward attention context (see :func:`attention_lib.prepare`). ``key_len`` is
        the number of key positions the slopes are computed for (:func:`effective_slopes`)."""
        cfg = self.cfg
        slopes = (effective_slopes(cfg, key_len, alibi_scale) if cfg.position == "alibi"
                  else None)
        return attention_lib.prepare(cfg.attention, slopes, q_positions, q_segment_ids,
                                     k_positions, k_segment_ids, q_offset, DTYPES[cfg.dtype])

    def decode(self, tokens, cache, cache_index, segment_ids=None, positions=None,
               alibi_scale=1.0):
        """Incremental forward with a KV cache: returns (logits [B, T, vocab], new cache).

        ``tokens`` [B, T] are written to cache slots ``[cache_index, cache_index + T)`` (a
        prefill is T = prompt length, a decode step T = 1). ``cache`` comes from
        :func:`init_cache`: ``k``/``v`` [n_layers, B, S, heads, d_head] plus the ``positions``
        and ``segment_ids`` [B, S] of every slot (segment 0 = empty or padding, never attended
        to by real tokens). The ALiBi bias is recomputed from the cached positions at every step
        (keys are stored without it), so ``alibi_scale`` may differ from the prefill's. The
        logits equal those of :meth:`__call__` on the whole sequence.
        """
        cfg = self.cfg
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
        k_pos = jax.lax.dynamic_update_slice(
            cache["positions"], positions.astype(jnp.int32), (0, cache_index))
        k_seg = jax.lax.dynamic_update_slice(
            cache["segment_ids"], segment_ids.astype(jnp.int32), (0, cache_index))
        x = self._embed(tokens, positions)
        # key_len for the slopes: the slots filled so far, this call's tokens included (a traced
        # scalar), so a length-dependent scaling matches a full forward over the same tokens
        ctx = self._attention_inputs(positions, segment_ids, k_pos, k_seg, alibi_scale,
                                     cache_index + t, cache_index)
        kv = {"k": cache["k"], "v": cache["v"]}
        if cfg.scan_layers:
            x, new_kv = self.layers(x, ctx, kv, cache_index)
        else:
            ks, vs = [], []
            for i, blk in enumerate(self.blocks):
                x, c = blk(x, ctx, {"k": kv["k"][i], "v": kv["v"][i]}, cache_index)
                ks.append(c["k"])
                vs.append(c["v"])
            new_kv = {"k": jnp.stack(ks), "v": jnp.stack(vs)}
        x = self.ln_f(x)
        logits = self.logits_from_hidden(x)
        return logits, {"k": new_kv["k"], "v": new_kv["v"], "positions": k_pos,
                        "segment_ids": k_seg}

    def logits_from_hidden(self, x):
        """Float32 logits [..., vocab_size] from final hidden states: the only place logits are
        made. The product runs over the physical (padded) vocabulary; the padded columns are
        sliced off here, so no consumer ever sees them."""
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(x)
        else:
            logits = self.lm_head(x)
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        vocab = int(self.cfg.vocab_size)
        if logits.shape[-1] != vocab:
            logits = logits[..., :vocab]
        return logits.astype(jnp.float32) * self.scales.output_mult
