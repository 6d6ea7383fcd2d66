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


def test_load_model_on_a_gpt2_folder_matches_transformers(tmp_path):
    """btlm_jax.load_model(HF folder): GPT-2 tokenizer files, logits and greedy decoding equal
    transformers' on the same folder (nothing is written into it)."""
    tokenizers = pytest.importorskip("tokenizers")
    import btlm_jax

    text = "the quick brown fox jumps over the lazy dog; the lazy dog sleeps. " * 4
    bl = tokenizers.ByteLevelBPETokenizer()
    bl.train_from_iterator([text], vocab_size=299, show_progress=False)
    path = tmp_path / "hf"
    path.mkdir()
    bl.save_model(str(path))
    vocab = json.loads((path / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=48, n_layer=2,
                                  n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(path, safe_serialization=True)
    before = sorted(p.name for p in path.iterdir())
    lm = btlm_jax.load_model(path)
    assert sorted(p.name for p in path.iterdir()) == before
    slow = transformers.GPT2Tokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    ids = lm.tokenizer.encode(text)
    assert ids == slow.encode(text) and lm.tokenizer.eos_id == len(vocab) - 1
    batch = np.array([ids[:20], ids[7:27]])
    with torch.no_grad():
        want = ref(torch.tensor(batch)).logits.numpy()
        gen = ref.generate(torch.tensor([ids[:6]]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                           do_sample=False, max_new_tokens=10, min_new_tokens=10,
                           pad_token_id=len(vocab) - 1)[0, 6:].tolist()
    got = lm.logits(batch)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert lm.generate([ids[:6]], max_new_tokens=10, stop_at_eos=False)[0] == gen
