"""Weight-only quantisation: scales and error bounds per channel / per group against NumPy,
nibble packing, which leaves are quantised, byte counts against closed forms."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btlm_jax.models import quant
from btlm_jax.config import default_config
from btlm_jax.models.btlm import BTLM


def test_int8_per_channel_scales_and_error_bound():
    rs = np.random.RandomState(0)
    w = rs.randn(6, 5, 7).astype(np.float32) * rs.rand(1, 1, 7).astype(np.float32) * 3
    t = quant.quantize(jnp.asarray(w), (0, 1), "int8")  # like attn.out: [H, Dh, D]
    scale = np.abs(w).reshape(30, 7).max(0) / 127  # one scale per output channel
    np.testing.assert_allclose(np.asarray(t.scale).reshape(7), scale, rtol=1e-6)
    assert t.q.dtype == jnp.int8
    err = np.abs(np.asarray(quant.dequantize(t)) - w)
    assert np.all(err <= scale[None, None, :] / 2 * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("k,group", [(40, 16), (64, 32), (7, 4)])
def test_int4_per_group_scales_and_error_bound(k, group):
    rs = np.random.RandomState(k)
    n_out = 3
    # rows [k, n_out] (Dense kernel), groups of very different magnitude along k
    w = (rs.randn(k, n_out) * np.exp(rs.randn(k, 1) * 2)).astype(np.float32)
    t = quant.quantize(jnp.asarray(w), (0,), "int4", group)
    deq = np.asarray(quant.dequantize(t))
    assert deq.shape == w.shape and deq.dtype == np.float32
    n_groups = -(-k // group)
    assert t.q.shape == (n_out, n_groups, group // 2) and t.q.dtype == jnp.uint8
    for o in range(n_out):
        for g in range(n_groups):
            rows = slice(g * group, min((g + 1) * group, k))
            s = np.abs(w[rows, o]).max() / 7
            assert float(t.scale[o, g, 0]) == pytest.approx(s, rel=1e-6)
            assert np.all(np.abs(deq[rows, o] - w[rows, o]) <= s / 2 * (1 + 1e-5) + 1e-7)
            q = np.round(w[rows, o] / s)
            np.testing.assert_allclose(deq[rows, o], q * s, rtol=1e-6, atol=1e-7)


def test_int4_nibble_packing():
    packed = jnp.asarray(np.array([[0x9F, 0x07, 0x71, 0x00]], np.uint8))
    # low nibble first; two's complement: 0xF = -1, 0x9 = -7, 0x7 = 7, 0x1 = 1
    assert np.asarray(quant.unpack_int4(packed)).tolist() == [[-1, -7, 7, 0, 1, 7, 0, 0]]
    vals = np.arange(-7, 8, dtype=np.int8)
    w = jnp.asarray(np.concatenate([vals, [0]]).astype(np.float32)[:, None] * 0.5)
    t = quant.quantize(w, (0,), "int4", 16)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(t)), np.asarray(w))


def _tiny(tie=True):
    c = default_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 64, 32, 2, 4, 40
    m.mup.base_d_model, m.mup.base_d_ff = 16, 20.0
    m.tie_embeddings, m.position, m.max_seq_len = tie, "learned", 16
    model = BTLM(m)
    params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros((1, 8), jnp.int32)))["params"])(
        jax.random.PRNGKey(0))
    return model, params


def _closed_form_bytes(m, fmt, group):
    # the arrays as allocated: vocabulary and d_ff padded to model.pad_multiple
    from btlm_jax.models.padding import padded_size

    d, layers = m.d_model, m.n_layers
    f, v = padded_size(m.d_ff, m.pad_multiple), padded_size(m.vocab_size, m.pad_multiple)

    def mat(k, n_out):  # bytes of one quantised [k inputs, n_out outputs] matrix
        if fmt == "int8":
            return k * n_out + 4 * n_out
        g = -(-k // group)
        return n_out * g * group // 2 + 4 * n_out * g

    per_layer = 4 * mat(d, d) + 2 * mat(d, f) + mat(f, d)  # q k v out, wi_0 wi_1, wo
    floats = 4 * (4 * d + 4 * d + 2 * f + d)  # 2 LayerNorms, q/k/v/out biases, wi biases, wo bias
    total = layers * (per_layer + floats)
    total += mat(d, v)  # embedding: one scale per token row
    total += 4 * (2 * d + m.max_seq_len * d)  # ln_f, learned positions (kept float)
    if not m.tie_embeddings:
        total += mat(d, v)
    return total


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("tie", [True, False])
def test_quantized_tree_bytes_and_forward(fmt, tie):
    model, params = _tiny(tie)
    qp = jax.jit(lambda p: quant.quantize_params(p, fmt, group_size=16))(params)
    kinds = {"/".join(str(getattr(k, "key", k)) for k in path): type(x).__name__
             for path, x in jax.tree_util.tree_flatten_with_path(
                 qp, is_leaf=lambda x: isinstance(x, quant.QTensor))[0]}
    assert kinds["embed/embedding"] == "QTensor" and kinds["layers/attn/out/kernel"] == "QTensor"
    assert kinds["pos_embed/embedding"] != "QTensor" and kinds["layers/ln_1/scale"] != "QTensor"
    assert kinds["layers/mlp/wo/bias"] != "QTensor"
    want = _closed_form_bytes(model.cfg, fmt, 16)
    assert quant.weight_bytes(qp) == want
    abstract = jax.eval_shape(lambda: params)
    assert quant.bytes_by_format(abstract, 16)[fmt] == want
    deq = jax.jit(quant.dequantize_params)(qp)
    assert jax.tree_util.tree_structure(deq) == jax.tree_util.tree_structure(params)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
    fwd = jax.jit(lambda p: model.apply({"params": p}, ids))
    ref, got = fwd(params), fwd(deq)
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < (0.02 if fmt == "int8" else 0.3)


def test_bad_format_is_named():
    with pytest.raises(quant.QuantizationError, match="int3"):
        quant.quantize_params({"k": {"kernel": jnp.ones((4, 4))}}, "int3")
    with pytest.raises(quant.QuantizationError, match="group_size=3"):
        quant.quantize(jnp.ones((4, 4)), (0,), "int4", 3)
