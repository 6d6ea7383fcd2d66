"""Attention implementations with ALiBi, causal and segment (document packing) masks.

All of them compute, for query ``i`` and key ``j`` of the same batch row,

    softmax_j( scale * q_i . k_j  -  m_h * (pos_i - pos_j) )   over keys with
    pos_j <= pos_i and seg_j == seg_i,

where ``m_h`` are the slopes of :func:`btlm_jax.models.alibi.effective_slopes` (position
interpolation and ``alibi_scaling`` already divided in) and positions restart inside each packed
document. ``model.attention`` picks the implementation:

- ``xla``: dense ``jax.nn.dot_product_attention`` with the *key-only* bias ``m_h * pos_j`` of shape
  [B, H, 1, S] in float32. By softmax's shift invariance the per-row term ``-m_h * pos_i`` drops
  out, so this is exact (also with packing) and costs no [T, T] bias. Scores are still [T, S].
- ``cudnn``: dense, through cuDNN, with the full [B, H, T, S] bias in the compute dtype (cuDNN takes
  a materialised bias).
- ``flash``: blockwise attention in pure JAX: an online softmax over key blocks for each query
  block, a ``jax.custom_vjp`` whose backward pass recomputes the blocks, key blocks that lie wholly
  in the causal future skipped; bias and masks are made per block from positions and segment ids,
  so memory is O(T x block) instead of O(T^2). Runs on every backend.
- ``pallas``: the same algorithm as Pallas kernels (forward, dK/dV and dQ), the bias computed in
  the kernel; compiled through Triton on GPUs, run in interpret mode elsewhere (slow, for tests).

Block skipping assumes what every caller here guarantees: keys and queries are laid out in time
order, query ``i`` sits at key index ``q_offset + i``, and inside a segment positions increase
with the index (training, packed documents and the KV cache all satisfy it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from btlm_jax.models.alibi import full_alibi_bias, key_only_alibi_bias

IMPLEMENTATIONS = ("xla", "cudnn", "flash", "pallas")
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite "minus infinity" for masked scores
_F32 = jnp.float32


def dense_mask(q_segment_ids, q_positions, k_segment_ids, k_positions):
    """Boolean [B, 1, Tq, Tk]: causal by position and within the same segment."""
    causal = q_positions[:, :, None] >= k_positions[:, None, :]
    same = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    return (causal & same)[:, None, :, :]


def prepare(impl, slopes, q_positions, q_segment_ids, k_positions, k_segment_ids, q_offset=0,
            dtype=_F32):
    """What the layers need to attend (built once per forward, shared by every layer).

    ``slopes`` [H] float32 (None: no ALiBi, e.g. learned positions). ``q_offset`` is the key index
    of the first query (0 in training, the cache slot in decoding). The dense implementations get a
    materialised mask and bias here; the blockwise ones only positions and segment ids.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={impl!r}: must be one of {', '.join(IMPLEMENTATIONS)}")
    if impl in ("xla", "cudnn"):
        mask = dense_mask(q_segment_ids, q_positions, k_segment_ids, k_positions)
        if slopes is None:
            bias = None
        elif impl == "xla":
            bias = key_only_alibi_bias(slopes, k_positions)
        else:
            bias = full_alibi_bias(slopes, q_positions, k_positions).astype(dtype)
        return {"mask": mask, "bias": bias}
    return {"slopes": slopes, "q_pos": q_positions.astype(jnp.int32),
            "k_pos": k_positions.astype(jnp.int32), "q_seg": q_segment_ids.astype(jnp.int32),
            "k_seg": k_segment_ids.astype(jnp.int32), "q_offset": q_offset}


def attend(impl, q, k, v, ctx, scale, block_q=512, block_k=512):
    """q [B, T, H, D], k / v [B, S, H, D], ``ctx`` from :func:`prepare` -> [B, T, H, D]."""
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, bias=ctx["bias"], mask=ctx["mask"], scale=scale,
            implementation=None if impl == "xla" else "cudnn")
    if impl == "pallas":  # Triton tiles: larger blocks overflow shared memory
        block_q, block_k = min(block_q, 128), min(block_k, 128)
    fn = flash_attention if impl == "flash" else pallas_attention
    return fn(q, k, v, ctx["slopes"], ctx["q_pos"], ctx["k_pos"], ctx["q_seg"], ctx["k_seg"],
              q_offset=ctx["q_offset"], scale=scale, block_q=block_q, block_k=block_k)


# ------------------------------------------------------------------------ shared block math
def _block_scores(q, k, slopes, qp, kp, qs, ks, scale):
    """Masked scores of one (query block, key block) pair, float32.

    q [B, H, bq, D], k [B, H, bk, D], slopes [H], qp / qs [B, bq], kp / ks [B, bk].
    The bias is formed from the position difference (exact in float32 at any length).
    """
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=_F32) * scale
    rel = (kp[:, None, :] - qp[:, :, None]).astype(_F32)  # j - i  (<= 0 where unmasked)
    s = s + slopes[None, :, None, None] * rel[:, None]
    mask = (qp[:, :, None] >= kp[:, None, :]) & (qs[:, :, None] == ks[:, None, :])
    return jnp.where(mask[:, None], s, _NEG)


def _pad_axis(x, axis, size, value):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _check_blocks(block_q, block_k):
    for name, b in (("attention_block_q", block_q), ("attention_block_k", block_k)):
        if not isinstance(b, int) or b <= 0:
            raise ValueError(f"model.{name}={b!r}: must be a positive integer")


def _hi_block(i, q_offset, bq, bk, nk):
    """Number of key blocks query block ``i`` must visit (those not wholly in its future)."""
    return jnp.minimum(nk, (q_offset + (i + 1) * bq + bk - 1) // bk)


def _lo_block(j, q_offset, bq, bk):
    """First query block that can see key block ``j``."""
    return jnp.maximum(0, (j * bk - q_offset) // bq)


# ---------------------------------------------------------------------------- flash (JAX)
def flash_attention(q, k, v, slopes, q_pos, k_pos, q_seg, k_seg, *, q_offset=0, scale=1.0,
                    block_q=512, block_k=512, causal_skip=True):
    """Blockwise attention; q [B, T, H, D], k / v [B, S, H, D] -> [B, T, H, D].

    ``slopes`` [H] (None: no ALiBi). T and S need not be multiples of the blocks (padded here;
    padded keys are masked, padded queries dropped). ``q_offset`` may be traced.
    """
    _check_blocks(block_q, block_k)
    b, t, h, d = q.shape
    s_len = k.shape[1]
    bq, bk = min(block_q, t), min(block_k, s_len)
    tp, sp = -(-t // bq) * bq, -(-s_len // bk) * bk
    if slopes is None:
        slopes = jnp.zeros((h,), _F32)
    qt = _pad_axis(q.transpose(0, 2, 1, 3), 2, tp, 0)
    kt = _pad_axis(k.transpose(0, 2, 1, 3), 2, sp, 0)
    vt = _pad_axis(v.transpose(0, 2, 1, 3), 2, sp, 0)
    qp, qs = _pad_axis(q_pos, 1, tp, 0), _pad_axis(q_seg, 1, tp, -2)
    kp, ks = _pad_axis(k_pos, 1, sp, 0), _pad_axis(k_seg, 1, sp, -1)
    off = jnp.asarray(q_offset, jnp.int32)
    out = _flash(qt, kt, vt, slopes.astype(_F32), qp, kp, qs, ks, off, float(scale), bq, bk,
                 bool(causal_skip))
    return out[:, :, :t].transpose(0, 2, 1, 3)


def _flash_forward(q, k, v, slopes, qp, kp, qs, ks, off, scale, bq, bk, causal):
    b, h, tp, d = q.shape
    nq, nk = tp // bq, k.shape[2] // bk

    def q_block(i):
        qb = lax.dynamic_slice_in_dim(q, i * bq, bq, 2)
        qpb = lax.dynamic_slice_in_dim(qp, i * bq, bq, 1)
        qsb = lax.dynamic_slice_in_dim(qs, i * bq, bq, 1)

        def body(j, carry):
            m, l, acc = carry
            kb, vb, s = _key_block(j, bk, qb, k, v, slopes, qpb, kp, qsb, ks, scale)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])
            l = alpha * l + p.sum(-1)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bhqk,bhkd->bhqd", p.astype(v.dtype), vb, preferred_element_type=_F32)
            return m_new, l, acc

        init = (jnp.full((b, h, bq), _NEG, _F32), jnp.zeros((b, h, bq), _F32),
                jnp.zeros((b, h, bq, d), _F32))
        hi = _hi_block(i, off, bq, bk, nk) if causal else nk
        m, l, acc = lax.fori_loop(0, hi, body, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    outs, lses = lax.map(q_block, jnp.arange(nq))  # [nq, B, H, bq, ...]
    out = outs.transpose(1, 2, 0, 3, 4).reshape(b, h, tp, d)
    lse = lses.transpose(1, 2, 0, 3).reshape(b, h, tp)
    return out, lse


def _key_block(j, bk, qb, k, v, slopes, qpb, kp, qsb, ks, scale):
    """Key/value block ``j`` (of ``bk`` keys) and its masked, biased scores against ``qb``."""
    kb = lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
    vb = lax.dynamic_slice_in_dim(v, j * bk, bk, 2)
    s = _block_scores(qb, kb, slopes, qpb, lax.dynamic_slice_in_dim(kp, j * bk, bk, 1),
                      qsb, lax.dynamic_slice_in_dim(ks, j * bk, bk, 1), scale)
    return kb, vb, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11, 12))
def _flash(q, k, v, slopes, qp, kp, qs, ks, off, scale, bq, bk, causal):
    return _flash_forward(q, k, v, slopes, qp, kp, qs, ks, off, scale, bq, bk, causal)[0]


def _flash_fwd(q, k, v, slopes, qp, kp, qs, ks, off, scale, bq, bk, causal):
    out, lse = _flash_forward(q, k, v, slopes, qp, kp, qs, ks, off, scale, bq, bk, causal)
    return out, (q, k, v, slopes, qp, kp, qs, ks, off, out, lse)


def _flash_bwd(scale, bq, bk, causal, res, g):
    q, k, v, slopes, qp, kp, qs, ks, off, out, lse = res
    b, h, tp, d = q.shape
    sp = k.shape[2]
    nq, nk = tp // bq, sp // bk
    delta = jnp.sum(g.astype(_F32) * out.astype(_F32), -1)  # [B, H, Tp]

    def q_step(carry, i):
        dk, dv = carry
        sl = functools.partial(lax.dynamic_slice_in_dim, start_index=i * bq, slice_size=bq)
        qb, gb = sl(q, axis=2), sl(g, axis=2)
        lse_b, delta_b = sl(lse, axis=2), sl(delta, axis=2)
        qpb, qsb = sl(qp, axis=1), sl(qs, axis=1)

        def body(j, c):
            dq_b, dk, dv = c
            kb, vb, s = _key_block(j, bk, qb, k, v, slopes, qpb, kp, qsb, ks, scale)
            p = jnp.exp(s - lse_b[..., None])
            dp = jnp.einsum("bhqd,bhkd->bhqk", gb, vb, preferred_element_type=_F32)
            ds = p * (dp - delta_b[..., None])
            dq_b = dq_b + scale * jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k.dtype), kb,
                                             preferred_element_type=_F32)
            dk_j = scale * jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q.dtype), qb,
                                      preferred_element_type=_F32)
            dv_j = jnp.einsum("bhqk,bhqd->bhkd", p.astype(g.dtype), gb,
                              preferred_element_type=_F32)
            dk = lax.dynamic_update_slice_in_dim(
                dk, lax.dynamic_slice_in_dim(dk, j * bk, bk, 2) + dk_j, j * bk, 2)
            dv = lax.dynamic_update_slice_in_dim(
                dv, lax.dynamic_slice_in_dim(dv, j * bk, bk, 2) + dv_j, j * bk, 2)
            return dq_b, dk, dv

        hi = _hi_block(i, off, bq, bk, nk) if causal else nk
        dq_b, dk, dv = lax.fori_loop(0, hi, body, (jnp.zeros((b, h, bq, d), _F32), dk, dv))
        return (dk, dv), dq_b

    zeros = jnp.zeros((b, h, sp, d), _F32)
    (dk, dv), dqs = lax.scan(q_step, (zeros, zeros), jnp.arange(nq))
    dq = dqs.transpose(1, 2, 0, 3, 4).reshape(b, h, tp, d)
    # positions, segment ids and the offset are integers; the slopes are not trained
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), jnp.zeros_like(slopes),
            None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------- pallas kernels
def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def _pl():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl, plgpu


def _kernel_scores(q, k, slope, qp, kp, qs, ks, scale, plgpu):
    """In-kernel version of :func:`_block_scores` for one head: q [bq, D], k [bk, D]."""
    s = plgpu.dot(q, k.T).astype(_F32) * scale
    s = s + slope[:, None] * (kp[None, :] - qp[:, None]).astype(_F32)
    mask = (qp[:, None] >= kp[None, :]) & (qs[:, None] == ks[None, :])
    return jnp.where(mask, s, _NEG)


def _pallas_fwd_kernel(q_ref, k_ref, v_ref, sl_ref, qp_ref, qs_ref, kp_ref, ks_ref, o_ref, lse_ref,
                       *, scale, bq, bk, nk, q_offset, causal):
    pl, plgpu = _pl()
    i = pl.program_id(2)
    q, slope, qp, qs = q_ref[...], sl_ref[...], qp_ref[...], qs_ref[...]
    d = q.shape[-1]

    def body(j, carry):
        acc, m, l = carry
        blk = pl.ds(j * bk, bk)
        s = _kernel_scores(q, k_ref[blk, :], slope, qp, kp_ref[blk], qs, ks_ref[blk], scale, plgpu)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[blk, :]
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v).astype(_F32)
        return acc, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, d), _F32), jnp.full((bq,), _NEG, _F32), jnp.zeros((bq,), _F32))
    hi = jnp.minimum(nk, lax.div(q_offset + (i + 1) * bq + bk - 1, bk)) if causal else nk
    acc, m, l = lax.fori_loop(0, hi, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _pallas_dkdv_kernel(q_ref, k_ref, v_ref, sl_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref,
                        lse_ref, dl_ref, dk_ref, dv_ref, *, scale, bq, bk, nq, q_offset, causal):
    pl, plgpu = _pl()
    j = pl.program_id(2)
    k, v, kp, ks = k_ref[...], v_ref[...], kp_ref[...], ks_ref[...]
    d = k.shape[-1]

    def body(i, carry):
        dk, dv = carry
        blk = pl.ds(i * bq, bq)
        q, do = q_ref[blk, :], do_ref[blk, :]
        s = _kernel_scores(q, k, sl_ref[blk], qp_ref[blk], kp, qs_ref[blk], ks, scale, plgpu)
        p = jnp.exp(s - lse_ref[blk][:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype).T, do).astype(_F32)
        dp = plgpu.dot(do, v.T).astype(_F32)
        ds = p * (dp - dl_ref[blk][:, None])
        dk = dk + scale * plgpu.dot(ds.astype(q.dtype).T, q).astype(_F32)
        return dk, dv

    lo = jnp.maximum(0, lax.div(j * bk - q_offset, bq)) if causal else 0
    dk, dv = lax.fori_loop(lo, nq, body, (jnp.zeros((bk, d), _F32), jnp.zeros((bk, d), _F32)))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _pallas_dq_kernel(q_ref, k_ref, v_ref, sl_ref, qp_ref, qs_ref, kp_ref, ks_ref, do_ref, lse_ref,
                      dl_ref, dq_ref, *, scale, bq, bk, nk, q_offset, causal):
    pl, plgpu = _pl()
    i = pl.program_id(2)
    q, do, slope, qp, qs = q_ref[...], do_ref[...], sl_ref[...], qp_ref[...], qs_ref[...]
    lse, dl = lse_ref[...], dl_ref[...]

    def body(j, dq):
        blk = pl.ds(j * bk, bk)
        k, v = k_ref[blk, :], v_ref[blk, :]
        s = _kernel_scores(q, k, slope, qp, kp_ref[blk], qs, ks_ref[blk], scale, plgpu)
        p = jnp.exp(s - lse[:, None])
        ds = p * (plgpu.dot(do, v.T).astype(_F32) - dl[:, None])
        return dq + scale * plgpu.dot(ds.astype(k.dtype), k).astype(_F32)

    hi = jnp.minimum(nk, lax.div(q_offset + (i + 1) * bq + bk - 1, bk)) if causal else nk
    dq = lax.fori_loop(0, hi, body, jnp.zeros(q.shape, _F32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _pallas_specs(pl, b_idx_q, b_idx_k, bq, bk, tp, sp, d):
    """BlockSpecs for (q, k, v, slopes_rows, qp, qs, kp, ks) given which of q / k is blocked."""
    q_shape = (None, None, bq if b_idx_q else tp, d)
    k_shape = (None, None, bk if b_idx_k else sp, d)
    qi = (lambda b, h, n: (b, h, n, 0)) if b_idx_q else (lambda b, h, n: (b, h, 0, 0))
    ki = (lambda b, h, n: (b, h, n, 0)) if b_idx_k else (lambda b, h, n: (b, h, 0, 0))
    rq = (lambda b, h, n: (b, n)) if b_idx_q else (lambda b, h, n: (b, 0))
    rk = (lambda b, h, n: (b, n)) if b_idx_k else (lambda b, h, n: (b, 0))
    sq = (lambda b, h, n: (h, n)) if b_idx_q else (lambda b, h, n: (h, 0))
    qrow, krow = (None, bq if b_idx_q else tp), (None, bk if b_idx_k else sp)
    return [pl.BlockSpec(q_shape, qi), pl.BlockSpec(k_shape, ki), pl.BlockSpec(k_shape, ki),
            pl.BlockSpec(qrow, sq), pl.BlockSpec(qrow, rq), pl.BlockSpec(qrow, rq),
            pl.BlockSpec(krow, rk), pl.BlockSpec(krow, rk)]


def _pallas_call(kernel, grid, in_specs, out_specs, out_shape, interpret, d):
    pl, plgpu = _pl()
    params = None if interpret else plgpu.CompilerParams(num_warps=4 if d <= 64 else 8,
                                                         num_stages=2)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, compiler_params=params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12, 13))
def _pallas(q, k, v, sl, qp, kp, qs, ks, scale, bq, bk, q_offset, causal, interpret):
    return _pallas_forward(q, k, v, sl, qp, kp, qs, ks, scale, bq, bk, q_offset, causal,
                           interpret)[0]


def _pallas_forward(q, k, v, sl, qp, kp, qs, ks, scale, bq, bk, q_offset, causal, interpret):
    pl, _ = _pl()
    b, h, tp, d = q.shape
    sp = k.shape[2]
    kern = functools.partial(_pallas_fwd_kernel, scale=scale, bq=bq, bk=bk, nk=sp // bk,
                             q_offset=q_offset, causal=causal)
    out_specs = [pl.BlockSpec((None, None, bq, d), lambda b_, h_, n: (b_, h_, n, 0)),
                 pl.BlockSpec((None, None, bq), lambda b_, h_, n: (b_, h_, n))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, tp), _F32)]
    out, lse = _pallas_call(kern, (b, h, tp // bq),
                            _pallas_specs(pl, True, False, bq, bk, tp, sp, d),
                            out_specs, out_shape, interpret, d)(q, k, v, sl, qp, qs, kp, ks)
    return out, lse


def _pallas_fwd(q, k, v, sl, qp, kp, qs, ks, scale, bq, bk, q_offset, causal, interpret):
    out, lse = _pallas_forward(q, k, v, sl, qp, kp, qs, ks, scale, bq, bk, q_offset, causal,
                               interpret)
    return out, (q, k, v, sl, qp, kp, qs, ks, out, lse)


def _pallas_bwd(scale, bq, bk, q_offset, causal, interpret, res, g):
    pl, _ = _pl()
    q, k, v, sl, qp, kp, qs, ks, out, lse = res
    b, h, tp, d = q.shape
    sp = k.shape[2]
    delta = jnp.sum(g.astype(_F32) * out.astype(_F32), -1)
    row_q = lambda blocked: pl.BlockSpec(  # noqa: E731
        (None, None, bq if blocked else tp),
        (lambda b_, h_, n: (b_, h_, n)) if blocked else (lambda b_, h_, n: (b_, h_, 0)))
    do_q = lambda blocked: pl.BlockSpec(  # noqa: E731
        (None, None, bq if blocked else tp, d),
        (lambda b_, h_, n: (b_, h_, n, 0)) if blocked else (lambda b_, h_, n: (b_, h_, 0, 0)))
    args = (q, k, v, sl, qp, qs, kp, ks, g, lse, delta)
    kv_spec = pl.BlockSpec((None, None, bk, d), lambda b_, h_, n: (b_, h_, n, 0))
    dkdv = functools.partial(_pallas_dkdv_kernel, scale=scale, bq=bq, bk=bk, nq=tp // bq,
                             q_offset=q_offset, causal=causal)
    dk, dv = _pallas_call(
        dkdv, (b, h, sp // bk),
        _pallas_specs(pl, False, True, bq, bk, tp, sp, d) + [do_q(False), row_q(False),
                                                             row_q(False)],
        [kv_spec, kv_spec], [jax.ShapeDtypeStruct(k.shape, k.dtype),
                             jax.ShapeDtypeStruct(v.shape, v.dtype)], interpret, d)(*args)
    dqk = functools.partial(_pallas_dq_kernel, scale=scale, bq=bq, bk=bk, nk=sp // bk,
                            q_offset=q_offset, causal=causal)
    dq = _pallas_call(
        dqk, (b, h, tp // bq),
        _pallas_specs(pl, True, False, bq, bk, tp, sp, d) + [do_q(True), row_q(True), row_q(True)],
        do_q(True), jax.ShapeDtypeStruct(q.shape, q.dtype), interpret, d)(*args)
    return dq, dk, dv, None, None, None, None, None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def pallas_attention(q, k, v, slopes, q_pos, k_pos, q_seg, k_seg, *, q_offset=0, scale=1.0,
                     block_q=64, block_k=64, interpret=None):
    """Pallas attention; same contract as :func:`flash_attention`.

    Block sizes are rounded to powers of two (Triton), the head dimension padded to one (>= 16).
    ``interpret`` defaults to True off GPUs. Causal block skipping needs a static ``q_offset``;
    with a traced one (decoding) every key block is visited and the mask alone does the work.
    No gradient flows to the slopes (they are not trained).
    """
    _check_blocks(block_q, block_k)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, t, h, d = q.shape
    s_len = k.shape[1]
    bq = min(_next_pow2(block_q), max(16, _next_pow2(t)))
    bk = min(_next_pow2(block_k), max(16, _next_pow2(s_len)))
    tp, sp, dp = -(-t // bq) * bq, -(-s_len // bk) * bk, max(16, _next_pow2(d))
    causal = isinstance(q_offset, int)
    if slopes is None:
        slopes = jnp.zeros((h,), _F32)

    def heads_first(x, n):
        return _pad_axis(_pad_axis(x.transpose(0, 2, 1, 3), 2, n, 0), 3, dp, 0)

    sl = jnp.broadcast_to(slopes.astype(_F32)[:, None], (h, tp))
    out = _pallas(heads_first(q, tp), heads_first(k, sp), heads_first(v, sp), sl,
                  _pad_axis(q_pos, 1, tp, 0), _pad_axis(k_pos, 1, sp, 0),
                  _pad_axis(q_seg, 1, tp, -2), _pad_axis(k_seg, 1, sp, -1),
                  float(scale), bq, bk, q_offset if causal else 0, causal, bool(interpret))
    return out[:, :, :t, :d].transpose(0, 2, 1, 3)
