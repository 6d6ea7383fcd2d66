"""GPT-2 / Cerebras-GPT layout: our model on an imported, randomly initialised transformers
GPT2LMHeadModel gives the transformers logits; export goes back to a checkpoint transformers loads."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from btlm_jax.convert import hf  # noqa: E402
from btlm_jax.models.btlm import BTLM  # noqa: E402


def _random_gpt2(tmp_path, activation="gelu_new", tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=101, n_positions=40, n_embd=48, n_layer=2, n_head=4, n_inner=None,
        activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=tie)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make every parameter non-trivial (LayerNorms start at 1/0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path / "hf"
    model.save_pretrained(out, safe_serialization=True)
    return model, out


@pytest.mark.parametrize("activation,tie,scan", [("gelu_new", True, True), ("gelu", False, False)])
def test_gpt2_logits_match_transformers(tmp_path, activation, tie, scan):
    ref, path = _random_gpt2(tmp_path, activation, tie)
    assert (path / "model.safetensors").exists()
    cfg, params, layout = hf.load_hf(path, scan_layers=scan)
    assert layout == "gpt2" and cfg.model.position == "learned" and not cfg.model.mup.enabled
    assert cfg.model.tie_embeddings == tie
    ids = np.random.RandomState(1).randint(0, 101, size=(2, 17))
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(BTLM(cfg.model).apply({"params": params}, jnp.asarray(ids, jnp.int32)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


def test_gpt2_export_loads_in_transformers(tmp_path):
    ref, path = _random_gpt2(tmp_path)
    cfg, params, layout = hf.load_hf(path)
    out = hf.save_hf(params, cfg.model, tmp_path / "exported", layout)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    sd_ref, sd_back = ref.state_dict(), back.state_dict()
    for k, v in sd_ref.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        np.testing.assert_array_equal(sd_back[k].numpy(), v.numpy(), err_msg=k)
    ids = torch.tensor([[5, 7, 11, 13, 17]])
    with torch.no_grad():
        np.testing.assert_allclose(back(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-6)


def test_shape_mismatch_names_the_tensor(tmp_path):
    _, path = _random_gpt2(tmp_path)
    c = json.loads((path / "config.json").read_text())
    c["n_inner"] = 128  # the weights have 4 * 48 = 192
    (path / "config.json").write_text(json.dumps(c))
    with pytest.raises(hf.ConversionError) as e:
        hf.load_hf(path)
    msg = str(e.value)
    assert "transformer.h.0.mlp.c_fc.weight" in msg and "(48, 192)" in msg and "(48, 128)" in msg
