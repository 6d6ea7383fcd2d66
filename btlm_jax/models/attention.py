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
- ``cudnn``: cuDNN's fused attention with its own causal mask and *no bias tensor*: the key-only
  bias is folded into the head dimension (queries get columns of ones, keys the bias
  ``m_h pos_j / scale`` split into bfloat16 pieces that sum to its float32 value, see
  :func:`alibi_columns`), so cuDNN never receives a dense [T, S] bias nor computes its gradient.
  Causal by index: rows must be single sequences (``data.packing=concat``; right padding is
  harmless, packed documents are not: config validation refuses them). Decoding (queries not
  aligned with keys) falls back to ``xla``. cuDNN's built-in ALiBi mask type is not used: on the
  H200 it disagreed with our causal ALiBi (relative error 1.0, ../shared/gpu/README.md).
- ``flash``: blockwise attention in pure JAX: an online softmax over key blocks for each query
  block, a ``jax.custom_vjp`` whose backward pass recomputes the blocks, key blocks that lie wholly
  in the causal future skipped; bias and masks are made per block from positions and segment ids,
  so memory is O(T x block) instead of O(T^2). Runs on every backend.
- ``pallas``: the same algorithm as Pallas kernels (forward, dK/dV and dQ), the bias computed in
  the kernel; compiled through Triton on GPUs, run in interpret mode elsewhere (slow, for tests).
  Tiling from :func:`pallas_blocks` (a pure function of dtype, head dimension, length and shared
  memory); the head dimension is cut into power-of-two chunks (80 = 64 + 16, no padding to 128).
- ``auto``: :func:`resolve` picks one of the above from :data:`AUTO_TABLE`, measured per
  (backend, dtype, length); ``xla`` wherever nothing was measured (CPUs, TPUs, short sequences)
  and on more than one device (a Pallas call is not split by the SPMD partitioner).

Block skipping assumes what every caller here guarantees: keys and queries are laid out in time
order, query ``i`` sits at key index ``q_offset + i``, and inside a segment positions increase
with the index (training, packed documents and the KV cache all satisfy it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from btlm_jax.models.alibi import key_only_alibi_bias

IMPLEMENTATIONS = ("xla", "cudnn", "flash", "pallas")
CHOICES = ("auto",) + IMPLEMENTATIONS
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite "minus infinity" for masked scores
_F32 = jnp.float32


def dense_mask(q_segment_ids, q_positions, k_segment_ids, k_positions):
    """Boolean [B, 1, Tq, Tk]: causal by position and within the same segment."""
    causal = q_positions[:, :, None] >= k_positions[:, None, :]
    same = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    return (causal & same)[:, None, :, :]


# model.attention=auto: (backend, dtype, from this query length on, implementation, evidence).
# A lookup takes the row of the backend and dtype with the largest length <= the query length;
# no row: xla. Figures: one H200, jax 0.11.2, 2026-12-04, causal ALiBi forward + backward,
# 1 x T x 32 heads x 80, bfloat16 (issue 26; ../shared/gpu/README.md; benchmarks/RESULTS.md).
AUTO_TABLE: tuple[tuple[str, str, int, str, str], ...] = (
    ("gpu", "bfloat16", 2048, "pallas",
     "T 2048: pallas 75 TFLOP/s, cudnn (dense bias) 41, xla 38"),
    ("gpu", "bfloat16", 8192, "pallas",
     "T 8192: pallas 120 TFLOP/s, cudnn (dense bias) 56, flash 41, xla 38"),
)


def resolve(impl, dtype, length: int, backend: str | None = None,
            num_devices: int | None = None) -> str:
    """The implementation ``model.attention=impl`` means for ``length`` queries in ``dtype``.

    ``auto`` looks up :data:`AUTO_TABLE` for ``backend`` (default: JAX's); with more than one
    device it stays ``xla`` (a Pallas kernel is one custom call that XLA's SPMD partitioner does
    not split: it would gather the whole batch on every device). Other names pass through.
    """
    if impl not in CHOICES:
        raise ValueError(f"model.attention={impl!r}: must be one of {', '.join(CHOICES)}")
    if impl != "auto":
        return impl
    backend = jax.default_backend() if backend is None else backend
    num_devices = jax.device_count() if num_devices is None else num_devices
    if num_devices > 1:
        return "xla"
    name = jnp.dtype(dtype).name
    best, best_len = "xla", -1
    for be, dt, from_len, choice, _ in AUTO_TABLE:
        if be == backend and dt == name and best_len < from_len <= length:
            best, best_len = choice, from_len
    return best


def prepare(impl, slopes, q_positions, q_segment_ids, k_positions, k_segment_ids, q_offset=0,
            dtype=_F32):
    """What the layers need to attend (built once per forward, shared by every layer).

    ``slopes`` [H] float32 (None: no ALiBi, e.g. learned positions). ``q_offset`` is the key index
    of the first query (0 in training, the cache slot in decoding). The dense implementations get a
    materialised mask and bias here; the blockwise ones only positions and segment ids; ``cudnn``
    the slopes and key positions (or the dense ``xla`` context when decoding).
    """
    impl = resolve(impl, dtype, q_positions.shape[1])
    if impl == "cudnn" and _cudnn_aligned(q_positions, k_positions, q_offset):
        return {"slopes": slopes, "k_pos": k_positions.astype(jnp.int32)}
    if impl in ("xla", "cudnn"):
        mask = dense_mask(q_segment_ids, q_positions, k_segment_ids, k_positions)
        bias = None if slopes is None else key_only_alibi_bias(slopes, k_positions)
        return {"mask": mask, "bias": bias}
    return {"slopes": slopes, "q_pos": q_positions.astype(jnp.int32),
            "k_pos": k_positions.astype(jnp.int32), "q_seg": q_segment_ids.astype(jnp.int32),
            "k_seg": k_segment_ids.astype(jnp.int32), "q_offset": q_offset}


def attend(impl, q, k, v, ctx, scale, block_q=512, block_k=512):
    """q [B, T, H, D], k / v [B, S, H, D], ``ctx`` from :func:`prepare` -> [B, T, H, D].

    ``block_q`` / ``block_k``: the ``flash`` blocks, upper bounds of the ``pallas`` tiling."""
    impl = resolve(impl, q.dtype, q.shape[1])
    if impl in ("xla", "cudnn") and "mask" in ctx:  # (cudnn while decoding: see prepare)
        return jax.nn.dot_product_attention(q, k, v, bias=ctx["bias"], mask=ctx["mask"],
                                            scale=scale)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, ctx["slopes"], ctx["k_pos"], scale)
    fn = flash_attention if impl == "flash" else pallas_attention
    return fn(q, k, v, ctx["slopes"], ctx["q_pos"], ctx["k_pos"], ctx["q_seg"], ctx["k_seg"],
              q_offset=ctx["q_offset"], scale=scale, block_q=block_q, block_k=block_k)


# ---------------------------------------------------------------------------- cudnn
def _cudnn_aligned(q_positions, k_positions, q_offset) -> bool:
    """Queries are the keys (training, a full forward): cuDNN's causal mask by index applies."""
    return (q_positions.shape[1] == k_positions.shape[1] and isinstance(q_offset, int)
            and q_offset == 0)


def alibi_columns(slopes, k_pos, scale, dtype):
    """The key-only ALiBi bias as extra key columns: [B, S, H, n] in ``dtype`` whose sum over the
    last axis is ``m_h * pos_j / scale`` to float32 precision (n = 1 in float32; 3 in bfloat16 or
    float16: the value, the rounding error of that, and the error of that). Against query
    columns of ones, ``scale * (q', k')`` adds exactly ``m_h * pos_j`` to the scores; products
    with one are exact and the attention matmul accumulates in float32."""
    x = (slopes.astype(_F32)[None, None, :] * k_pos.astype(_F32)[:, :, None]) / scale
    if jnp.dtype(dtype) == jnp.float32:
        return x[..., None]
    pieces = []
    for _ in range(3):
        p = x.astype(dtype)
        pieces.append(p)
        x = x - p.astype(_F32)
    return jnp.stack(pieces, -1)


def cudnn_attention(q, k, v, slopes, k_pos, scale, implementation="cudnn"):
    """Causal attention through cuDNN with the ALiBi bias folded into the head dimension (see
    the module docstring); q / k / v [B, T, H, D] -> [B, T, H, D]. The head dimension grows by
    the bias columns, rounded up to a multiple of 8 (cuDNN): 80 -> 88. ``implementation=None``
    runs the same computation through XLA (tests on CPU)."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.attention=cudnn needs an NVIDIA GPU with cuDNN (JAX's backend "
                         f"here is {jax.default_backend()}); use model.attention=auto, xla or flash")
    b, t, h, d = q.shape
    if slopes is None:
        qx, kx = q, k
    else:
        cols = lax.stop_gradient(alibi_columns(slopes, k_pos, scale, k.dtype))
        qx = jnp.concatenate([q, jnp.ones((b, t, h, cols.shape[-1]), q.dtype)], -1)
        kx = jnp.concatenate([k, cols], -1)
    width = -(-qx.shape[-1] // 8) * 8
    qx, kx, vx = (_pad_axis(x, 3, width, 0) for x in (qx, kx, v))
    out = jax.nn.dot_product_attention(qx, kx, vx, scale=scale, is_causal=True,
                                       implementation=implementation)
    return out[..., :d]


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
    """Number of key blocks query block ``i`` must visit (those not wholly in its future);
    ``i`` may be traced (the flash loops, the Pallas kernels' program id)."""
    return jnp.minimum(nk, lax.div(q_offset + (i + 1) * bq + bk - 1, bk))


def _lo_block(j, q_offset, bq, bk):
    """First query block that can see key block ``j`` (``lax.div`` truncates a negative
    quotient towards 0; the clamp makes that equal to floor division)."""
    return jnp.maximum(0, lax.div(j * bk - q_offset, bq))


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
    out, lse = _tag_residuals(out, lse)
    return out, (q, k, v, slopes, qp, kp, qs, ks, off, out, lse)


def _tag_residuals(out, lse):
    """Names the forward's output and log-sum-exp as they are kept for the backward pass, so a
    remat policy can save them (``model.remat=minimal_flash``) instead of rerunning the
    forward kernel in the backward pass."""
    out = jax.tree_util.tree_map(lambda x: checkpoint_name(x, "attention_residual"), out)
    return out, checkpoint_name(lse, "attention_lse")


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


# ---------------------------------------------------------------------------- pallas blocks
# Shared memory a Triton kernel may request per thread block on Hopper (sm_90: H100, H200):
# 227 KiB = 232448 bytes, the "available" figure of the compile error the H200 printed for
# float32 with 128 x 128 blocks ("requested 263168, available: 232448", issue 26).
HOPPER_SMEM_BYTES = 232448
# Headroom left for what the estimate does not count (layout-conversion and reduction scratch).
SMEM_HEADROOM = 0.85


@dataclasses.dataclass(frozen=True)
class KernelBlocks:
    """Tiling of one Pallas kernel: its query and key blocks and Triton's launch parameters."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class PallasBlocks:
    """Tilings of the three kernels (forward; dK/dV, grid over key blocks; dQ, grid over query
    blocks) and the head-dimension chunks (powers of two >= 16 summing to the head dimension
    rounded up to 16; see :func:`head_chunks`)."""

    fwd: KernelBlocks
    dkdv: KernelBlocks
    dq: KernelBlocks
    head_chunks: tuple[int, ...]


def _next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


def head_chunks(d_head: int) -> tuple[int, ...]:
    """The head dimension as Triton tiles: ``d_head`` rounded up to a multiple of 16 and written
    as a sum of powers of two >= 16, largest first (80 -> (64, 16), 96 -> (64, 32),
    128 -> (128,)). Triton tiles are powers of two; one tile of 128 for d_head 80 would spend
    37.5% of every product on zeros, two tiles of 64 and 16 spend none."""
    if d_head <= 0:
        raise ValueError(f"d_head={d_head}: must be positive")
    rest, out = -(-int(d_head) // 16) * 16, []
    while rest:
        top = 1 << (rest.bit_length() - 1)
        out.append(top)
        rest -= top
    return tuple(out)


def smem_estimate(kernel: str, kb: KernelBlocks, d: int, itemsize: int) -> int:
    """Shared memory (bytes) Triton requests for one of our kernels: the operand blocks it
    streams through the software pipeline, ``num_stages`` deep, plus the int32 / float32 row
    vectors of one streamed block. ``fwd`` and ``dq`` stream key and value blocks (``block_k``
    rows) and their positions and segment ids; ``dkdv`` streams query and output-gradient blocks
    (``block_q`` rows) and their slopes, positions, segment ids, log-sum-exps and deltas. ``d``
    is the head dimension the kernel tiles (the sum of :func:`head_chunks`).

    Calibrated on the one figure measured: float32, d 128, 128 x 128 blocks, 2 stages requested
    263168 bytes on the H200 (2 x 2 x 128 x 128 x 4 + 2 x 128 x 4)."""
    if kernel in ("fwd", "dq"):
        return kb.num_stages * 2 * kb.block_k * d * itemsize + 2 * kb.block_k * 4
    if kernel == "dkdv":
        return kb.num_stages * 2 * kb.block_q * d * itemsize + 5 * kb.block_q * 4
    raise ValueError(f"kernel={kernel!r}: one of fwd, dkdv, dq")


def pallas_blocks(dtype, d_head: int, seq_len: int, smem_bytes: int = HOPPER_SMEM_BYTES,
                  max_block_q: int | None = None, max_block_k: int | None = None
                  ) -> PallasBlocks:
    """Block sizes, warps and pipeline stages of the Pallas kernels, a pure function of the
    input dtype, head dimension, sequence length and the shared-memory budget.

    - Blocks of 128 from 2048 tokens on (what the H200 measured at 120 TFLOP/s for 32 x 80 heads
      at 8192, bfloat16: issue 26), 64 below (twice the programs for the GPU's 132 SMs where a
      sequence has few blocks), never above the sequence rounded up to a power of two, nor
      above ``max_block_q`` / ``max_block_k`` (``model.attention_block_q/k``, rounded up to a
      power of two; Triton's minimum 16).
    - 4 warps up to a head dimension of 64, else 8; 2 pipeline stages.
    - The streamed block (keys in the forward and dQ kernels, queries in dK/dV) is halved, then
      the stages cut to 1, until :func:`smem_estimate` fits ``SMEM_HEADROOM`` x ``smem_bytes``:
      float32 at head dimension 128 gets 64-key blocks instead of requesting 263168 bytes.
    """
    itemsize = jnp.dtype(dtype).itemsize
    chunks = head_chunks(d_head)
    d = sum(chunks)
    limit = SMEM_HEADROOM * smem_bytes
    pref = 128 if seq_len >= 2048 else 64
    top = max(16, _next_pow2(seq_len))

    def cap(b, most):
        return max(16, min(b, top, _next_pow2(most) if most else b))

    warps = 4 if d <= 64 else 8

    def fit(kernel):
        kb = KernelBlocks(cap(pref, max_block_q), cap(pref, max_block_k), warps, 2)
        streams_q = kernel == "dkdv"
        while smem_estimate(kernel, kb, d, itemsize) > limit:
            streamed = kb.block_q if streams_q else kb.block_k
            if streamed > 16:
                half = {"block_q" if streams_q else "block_k": streamed // 2}
                kb = dataclasses.replace(kb, **half)
            elif kb.num_stages > 1:
                kb = dataclasses.replace(kb, num_stages=1)
            else:
                raise ValueError(f"no Pallas tiling of d_head {d_head} in {jnp.dtype(dtype).name} "
                                 f"fits {smem_bytes} bytes of shared memory")
        return kb

    return PallasBlocks(fit("fwd"), fit("dkdv"), fit("dq"), chunks)


@contextlib.contextmanager
def abstract_gpu(device_kind: str = "NVIDIA H200"):
    """Within this context the Pallas kernels lower for ``device_kind`` (Triton IR for CUDA) on a
    machine without a GPU: ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))``. Since
    jax 0.11 the Triton lowering reads the target GPU from the abstract mesh's device (0.10
    needed nothing; the context works on both)."""
    from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

    dev = AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    with use_abstract_mesh(AbstractMesh((1,), ("gpu",), (AxisType.Auto,), abstract_device=dev)):
        yield


# ---------------------------------------------------------------------------- pallas kernels
def _pl():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    return pl, plgpu


def _split(refs, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(tuple(refs[i:i + n]))
        i += n
    return out


def _total(terms):
    out = None
    for t in terms:
        out = t if out is None else out + t
    return out


def _kernel_scores(qs, ks, slope, qp, kp, qseg, kseg, scale, plgpu):
    """In-kernel version of :func:`_block_scores` for one head: ``qs`` / ``ks`` the head-dim
    chunks of q [bq, D] and k [bk, D] (one product per chunk, summed)."""
    s = _total(plgpu.dot(q, k.T).astype(_F32) for q, k in zip(qs, ks)) * scale
    s = s + slope[:, None] * (kp[None, :] - qp[:, None]).astype(_F32)
    mask = (qp[:, None] >= kp[None, :]) & (qseg[:, None] == kseg[None, :])
    return jnp.where(mask, s, _NEG)


def _pallas_fwd_kernel(*refs, n, scale, bq, bk, nk, q_offset, causal):
    pl, plgpu = _pl()
    q_refs, k_refs, v_refs, rows, o_refs, (lse_ref,) = _split(refs, (n, n, n, 5, n, 1))
    sl_ref, qp_ref, qs_ref, kp_ref, ks_ref = rows
    i = pl.program_id(2)
    qs = [r[...] for r in q_refs]
    slope, qp, qseg = sl_ref[...], qp_ref[...], qs_ref[...]

    def body(j, carry):
        accs, m, l = carry
        blk = pl.ds(j * bk, bk)
        s = _kernel_scores(qs, [r[blk, :] for r in k_refs], slope, qp, kp_ref[blk], qseg,
                           ks_ref[blk], scale, plgpu)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        vs = [r[blk, :] for r in v_refs]
        accs = tuple(alpha[:, None] * a + plgpu.dot(p.astype(v.dtype), v).astype(_F32)
                     for a, v in zip(accs, vs))
        return accs, m_new, alpha * l + jnp.sum(p, axis=1)

    init = (tuple(jnp.zeros((bq, q.shape[-1]), _F32) for q in qs),
            jnp.full((bq,), _NEG, _F32), jnp.zeros((bq,), _F32))
    hi = _hi_block(i, q_offset, bq, bk, nk) if causal else nk
    accs, m, l = lax.fori_loop(0, hi, body, init)
    for o_ref, acc in zip(o_refs, accs):
        o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _pallas_dkdv_kernel(*refs, n, scale, bq, bk, nq, q_offset, causal):
    pl, plgpu = _pl()
    q_refs, k_refs, v_refs, rows, do_refs, (lse_ref, dl_ref), dk_refs, dv_refs = _split(
        refs, (n, n, n, 5, n, 2, n, n))
    sl_ref, qp_ref, qs_ref, kp_ref, ks_ref = rows
    j = pl.program_id(2)
    ks, vs = [r[...] for r in k_refs], [r[...] for r in v_refs]
    kp, kseg = kp_ref[...], ks_ref[...]

    def body(i, carry):
        dks, dvs = carry
        blk = pl.ds(i * bq, bq)
        qs, dos = [r[blk, :] for r in q_refs], [r[blk, :] for r in do_refs]
        s = _kernel_scores(qs, ks, sl_ref[blk], qp_ref[blk], kp, qs_ref[blk], kseg, scale, plgpu)
        p = jnp.exp(s - lse_ref[blk][:, None])
        dvs = tuple(dv + plgpu.dot(p.astype(do.dtype).T, do).astype(_F32)
                    for dv, do in zip(dvs, dos))
        dp = _total(plgpu.dot(do, v.T).astype(_F32) for do, v in zip(dos, vs))
        ds = p * (dp - dl_ref[blk][:, None])
        dks = tuple(dk + scale * plgpu.dot(ds.astype(q.dtype).T, q).astype(_F32)
                    for dk, q in zip(dks, qs))
        return dks, dvs

    zeros = tuple(jnp.zeros((bk, k.shape[-1]), _F32) for k in ks)
    # causal block skipping: query blocks wholly before this key block see none of it
    lo = _lo_block(j, q_offset, bq, bk) if causal else 0
    dks, dvs = lax.fori_loop(lo, nq, body, (zeros, zeros))
    for ref, x in zip(dk_refs + dv_refs, dks + dvs):
        ref[...] = x.astype(ref.dtype)


def _pallas_dq_kernel(*refs, n, scale, bq, bk, nk, q_offset, causal):
    pl, plgpu = _pl()
    q_refs, k_refs, v_refs, rows, do_refs, (lse_ref, dl_ref), dq_refs = _split(
        refs, (n, n, n, 5, n, 2, n))
    sl_ref, qp_ref, qs_ref, kp_ref, ks_ref = rows
    i = pl.program_id(2)
    qs, dos = [r[...] for r in q_refs], [r[...] for r in do_refs]
    slope, qp, qseg = sl_ref[...], qp_ref[...], qs_ref[...]
    lse, dl = lse_ref[...], dl_ref[...]

    def body(j, dqs):
        blk = pl.ds(j * bk, bk)
        ks, vs = [r[blk, :] for r in k_refs], [r[blk, :] for r in v_refs]
        s = _kernel_scores(qs, ks, slope, qp, kp_ref[blk], qseg, ks_ref[blk], scale, plgpu)
        p = jnp.exp(s - lse[:, None])
        dp = _total(plgpu.dot(do, v.T).astype(_F32) for do, v in zip(dos, vs))
        ds = p * (dp - dl[:, None])
        return tuple(dq + scale * plgpu.dot(ds.astype(k.dtype), k).astype(_F32)
                     for dq, k in zip(dqs, ks))

    # causal block skipping: key blocks wholly in this query block's future are never visited
    hi = _hi_block(i, q_offset, bq, bk, nk) if causal else nk
    dqs = lax.fori_loop(0, hi, body, tuple(jnp.zeros(q.shape, _F32) for q in qs))
    for ref, x in zip(dq_refs, dqs):
        ref[...] = x.astype(ref.dtype)


def _spec(pl, shape, blocked_axis, index):
    """A BlockSpec for ``shape`` (leading None axes squeezed) whose axis ``blocked_axis`` moves
    with the grid's third index; the leading indices follow ``index`` (b, h -> ...)."""
    def fn(b, h, n):
        lead = index(b, h)
        return lead + tuple(n if a == blocked_axis else 0 for a in range(len(shape) - len(lead)))
    return pl.BlockSpec(shape, fn)


def _operand_specs(pl, chunks, bq, bk, tp, sp, q_blocked):
    """BlockSpecs of (q chunks, k chunks, v chunks, slopes, qp, qs, kp, ks): the queries
    blocked and the keys whole (``q_blocked``), or the other way round."""
    bh = lambda b, h: (b, h)  # noqa: E731
    hh = lambda b, h: (h,)  # noqa: E731
    bb = lambda b, h: (b,)  # noqa: E731
    q_rows, k_rows = (bq, sp) if q_blocked else (tp, bk)
    q_axis, k_axis = (0, -1) if q_blocked else (-1, 0)
    qc = [_spec(pl, (None, None, q_rows, c), q_axis, bh) for c in chunks]
    kc = [_spec(pl, (None, None, k_rows, c), k_axis, bh) for c in chunks]
    return (qc + kc + kc + [_spec(pl, (None, q_rows), q_axis, hh)]
            + [_spec(pl, (None, q_rows), q_axis, bb)] * 2
            + [_spec(pl, (None, k_rows), k_axis, bb)] * 2)


def _pallas_call(kernel, grid, in_specs, out_specs, out_shape, interpret, kb: KernelBlocks):
    pl, plgpu = _pl()
    params = None if interpret else plgpu.CompilerParams(num_warps=kb.num_warps,
                                                         num_stages=kb.num_stages)
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, compiler_params=params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _pallas(q, k, v, sl, qp, kp, qs, ks, scale, blocks, q_offset, causal, interpret):
    return _pallas_forward(q, k, v, sl, qp, kp, qs, ks, scale, blocks, q_offset, causal,
                           interpret)[0]


def _pallas_forward(q, k, v, sl, qp, kp, qs, ks, scale, blocks, q_offset, causal, interpret):
    """q / k / v: tuples of head-dim chunks [B, H, Tp | Sp, c]."""
    pl, _ = _pl()
    kb, chunks, n = blocks.fwd, blocks.head_chunks, len(q)
    b, h, tp, _ = q[0].shape
    sp = k[0].shape[2]
    bq, bk = kb.block_q, kb.block_k
    kern = functools.partial(_pallas_fwd_kernel, n=n, scale=scale, bq=bq, bk=bk, nk=sp // bk,
                             q_offset=q_offset, causal=causal)
    bh = lambda b_, h_: (b_, h_)  # noqa: E731
    out_specs = ([_spec(pl, (None, None, bq, c), 0, bh) for c in chunks]
                 + [_spec(pl, (None, None, bq), 0, bh)])
    out_shape = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in q]
                 + [jax.ShapeDtypeStruct((b, h, tp), _F32)])
    res = _pallas_call(kern, (b, h, tp // bq),
                       _operand_specs(pl, chunks, bq, bk, tp, sp, q_blocked=True),
                       out_specs, out_shape, interpret, kb)(*q, *k, *v, sl, qp, qs, kp, ks)
    return tuple(res[:n]), res[n]


def _pallas_fwd(q, k, v, sl, qp, kp, qs, ks, scale, blocks, q_offset, causal, interpret):
    out, lse = _pallas_forward(q, k, v, sl, qp, kp, qs, ks, scale, blocks, q_offset, causal,
                               interpret)
    out, lse = _tag_residuals(out, lse)
    return out, (q, k, v, sl, qp, kp, qs, ks, out, lse)


def _pallas_bwd(scale, blocks, q_offset, causal, interpret, res, g):
    pl, _ = _pl()
    q, k, v, sl, qp, kp, qs, ks, out, lse = res
    chunks, n = blocks.head_chunks, len(q)
    b, h, tp, _ = q[0].shape
    sp = k[0].shape[2]
    delta = _total(jnp.sum(gc.astype(_F32) * oc.astype(_F32), -1) for gc, oc in zip(g, out))
    args = (*q, *k, *v, sl, qp, qs, kp, ks, *g, lse, delta)
    bh = lambda b_, h_: (b_, h_)  # noqa: E731

    kb = blocks.dkdv  # grid over key blocks; queries, output gradients and rows whole
    whole = ([_spec(pl, (None, None, tp, c), -1, bh) for c in chunks]
             + [_spec(pl, (None, None, tp), -1, bh)] * 2)
    kv_out = [_spec(pl, (None, None, kb.block_k, c), 0, bh) for c in chunks]
    dkdv = functools.partial(_pallas_dkdv_kernel, n=n, scale=scale, bq=kb.block_q,
                             bk=kb.block_k, nq=tp // kb.block_q, q_offset=q_offset, causal=causal)
    dkv = _pallas_call(
        dkdv, (b, h, sp // kb.block_k),
        _operand_specs(pl, chunks, kb.block_q, kb.block_k, tp, sp, q_blocked=False) + whole,
        kv_out + kv_out, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in k + v],
        interpret, kb)(*args)

    kb = blocks.dq  # grid over query blocks; keys and values whole
    blocked = ([_spec(pl, (None, None, kb.block_q, c), 0, bh) for c in chunks]
               + [_spec(pl, (None, None, kb.block_q), 0, bh)] * 2)
    dqk = functools.partial(_pallas_dq_kernel, n=n, scale=scale, bq=kb.block_q, bk=kb.block_k,
                            nk=sp // kb.block_k, q_offset=q_offset, causal=causal)
    dq = _pallas_call(
        dqk, (b, h, tp // kb.block_q),
        _operand_specs(pl, chunks, kb.block_q, kb.block_k, tp, sp, q_blocked=True) + blocked,
        blocked[:n], [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in q], interpret, kb)(*args)
    return tuple(dq), tuple(dkv[:n]), tuple(dkv[n:]), None, None, None, None, None


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def pallas_attention(q, k, v, slopes, q_pos, k_pos, q_seg, k_seg, *, q_offset=0, scale=1.0,
                     block_q=None, block_k=None, interpret=None, blocks=None):
    """Pallas attention; same contract as :func:`flash_attention`.

    Tiling from :func:`pallas_blocks` (dtype, head dimension, length, shared memory) with
    ``block_q`` / ``block_k`` as upper bounds, or ``blocks`` given whole (benchmarks). The head
    dimension is cut into power-of-two chunks (:func:`head_chunks`: d_head 80 computes 80
    columns, not 128). ``interpret`` defaults to True off GPUs. Causal block skipping (forward,
    dK/dV and dQ) needs a static ``q_offset``; with a traced one (decoding) every key block is
    visited and the mask alone does the work. No gradient flows to the slopes (not trained).
    """
    _check_blocks(1 if block_q is None else block_q, 1 if block_k is None else block_k)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, t, h, d = q.shape
    s_len = k.shape[1]
    if blocks is None:
        blocks = pallas_blocks(q.dtype, d, max(t, s_len), max_block_q=block_q,
                               max_block_k=block_k)
    # queries and keys padded to a multiple of every kernel's blocks (all powers of two)
    tq = max(16, min(max(x.block_q for x in (blocks.fwd, blocks.dkdv, blocks.dq)),
                     _next_pow2(t)))
    tk = max(16, min(max(x.block_k for x in (blocks.fwd, blocks.dkdv, blocks.dq)),
                     _next_pow2(s_len)))
    blocks = _clamp(blocks, tq, tk)
    tp, sp = -(-t // tq) * tq, -(-s_len // tk) * tk
    causal = isinstance(q_offset, int)
    if slopes is None:
        slopes = jnp.zeros((h,), _F32)
    bounds = [0]
    for c in blocks.head_chunks:
        bounds.append(bounds[-1] + c)

    def chunked(x, n):
        x = _pad_axis(_pad_axis(x.transpose(0, 2, 1, 3), 2, n, 0), 3, bounds[-1], 0)
        return tuple(x[..., lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))

    sl = jnp.broadcast_to(slopes.astype(_F32)[:, None], (h, tp))
    out = _pallas(chunked(q, tp), chunked(k, sp), chunked(v, sp), sl,
                  _pad_axis(q_pos, 1, tp, 0), _pad_axis(k_pos, 1, sp, 0),
                  _pad_axis(q_seg, 1, tp, -2), _pad_axis(k_seg, 1, sp, -1),
                  float(scale), blocks, q_offset if causal else 0, causal, bool(interpret))
    out = out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)
    return out[:, :, :t, :d].transpose(0, 2, 1, 3)


def _clamp(blocks: PallasBlocks, most_q: int, most_k: int) -> PallasBlocks:
    """``blocks`` with no block above ``most_q`` queries / ``most_k`` keys (short inputs)."""
    def one(kb):
        return dataclasses.replace(kb, block_q=min(kb.block_q, most_q),
                                   block_k=min(kb.block_k, most_k))
    return dataclasses.replace(blocks, fwd=one(blocks.fwd), dkdv=one(blocks.dkdv),
                               dq=one(blocks.dq))
