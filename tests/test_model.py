"""Model tests against independent references: closed forms and a float64 NumPy forward pass."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from btlm_jax.config import default_config
from btlm_jax.models.alibi import alibi_bias, alibi_slopes, interpolation_scale
from btlm_jax.models.btlm import BTLM


def small_cfg(**kw):
    c = default_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 97, 64, 2, 4, 96
    m.mup.base_d_model, m.mup.base_d_ff = 32, 40.0
    for k, v in kw.items():
        setattr(m, k, v)
    return c


def init(cfg, seed=0, length=8):
    model = BTLM(cfg.model)
    params = nn.unbox(model.init(jax.random.PRNGKey(seed), jnp.zeros((1, length), jnp.int32)))
    return model, params["params"]


# ---------------------------------------------------------------------------------- ALiBi
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_alibi_slopes_power_of_two(n):
    want = np.array([2.0 ** (-8.0 * h / n) for h in range(1, n + 1)])
    np.testing.assert_allclose(alibi_slopes(n), want, rtol=0, atol=0)


def test_alibi_slopes_non_power_of_two():
    # 12 heads: the 8 slopes of n=8, then slopes 1, 3, 5, 7 (1-based odd) of n=16.
    s8 = [2.0 ** (-h) for h in range(1, 9)]
    s16_odd = [2.0 ** (-0.5 * h) for h in (1, 3, 5, 7)]
    np.testing.assert_allclose(alibi_slopes(12), s8 + s16_odd)
    # 6 heads: 4 slopes of n=4 then slopes 1, 3 of n=8.
    np.testing.assert_allclose(alibi_slopes(6), [2.0 ** (-2 * h) for h in range(1, 5)] + [0.5, 0.125])


def test_alibi_bias_closed_form_and_interpolation():
    n, length = 4, 7
    pos = jnp.arange(length)[None]
    for scale in (1.0, 2.5):
        bias = np.asarray(alibi_bias(n, pos, pos, scale))[0]
        m = alibi_slopes(n)
        for h in range(n):
            for i in range(length):
                for j in range(i + 1):
                    assert bias[h, i, j] == pytest.approx(-(m[h] / scale) * (i - j), rel=1e-6)
    assert interpolation_scale(512, 128) == 4.0
    assert interpolation_scale(64, 128) == 1.0


# ---------------------------------------------------------------------- reference forward
def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x, tanh):
    if tanh:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def numpy_forward(cfg, params, tokens, alibi_scale=1.0):
    """Independent float64 forward pass written from the BTLM / GPT-2 equations."""
    m = cfg.model
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    d, h = m.d_model, m.n_heads
    dh = d // h
    w = d / m.mup.base_d_model if m.mup.enabled else 1.0
    length = tokens.shape[1]
    x = p["embed"]["embedding"][tokens]
    if m.position == "learned":
        x = x + p["pos_embed"]["embedding"][np.arange(length)][None]
    x = x * (m.mup.embed_mult if m.mup.enabled else 1.0)
    slopes = alibi_slopes(h)
    scale = 1.0 / dh if m.mup.enabled else 1.0 / math.sqrt(dh)
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    for layer in range(m.n_layers):
        lp = jax.tree_util.tree_map(lambda a: a[layer], p["layers"])
        a = _ln(x, lp["ln_1"], m.layer_norm_eps)
        q, k, v = (np.einsum("bld,dhk->blhk", a, lp["attn"][n]["kernel"]) + lp["attn"][n]["bias"]
                   for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bshk->bhqs", q, k) * scale
        if m.position == "alibi":
            logits = logits - (slopes[:, None, None] / (alibi_scale * m.alibi_scaling)) * (i - j)
        logits = np.where(j <= i, logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        att = np.einsum("bhqs,bshk->bqhk", probs, v)
        x = x + np.einsum("bqhk,hkd->bqd", att, lp["attn"]["out"]["kernel"]) + lp["attn"]["out"]["bias"]
        a = _ln(x, lp["ln_2"], m.layer_norm_eps)
        mp = lp["mlp"]
        if m.activation == "swiglu":
            g = a @ mp["wi_0"]["kernel"] + mp["wi_0"]["bias"]
            u = a @ mp["wi_1"]["kernel"] + mp["wi_1"]["bias"]
            hid = g / (1 + np.exp(-g)) * u
        else:
            hid = _gelu(a @ mp["wi"]["kernel"] + mp["wi"]["bias"], m.activation == "gelu_tanh")
        x = x + hid @ mp["wo"]["kernel"] + mp["wo"]["bias"]
    x = _ln(x, p["ln_f"], m.layer_norm_eps)
    out_mult = m.mup.output_mult / w if m.mup.enabled else 1.0
    return x @ p["embed"]["embedding"].T * out_mult


@pytest.mark.parametrize("variant", [
    dict(),
    dict(n_heads=8, alibi_scaling=2.0),
    dict(position="learned", activation="gelu", mup=dict(enabled=False)),
    dict(activation="gelu_tanh", n_heads=2),
])
def test_forward_matches_numpy_reference(variant):
    variant = dict(variant)
    mup = variant.pop("mup", None)
    cfg = small_cfg(**variant)
    if mup:
        cfg.model.mup.enabled = mup["enabled"]
    model, params = init(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 9))
    got = model.apply({"params": params}, jnp.asarray(tokens))
    # the reference runs on the arrays as allocated (vocabulary and d_ff padded to
    # model.pad_multiple); the model's logits stop at the logical vocabulary
    v = cfg.model.vocab_size
    want = numpy_forward(cfg, params, tokens)[..., :v]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    got_pi = model.apply({"params": params}, jnp.asarray(tokens), alibi_scale=3.0)
    if cfg.model.position == "alibi":
        np.testing.assert_allclose(np.asarray(got_pi),
                                   numpy_forward(cfg, params, tokens, 3.0)[..., :v],
                                   rtol=2e-4, atol=2e-4)


def test_scan_and_unrolled_layers_agree():
    cfg = small_cfg()
    model, params = init(cfg)
    cfg2 = small_cfg(scan_layers=False)
    model2 = BTLM(cfg2.model)
    unrolled = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.model.n_layers):
        unrolled[f"layers_{i}"] = jax.tree_util.tree_map(lambda a: a[i], params["layers"])
    tokens = jnp.arange(12)[None] % cfg.model.vocab_size
    np.testing.assert_allclose(model.apply({"params": params}, tokens),
                               model2.apply({"params": unrolled}, tokens), rtol=1e-5, atol=1e-5)


def test_causality():
    cfg = small_cfg()
    model, params = init(cfg)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.model.vocab_size, (1, 16))
    base = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    for t in (5, 10, 15):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % cfg.model.vocab_size
        out = np.asarray(model.apply({"params": params}, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert np.abs(out[0, t:] - base[0, t:]).max() > 0


def test_segment_ids_block_cross_document_attention():
    cfg = small_cfg()
    model, params = init(cfg)
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 97, (1, 5)), rng.integers(0, 97, (1, 7))
    packed = np.concatenate([a, b], 1)
    seg = np.array([[1] * 5 + [2] * 7])
    pos = np.array([list(range(5)) + list(range(7))])
    out = np.asarray(model.apply({"params": params}, jnp.asarray(packed), jnp.asarray(seg), jnp.asarray(pos)))
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(b)))
    np.testing.assert_allclose(out[0, 5:], alone[0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ muP
def test_mup_init_scales():
    cfg = small_cfg(d_model=512, n_heads=8, d_ff=1024, n_layers=3, vocab_size=2048)
    cfg.model.mup.base_d_model, cfg.model.mup.base_d_ff = 128, 256.0
    _, params = init(cfg)
    sigma, w, n_layers = cfg.model.init_std, 4.0, 3
    trunc = stats.truncnorm(-2, 2).std()  # std of a normal truncated at 2 sigma, per unit sigma
    expect = {
        ("embed", "embedding"): sigma,
        ("layers", "attn", "query", "kernel"): sigma / math.sqrt(w),
        ("layers", "mlp", "wi_0", "kernel"): sigma / math.sqrt(w),
        ("layers", "attn", "out", "kernel"): sigma / math.sqrt(w) / math.sqrt(2 * n_layers),
        ("layers", "mlp", "wo", "kernel"): sigma / math.sqrt(w) / math.sqrt(2 * n_layers),
    }
    for path, s in expect.items():
        arr = params
        for k in path:
            arr = arr[k]
        arr = np.asarray(arr, np.float64)
        assert arr.std() == pytest.approx(s * trunc, rel=0.03), path
        assert np.abs(arr).max() <= 2 * s * (1 + 1e-6), path
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["query"]["bias"]), 0)
    np.testing.assert_array_equal(np.asarray(params["layers"]["ln_1"]["scale"]), 1)


# ----------------------------------------------------------------------- parameter count
def closed_form_btlm_params(V, d, L, ff):
    attn = 4 * (d * d + d)  # q, k, v, out with biases
    mlp = 2 * (d * ff + ff) + (ff * d + d)  # SwiGLU: two input projections and the output
    norms = 2 * 2 * d
    return V * d + L * (attn + mlp + norms) + 2 * d


def test_3b_8k_parameter_count_matches_closed_form():
    from btlm_jax.describe import describe
    from configs.btlm import get_config

    info = describe(get_config("3b_8k"))
    want = closed_form_btlm_params(50257, 2560, 32, 6826)
    assert info["num_params"] == want
    assert 2.6e9 < want < 2.7e9  # "2.6B" in the paper, ~2.65B exactly
    # 6N + attention term at seq 8192 (causal, counted at half).
    n_mm = 32 * (4 * 2560**2 + 3 * 2560 * 6826) + 50257 * 2560
    assert info["flops_per_token"] == 6 * n_mm + 6 * 32 * 8192 * 2560
