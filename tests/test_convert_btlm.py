"""BTLM layout (cerebras/btlm-3b-8k-base): names and shapes against the published model, the
published config's muP/ALiBi keys, export -> import identity, and our logits against a float64
NumPy forward pass written from the published modeling code's equations."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors")

from btlm_jax.config import default_config  # noqa: E402
from btlm_jax.convert import hf  # noqa: E402
from btlm_jax.models.btlm import BTLM  # noqa: E402
from btlm_jax.models.padding import to_logical, to_physical  # noqa: E402

# https://huggingface.co/cerebras/btlm-3b-8k-base/blob/main/config.json (the values that matter)
PUBLISHED = {
    "activation_function": "swiglu", "architectures": ["BTLMLMHeadModel"],
    "initializer_range": 0.073, "layer_norm_epsilon": 1e-05, "model_type": "btlm",
    "mup_embeddings_scale": 14.6, "mup_output_alpha": 2.2200000000000003,
    "mup_scale_qk_dot_by_d": True, "mup_width_scale": 0.1, "n_embd": 2560, "n_head": 32,
    "n_inner": 6826, "n_layer": 32, "n_positions": 8192, "position_embedding_type": "alibi",
    "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True, "vocab_size": 50257,
}
# The first public revision used unprefixed muP names (output_logits_scale = alpha * width).
PUBLISHED_OLD = {k: v for k, v in PUBLISHED.items() if not k.startswith("mup_")}
PUBLISHED_OLD.update(embeddings_scale=14.6, output_logits_scale=0.22200000000000003,
                     scale_qk_dot_by_d=True, width_scale=0.1)


def published_layout(D=2560, L=32, H=32, F=6826, V=50257):
    """Tensor names/shapes of BTLMLMHeadModel (GPT-2 Conv1D weights are [in, out])."""
    want = {"transformer.wte.weight": (V, D), "transformer.relative_pe.slopes": (H, 1),
            "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    for i in range(L):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            want[p + ln + ".weight"] = (D,)
            want[p + ln + ".bias"] = (D,)
        want[p + "attn.c_attn.weight"], want[p + "attn.c_attn.bias"] = (D, 3 * D), (3 * D,)
        want[p + "attn.c_proj.weight"], want[p + "attn.c_proj.bias"] = (D, D), (D,)
        for fc in ("c_fc", "c_fc2"):
            want[p + f"mlp.{fc}.weight"], want[p + f"mlp.{fc}.bias"] = (D, F), (F,)
        want[p + "mlp.c_proj.weight"], want[p + "mlp.c_proj.bias"] = (F, D), (D,)
    return want


def preset_3b():
    from configs.btlm import get_config

    return get_config("3b_8k")


def test_3b_8k_tensor_names_and_shapes_match_published_layout():
    got = hf.expected_shapes(preset_3b().model, "btlm")
    want = published_layout()
    assert sorted(set(got) ^ set(want)) == []
    assert {k: got[k] for k in want} == want
    # 2,646,255,744 parameters + the 32 ALiBi slopes stored as a parameter
    assert sum(int(np.prod(s)) for s in got.values()) == 2_646_255_744 + 32


def test_3b_8k_config_matches_published_config():
    m = preset_3b().model
    assert m.train_seq_len > 0  # a PI reference length, not a request for dynamic scaling
    c = hf.hf_config(m, "btlm")
    for k, v in PUBLISHED.items():
        assert c[k] == pytest.approx(v) if isinstance(v, float) else c[k] == v, k
    assert c["alibi_scaling"] is None  # as published: no dynamic PI switched on for HF users


def test_export_writes_alibi_scaling_only_when_the_run_asks():
    m = small_cfg().model
    m.train_seq_len = 64
    assert hf.hf_config(m, "btlm")["alibi_scaling"] is None
    m.alibi_scaling_train_seq_len = 32
    assert hf.hf_config(m, "btlm")["alibi_scaling"] == {"type": "linear", "train_seq_len": 32}
    m.alibi_scaling_train_seq_len, m.alibi_scaling = 0, 2.0
    assert hf.hf_config(m, "btlm")["alibi_scaling"] == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize("published", [PUBLISHED, PUBLISHED_OLD])
def test_published_config_imports_as_the_3b_8k_preset(published):
    layout, ov = hf.model_overrides(dict(published))
    assert layout == "btlm"
    cfg = hf.apply_overrides(default_config(), ov)
    m, p = cfg.model, preset_3b().model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "activation", "position",
                "max_seq_len", "layer_norm_eps", "tie_embeddings", "alibi_scaling"):
        assert m[key] == p[key], key
    assert m.mup.enabled and m.mup.base_d_model == 256.0
    assert m.mup.base_d_ff == pytest.approx(p.mup.base_d_ff, rel=1e-3)
    assert m.mup.embed_mult == pytest.approx(14.6) and m.mup.output_mult == pytest.approx(2.22)


def test_alibi_scaling_keys_import():
    _, ov = hf.model_overrides({**PUBLISHED, "alibi_scaling": {"type": "linear", "factor": 4.0}})
    assert ov["alibi_scaling"] == 4.0
    assert ov["alibi_scaling_train_seq_len"] == 0
    _, ov = hf.model_overrides({**PUBLISHED, "alibi_scaling": {"type": "linear", "train_seq_len": 8192}})
    assert ov["train_seq_len"] == 8192 and ov["alibi_scaling"] == 1.0
    assert ov["alibi_scaling_train_seq_len"] == 8192  # dynamic: applied in every forward
    _, ov = hf.model_overrides({**PUBLISHED, "alibi_scaling": None})
    assert ov["alibi_scaling"] == 1.0 and ov["alibi_scaling_train_seq_len"] == 0
    with pytest.raises(hf.ConversionError, match="alibi_scaling"):
        hf.model_overrides({**PUBLISHED, "alibi_scaling": {"type": "dynamic", "factor": 2.0}})


# ---------------------------------------------------------------------------- small models
def small_cfg(tie=True, scan=True, alibi_scaling=1.0, n_heads=4):
    c = default_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 89, 48, 2, n_heads, 72
    m.mup.base_d_model, m.mup.base_d_ff = 24, 36.0  # width multiplier 2
    m.tie_embeddings, m.scan_layers, m.alibi_scaling = tie, scan, alibi_scaling
    return c


def random_params(m, seed=0):
    init = jax.jit(lambda r: nn.unbox(BTLM(m).init(r, jnp.zeros((1, 8), jnp.int32)))["params"])
    p = to_logical(init(jax.random.PRNGKey(seed)), m)
    rs = np.random.RandomState(seed + 1)  # perturb everything (LayerNorms start at 1 / 0)
    p = jax.tree_util.tree_map(
        lambda x: np.asarray(x) + 0.1 * rs.standard_normal(x.shape).astype(np.float32), p)
    return to_physical(p, m)  # the padding of model.pad_multiple stays zero, as in training


@pytest.mark.parametrize("tie,scan,factor", [(True, True, 1.0), (False, False, 2.5)])
def test_export_import_is_identity(tmp_path, tie, scan, factor):
    cfg = small_cfg(tie, scan, factor)
    params = random_params(cfg.model)
    out = hf.save_hf(params, cfg.model, tmp_path / "btlm", "btlm")
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == "btlm" and written["mup_width_scale"] == 0.5
    cfg2, params2, layout = hf.load_hf(out, scan_layers=scan)
    assert layout == "btlm"
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "activation", "position",
                "alibi_scaling", "tie_embeddings", "layer_norm_eps", "max_seq_len"):
        assert cfg2.model[key] == cfg.model[key], key
    for key in ("enabled", "base_d_model", "base_d_ff", "embed_mult", "output_mult"):
        assert cfg2.model.mup[key] == pytest.approx(cfg.model.mup[key]), key
    a, b = jax.tree_util.tree_flatten_with_path(params), jax.tree_util.tree_flatten_with_path(params2)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params2)
    for (path, x), (_, y) in zip(a[0], b[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def reference_btlm_logits(t, c, ids):
    """float64 NumPy forward of BTLMLMHeadModel from its tensors and config.json."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    d, n_h, eps = c["n_embd"], c["n_head"], c["layer_norm_epsilon"]
    dh = d // n_h
    b, n = ids.shape
    x = t["transformer.wte.weight"][ids] * c["mup_embeddings_scale"]
    factor = (c.get("alibi_scaling") or {}).get("factor", 1.0)
    slopes = t["transformer.relative_pe.slopes"][:, 0] / factor
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    alibi = -slopes[:, None, None] * np.abs(j - i)[None]  # [H, n, n]
    causal = j <= i
    power = 1.0 if c["mup_scale_qk_dot_by_d"] else 0.5
    for layer in range(c["n_layer"]):
        p = f"transformer.h.{layer}."
        h = _layer_norm(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"], eps)
        qkv = h @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = (qkv[..., s * d:(s + 1) * d].reshape(b, n, n_h, dh).transpose(0, 2, 1, 3)
                   for s in range(3))
        att = q @ k.transpose(0, 1, 3, 2) / dh ** power + alibi[None]
        att = np.where(causal, att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + o @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = _layer_norm(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"], eps)
        up = h @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]
        gate = h @ t[p + "mlp.c_fc2.weight"] + t[p + "mlp.c_fc2.bias"]
        x = x + (up * gate / (1 + np.exp(-gate))) @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    x = _layer_norm(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"], eps)
    head = t.get("lm_head.weight", t["transformer.wte.weight"])
    return x @ head.T * c["mup_output_alpha"] * c["mup_width_scale"]


@pytest.mark.parametrize("tie,factor,n_heads", [(True, 1.0, 4), (False, 2.0, 6)])
def test_imported_btlm_matches_numpy_reference_of_published_model(tmp_path, tie, factor, n_heads):
    cfg = small_cfg(tie, True, factor, n_heads)
    out = hf.save_hf(random_params(cfg.model, seed=3), cfg.model, tmp_path / "btlm", "btlm")
    tensors = hf.read_tensors(out)
    c = json.loads((out / "config.json").read_text())
    ids = np.random.RandomState(0).randint(0, cfg.model.vocab_size, size=(2, 13))
    want = reference_btlm_logits(tensors, c, ids)
    cfg2, params, _ = hf.load_hf(out)
    got = np.asarray(BTLM(cfg2.model).apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_mismatched_checkpoint_is_refused_with_names(tmp_path):
    cfg = small_cfg()
    out = hf.save_hf(random_params(cfg.model), cfg.model, tmp_path / "btlm", "btlm")
    c = json.loads((out / "config.json").read_text())
    c["n_embd"] = 64
    (out / "config.json").write_text(json.dumps(c))
    with pytest.raises(hf.ConversionError) as e:
        hf.load_hf(out)
    msg = str(e.value)
    assert "transformer.h.0.attn.c_attn.weight: checkpoint (48, 144), config expects (64, 192)" in msg
    assert "n_embd=64" in msg
    c["n_embd"], c["activation_function"] = 48, "gelu"  # no c_fc2 expected now
    (out / "config.json").write_text(json.dumps(c))
    with pytest.raises(hf.ConversionError, match=r"unexpected tensors: transformer\.h\.0\.mlp\.c_fc2"):
        hf.load_hf(out)
    c["model_type"] = "llama"
    (out / "config.json").write_text(json.dumps(c))
    with pytest.raises(hf.ConversionError, match="model_type='llama'"):
        hf.load_hf(out)
