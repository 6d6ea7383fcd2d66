"""Attention implementations against a float64 NumPy attention with ALiBi written here.

``flash`` (blockwise JAX, custom VJP) and ``pallas`` (kernels, interpret mode on CPU) are checked
for values and gradients with a non-power-of-two head count, packed documents (segment ids,
positions restarting), a position-interpolation divisor, T not a multiple of the block, and
bfloat16 inputs; the dense key-only bias against the full bias; cached decoding against the full
forward; and short training runs of every implementation against each other.
"""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btlm_jax.config import default_config
from btlm_jax.models import attention as A
from btlm_jax.models.alibi import alibi_slopes, effective_slopes, key_only_alibi_bias
from btlm_jax.models.btlm import BTLM, init_cache

SCALE = 0.35


# ------------------------------------------------------------------ float64 NumPy reference
def np_probs(q, k, slopes, q_pos, k_pos, q_seg, k_seg, scale):
    """Attention probabilities [B, H, T, S]: softmax(scale q.k - m_h (i - j)) over allowed keys."""
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    s = s - slopes[None, :, None, None] * dist[:, None]
    allowed = (dist >= 0) & (q_seg[:, :, None] == k_seg[:, None, :])
    s = np.where(allowed[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def np_attention(q, k, v, *args):
    return np.einsum("bhqk,bkhd->bqhd", np_probs(q, k, *args), v)


def np_attention_grads(q, k, v, g, slopes, q_pos, k_pos, q_seg, k_seg, scale):
    """Analytic gradients of sum(out * g) with respect to q, k, v (softmax Jacobian by hand)."""
    p = np_probs(q, k, slopes, q_pos, k_pos, q_seg, k_seg, scale)
    dv = np.einsum("bhqk,bqhd->bkhd", p, g)
    dp = np.einsum("bqhd,bkhd->bhqk", g, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = scale * np.einsum("bhqk,bkhd->bqhd", ds, k)
    dk = scale * np.einsum("bhqk,bqhd->bkhd", ds, q)
    return dq, dk, dv


def packed_inputs(b=2, t=37, h=3, d=8, seed=0):
    """The last row holds three documents (positions restart) and trailing padding, the others
    one document each."""
    rs = np.random.RandomState(seed)
    q, k, v, g = (rs.randn(b, t, h, d) for _ in range(4))
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    bounds = [0, 11 * t // 37, 26 * t // 37, t - 3]
    for n, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        seg[-1, lo:hi] = n + 1
        pos[-1, lo:hi] = np.arange(hi - lo)
    seg[-1, t - 3:] = 0  # padding (segment 0 attends only to itself)
    pos[-1, t - 3:] = np.arange(3)
    return q, k, v, g, pos, seg


def pi_slopes(n_heads, divisor):
    """The slopes effective_slopes gives under position interpolation (checked against the
    closed form 2^(-8h/n) / divisor here, so the test does not rely on it)."""
    m = default_config().model
    m.n_heads = n_heads
    got = np.asarray(effective_slopes(m, key_len=64, alibi_scale=divisor), np.float64)
    np.testing.assert_allclose(got, alibi_slopes(n_heads) / divisor, rtol=1e-6)
    return got


def run_impl(impl, q, k, v, slopes, pos, seg, block, q_offset=0):
    fn = A.flash_attention if impl == "flash" else A.pallas_attention
    return fn(q, k, v, None if slopes is None else jnp.asarray(slopes, jnp.float32), pos, pos,
              seg, seg, q_offset=q_offset, scale=SCALE, block_q=block, block_k=block // 2)


def test_reference_gradients_match_finite_differences():
    q, k, v, g, pos, seg = packed_inputs(t=9, h=3, d=4)
    sl = alibi_slopes(3)
    args = (sl, pos, pos, seg, seg, SCALE)
    grads = np_attention_grads(q, k, v, g, *args)
    rs = np.random.RandomState(1)
    for which in range(3):
        for _ in range(4):
            idx = tuple(rs.randint(0, n) for n in q.shape)
            xs = [q.copy(), k.copy(), v.copy()]
            xs[which][idx] += 1e-6
            up = (np_attention(*xs, *args) * g).sum()
            xs[which][idx] -= 2e-6
            dn = (np_attention(*xs, *args) * g).sum()
            assert grads[which][idx] == pytest.approx((up - dn) / 2e-6, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("impl", ["flash", "pallas"])
@pytest.mark.parametrize("alibi", [True, False])
def test_values_and_gradients_match_numpy(impl, alibi):
    # 3 heads (not a power of two), 3 packed documents + padding, PI divisor 2.5, T = 37 with
    # blocks of 16 queries x 8 keys (flash) / 16 x 16 (pallas: rounded up to Triton's minimum)
    q, k, v, g, pos, seg = packed_inputs()
    slopes = pi_slopes(3, 2.5) if alibi else None
    ref_slopes = slopes if alibi else np.zeros(3)
    want = np_attention(q, k, v, ref_slopes, pos, pos, seg, seg, SCALE)
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g)]

    def loss(q_, k_, v_):
        return jnp.sum(run_impl(impl, q_, k_, v_, slopes, pos, seg, 16) * f32[3])

    out = run_impl(impl, *f32[:3], slopes, pos, seg, 16)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    got = jax.grad(loss, argnums=(0, 1, 2))(*f32[:3])
    for gg, ww in zip(got, np_attention_grads(q, k, v, g, ref_slopes, pos, pos, seg, seg, SCALE)):
        np.testing.assert_allclose(np.asarray(gg), ww, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["flash", "pallas"])
def test_bfloat16_inputs(impl):
    q, k, v, g, pos, seg = packed_inputs(seed=3)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, g)]
    q64, k64, v64, g64 = (np.asarray(x.astype(jnp.float32), np.float64) for x in bf)
    slopes = pi_slopes(3, 1.0)
    args = (slopes, pos, pos, seg, seg, SCALE)
    out = run_impl(impl, *bf[:3], slopes, pos, seg, 16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), np_attention(q64, k64, v64, *args),
                               rtol=2e-2, atol=2e-2)
    got = jax.grad(lambda a, b, c: jnp.sum((run_impl(impl, a, b, c, slopes, pos, seg, 16)
                                            * bf[3]).astype(jnp.float32)),
                   argnums=(0, 1, 2))(*bf[:3])
    for gg, ww in zip(got, np_attention_grads(q64, k64, v64, g64, *args)):
        assert gg.dtype == jnp.bfloat16
        err = np.abs(np.asarray(gg.astype(jnp.float32)) - ww).max()
        assert err < 0.05 * max(1.0, np.abs(ww).max()), err


def test_flash_long_rows_and_skipped_blocks():
    # T = 100 with 8 x 8 blocks: most key blocks are skipped; long distances (positions up to
    # 4000 via an offset) keep the relative bias exact
    q, k, v, g, pos, seg = packed_inputs(b=1, t=100, h=2, d=4, seed=5)
    pos = pos + 4000
    sl = alibi_slopes(2)
    out = A.flash_attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                            jnp.asarray(sl, jnp.float32), pos, pos, seg, seg, scale=SCALE,
                            block_q=8, block_k=8)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, sl, pos, pos, seg, seg, SCALE),
                               rtol=1e-5, atol=1e-5)


def test_key_only_bias_equals_full_bias():
    # softmax(s + m_h pos_j) == softmax(s - m_h (pos_i - pos_j)) on every row, packed documents
    # and long positions (up to ~8k, where m_h pos_j is in the thousands) included
    q, k, v, g, pos, seg = packed_inputs(h=5, seed=2)
    pos = pos * 200  # spacing up to 7,200 positions
    sl = pi_slopes(5, 1.0)
    bias = key_only_alibi_bias(jnp.asarray(sl, jnp.float32), jnp.asarray(pos))
    assert bias.shape == (2, 5, 1, 37) and bias.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(bias)[:, :, 0], sl[None, :, None] * pos[:, None, :],
                               rtol=1e-7)
    mask = np.asarray(A.dense_mask(seg, pos, seg, pos))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * SCALE + np.asarray(bias, np.float64)
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, np_probs(q, k, sl, pos, pos, seg, seg, SCALE), rtol=1e-9,
                               atol=1e-12)
    # the xla implementation (dense, key-only float32 bias) end to end
    ctx = A.prepare("xla", jnp.asarray(sl, jnp.float32), pos, seg, pos, seg)
    out = A.attend("xla", *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), ctx, SCALE)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, sl, pos, pos, seg, seg, SCALE),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("d", [64, 80, 128])
def test_pallas_kernels_lower_to_triton_without_a_gpu(d):
    # every op of the three kernels (forward, dK/dV, dQ) has a Triton lowering: lowered for CUDA
    # (an abstract H200) from this CPU-only machine, in float32 and bfloat16 with the tiling
    # pallas_blocks gives at T = 2048 (compiling the Triton IR itself needs a GPU)
    t, h = 2048, 2
    sl = jnp.full((h,), 0.1, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))
    seg = jnp.ones((1, t), jnp.int32)

    def loss(q, k, v):
        return jnp.sum(A.pallas_attention(q, k, v, sl, pos, pos, seg, seg, scale=0.1,
                                          interpret=False).astype(jnp.float32))

    for dtype in (jnp.float32, jnp.bfloat16):
        x = jax.ShapeDtypeStruct((1, t, h, d), dtype)
        with A.abstract_gpu():
            text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(x, x, x).lower(
                lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == 3
        # the head dimension is tiled without padding: d 80 as 64 + 16 (was one 128)
        assert all(f"x2048x{c}x" in text for c in A.head_chunks(d))
        assert sum(A.head_chunks(d)) == d and (d == 128 or "x2048x128x" not in text)


def test_block_size_errors_name_the_key():
    x = jnp.zeros((1, 4, 1, 4))
    p = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="model.attention_block_q"):
        A.flash_attention(x, x, x, None, p, p, p, p, block_q=0)
    with pytest.raises(ValueError, match="model.attention="):
        A.prepare("dense", None, p, p, p, p)


# ------------------------------------------------------------------------- model level
def tiny_model(impl, block=4):
    m = default_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 61, 24, 2, 3, 40
    m.mup.base_d_model, m.mup.base_d_ff = 12, 20.0
    m.attention, m.attention_block_q, m.attention_block_k = impl, block, block
    return BTLM(m)


@pytest.mark.parametrize("impl", ["flash", "pallas"])  # xla: tests/test_generate.py
def test_cached_decode_equals_full_forward(impl):
    ref = tiny_model("xla")
    model = tiny_model(impl)
    params = jax.jit(lambda r: nn.unbox(ref.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
        jax.random.PRNGKey(0))
    rs = np.random.RandomState(0)
    b, prompt, steps, scale = 2, 7, 5, 1.7
    toks = rs.randint(1, 61, (b, prompt + steps)).astype(np.int32)
    full = np.asarray(jax.jit(lambda p, x: ref.apply({"params": p}, x, alibi_scale=scale))(
        params, toks))
    # the model under test, full forward
    got = jax.jit(lambda p, x: model.apply({"params": p}, x, alibi_scale=scale))(params, toks)
    np.testing.assert_allclose(np.asarray(got), full, rtol=2e-4, atol=2e-4)
    decode = jax.jit(lambda p, c, t, i: model.apply({"params": p}, t, c, i, alibi_scale=scale,
                                                    method=BTLM.decode))
    cache = init_cache(model.cfg, b, prompt + steps + 2)  # 14 slots: 4 blocks, last one partial
    logits, cache = decode(params, cache, toks[:, :prompt], 0)
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt], rtol=2e-4, atol=2e-4)
    for t in range(prompt, prompt + steps):
        logits, cache = decode(params, cache, toks[:, t:t + 1], t)
        np.testing.assert_allclose(np.asarray(logits[:, 0]), full[:, t], rtol=2e-4, atol=2e-4)


def _train_losses(tmp_path, cache_dir, impl, packing, seq_len, steps=3):
    from configs.btlm import get_config

    from btlm_jax.train.loop import train

    c = get_config("tiny")
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 512, 64, 2, 2, 128
    m.mup.base_d_model, m.mup.base_d_ff = 64, 128.0
    m.attention, m.attention_block_q, m.attention_block_k = impl, 32, 32
    c.data.cache_dir, c.data.packing = str(cache_dir), packing
    c.train.seq_len, c.train.batch_size, c.train.steps = seq_len, 4, steps
    c.train.log_every_steps = 1
    c.optim.peak_lr, c.optim.warmup_steps = 1e-2, 2
    c.eval.every_steps, c.checkpoint.every_steps = 10_000, 10_000
    c.eval.num_batches, c.eval.batch_size = 1, 2
    c.logging.progress_bar = c.logging.tensorboard = c.logging.measure_peak = False
    c.checkpoint.async_save = False
    work = tmp_path / f"{impl}_{packing}_{seq_len}"
    train(c, str(work))
    rec = [json.loads(line) for line in (Path(work) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rec if "loss" in r]
    assert len(losses) == steps
    return np.array(losses)


@pytest.mark.slow
@pytest.mark.parametrize("impl,packing,seq_len", [
    ("flash", "concat", 64), ("flash", "document", 64), ("pallas", "concat", 128)])
def test_tiny_training_losses_match_xla(tmp_path_factory, impl, packing, seq_len):
    cache = tmp_path_factory.getbasetemp() / "attention_cache"
    tmp = tmp_path_factory.mktemp("runs")
    want = _train_losses(tmp, cache, "xla", packing, seq_len)
    got = _train_losses(tmp, cache, impl, packing, seq_len)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ pallas tiling, auto, cudnn
def test_smem_estimate_reproduces_the_h200_float32_failure():
    # the H200 refused the old float32 tiling (d 80 padded to 128, 128 x 128 blocks, 2 stages):
    # "Shared memory size limit exceeded: requested 263168, available: 232448" (issue 26)
    old = A.KernelBlocks(block_q=128, block_k=128, num_warps=8, num_stages=2)
    assert A.smem_estimate("fwd", old, 128, 4) == 263168 > A.HOPPER_SMEM_BYTES == 232448


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_pallas_blocks_fit_shared_memory(dtype, d):
    itemsize = jnp.dtype(dtype).itemsize
    for t in (100, 512, 1024, 2048, 8192):
        blocks = A.pallas_blocks(dtype, d, t)
        assert sum(blocks.head_chunks) == d  # 64, 80 and 128 need no padding
        for kernel in ("fwd", "dkdv", "dq"):
            kb = getattr(blocks, kernel)
            for b in (kb.block_q, kb.block_k):
                assert b >= 16 and b & (b - 1) == 0 and b <= max(16, 1 << (t - 1).bit_length())
            assert kb.num_warps == (4 if d <= 64 else 8) and kb.num_stages in (1, 2)
            assert A.smem_estimate(kernel, kb, d, itemsize) <= (
                A.SMEM_HEADROOM * A.HOPPER_SMEM_BYTES), (kernel, t)
        if t >= 2048 and dtype == "bfloat16":  # the tiling measured at 120 TFLOP/s on the H200
            assert (blocks.fwd.block_q, blocks.fwd.block_k, blocks.fwd.num_stages) == (128, 128, 2)
        if t <= 1024:  # short sequences: smaller blocks, more programs
            assert blocks.fwd.block_q <= 64
    if dtype == "float32" and d == 128:  # what failed before fits now, with 64-key blocks
        assert A.pallas_blocks(dtype, d, 8192).fwd.block_k == 64
    # the config's upper bounds
    capped = A.pallas_blocks(dtype, d, 8192, max_block_q=32, max_block_k=20)
    assert (capped.fwd.block_q, capped.fwd.block_k) == (32, 32)


def test_head_chunks():
    assert A.head_chunks(80) == (64, 16) and A.head_chunks(96) == (64, 32)
    assert A.head_chunks(128) == (128,) and A.head_chunks(64) == (64,)
    assert A.head_chunks(72) == (64, 16) and A.head_chunks(8) == (16,)
    assert A.head_chunks(112) == (64, 32, 16)


def xla_attention(q, k, v, slopes, pos, seg, scale):
    ctx = A.prepare("xla", None if slopes is None else jnp.asarray(slopes, jnp.float32),
                    pos, seg, pos, seg)
    return A.attend("xla", q, k, v, ctx, scale)


@pytest.mark.parametrize("d", [pytest.param(64, marks=pytest.mark.slow), 80,
                               pytest.param(128, marks=pytest.mark.slow)])
def test_pallas_matches_xla_at_the_model_head_dims(d):
    # interpret mode: values and q/k/v gradients against the xla path, float32, packed rows,
    # with a different tiling per kernel (the inputs padded to the largest block)
    q, k, v, g, pos, seg = packed_inputs(b=1, t=40, h=2, d=d, seed=d)
    sl = pi_slopes(2, 1.5)
    blocks = A.PallasBlocks(fwd=A.KernelBlocks(32, 16, 4, 2), dkdv=A.KernelBlocks(16, 32, 4, 2),
                            dq=A.KernelBlocks(32, 16, 4, 2), head_chunks=A.head_chunks(d))
    f32 = [jnp.asarray(x, jnp.float32) for x in (q, k, v, g)]

    def run(fn):
        return jax.jit(jax.value_and_grad(
            lambda a, b, c: jnp.sum(fn(a, b, c) * f32[3]), argnums=(0, 1, 2)))(*f32[:3])

    want_v, want_g = run(lambda a, b, c: xla_attention(a, b, c, sl, pos, seg, SCALE))
    got_v, got_g = run(lambda a, b, c: A.pallas_attention(
        a, b, c, jnp.asarray(sl, jnp.float32), pos, pos, seg, seg, scale=SCALE, blocks=blocks))
    np.testing.assert_allclose(float(got_v), float(want_v), rtol=1e-5)
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    out = A.pallas_attention(*f32[:3], jnp.asarray(sl, jnp.float32), pos, pos, seg, seg,
                             scale=SCALE, blocks=blocks)
    np.testing.assert_allclose(np.asarray(out), np_attention(q, k, v, sl, pos, pos, seg, seg,
                                                             SCALE), rtol=1e-5, atol=1e-5)


def test_auto_picks_from_the_measured_table():
    assert A.resolve("auto", jnp.float32, 8192, backend="cpu", num_devices=1) == "xla"
    assert A.resolve("auto", jnp.bfloat16, 8192, backend="cpu", num_devices=1) == "xla"
    gpu = dict(backend="gpu", num_devices=1)
    assert A.resolve("auto", jnp.bfloat16, 8192, **gpu) == "pallas"
    assert A.resolve("auto", jnp.bfloat16, 2048, **gpu) == "pallas"
    assert A.resolve("auto", jnp.bfloat16, 1024, **gpu) == "xla"  # nothing measured below 2048
    assert A.resolve("auto", jnp.float32, 8192, **gpu) == "xla"  # nor in float32
    assert A.resolve("auto", jnp.bfloat16, 8192, backend="gpu", num_devices=8) == "xla"
    assert A.resolve("flash", jnp.bfloat16, 8192, **gpu) == "flash"
    with pytest.raises(ValueError, match="model.attention='dense'"):
        A.resolve("dense", jnp.float32, 8)
    # the table's evidence is the H200 figures
    assert {(r[0], r[1], r[2], r[3]) for r in A.AUTO_TABLE} == {
        ("gpu", "bfloat16", 2048, "pallas"), ("gpu", "bfloat16", 8192, "pallas")}
    assert default_config().model.attention == "auto"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cudnn_folded_alibi_equals_the_reference(dtype):
    # cuDNN's computation (causal, ALiBi folded into extra head columns) run through XLA on CPU:
    # one unpacked row, positions up to ~8000 (m_h pos_j / scale in the hundreds of thousands),
    # against the float64 reference; no [T, S] bias is built
    b, t, h, d = 1, 48, 3, 80
    rs = np.random.RandomState(7)
    q, k, v, g = (rs.randn(b, t, h, d) for _ in range(4))
    pos = np.tile(np.arange(t, dtype=np.int32) * 170, (b, 1))
    seg = np.ones((b, t), np.int32)
    sl, scale = pi_slopes(3, 1.0), 1.0 / d
    ctx = A.prepare("cudnn", jnp.asarray(sl, jnp.float32), pos, seg, pos, seg, 0, dtype)
    assert set(ctx) == {"slopes", "k_pos"}  # no mask, no bias
    cols = A.alibi_columns(jnp.asarray(sl, jnp.float32), jnp.asarray(pos), scale, dtype)
    assert cols.shape == (b, t, h, 1 if dtype == jnp.float32 else 3) and cols.dtype == dtype
    np.testing.assert_allclose(np.asarray(cols.astype(jnp.float32), np.float64).sum(-1),
                               sl[None, None, :] * pos[:, :, None] / scale, rtol=1e-7)
    xs = [jnp.asarray(x, dtype) for x in (q, k, v)]
    x64 = [np.asarray(x.astype(jnp.float32), np.float64) for x in xs]

    def fn(a, b_, c):
        return A.cudnn_attention(a, b_, c, ctx["slopes"], ctx["k_pos"], scale, implementation=None)

    want = np_attention(*x64, sl, pos, pos, seg, seg, scale)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(*xs).astype(jnp.float32)), want,
                               rtol=tol, atol=tol)
    got = jax.jit(jax.grad(lambda a, b_, c: jnp.sum(fn(a, b_, c).astype(jnp.float32) * g),
                           argnums=(0, 1, 2)))(*xs)
    for gg, ww in zip(got, np_attention_grads(*x64, g, sl, pos, pos, seg, seg, scale)):
        assert gg.shape == (b, t, h, d)
        err = np.abs(np.asarray(gg.astype(jnp.float32)) - ww).max()
        assert err < (1e-4 if dtype == jnp.float32 else 0.05) * max(1.0, np.abs(ww).max())
    # decoding (queries not aligned with the keys) takes the dense xla context
    ctx = A.prepare("cudnn", jnp.asarray(sl, jnp.float32), pos[:, -1:], seg[:, -1:], pos, seg,
                    t - 1, dtype)
    assert "mask" in ctx


def test_cudnn_refuses_packed_documents():
    from btlm_jax.config import ConfigError, validate

    c = default_config()
    c.model.attention, c.data.packing = "cudnn", "document"
    with pytest.raises(ConfigError, match="model.attention=cudnn with data.packing='document'"):
        validate(c)
    c.data.packing = "concat"
    validate(c)


def test_minimal_flash_remat_keeps_the_attention_forward(capsys):
    # model.remat=minimal_flash saves what the flash / pallas backward needs from the forward
    # (output [B, H, T, D] and log-sum-exp [B, H, T] per layer), which minimal recomputes
    # (rerunning the attention forward in the backward pass)
    from jax.ad_checkpoint import print_saved_residuals

    toks = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 32)), jnp.int32)

    def model(remat):
        m = default_config().model
        m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 64, 32, 2, 2, 64
        m.remat, m.attention, m.attention_block_q, m.attention_block_k = remat, "flash", 16, 16
        return BTLM(m)

    params = jax.eval_shape(lambda r: nn.unbox(model("none").init(r, toks)["params"]),
                            jax.random.PRNGKey(0))
    saved = {}
    for remat in ("minimal", "minimal_flash"):
        print_saved_residuals(lambda p, mod=model(remat): jnp.mean(mod.apply({"params": p}, toks)),
                              params)
        saved[remat] = capsys.readouterr().out
    lse, out = "f32[2,2,2,32] ", "f32[2,2,2,32,16] "  # [layers, B, H, T], [layers, B, H, T, D]
    assert lse not in saved["minimal"] and out not in saved["minimal"]
    assert lse in saved["minimal_flash"] and out in saved["minimal_flash"]
    # (remat policies leave gradients alone: tests/test_structure.py)
