"""Loading the published BTLM-3B-8K layout as published, and ``btlm_jax.load_model``.

Tiny checkpoints are written here in the on-disk format of cerebras/btlm-3b-8k-base (bf16
``pytorch_model.bin`` with a tied ``lm_head``, bf16 ALiBi slopes ``transformer.relative_pe.slopes``
[H, 1], GPT-2 ``vocab.json`` + ``merges.txt``, either config key generation, fixed or dynamic
``alibi_scaling``). Logits are compared with a float64 NumPy BTLM forward pass written below from
the architecture's description (independent of btlm_jax's model code), token ids with the
``tokenizers`` library and transformers' pure-Python GPT-2 tokenizer.
"""

import json
import pickle

import pytest

tokenizers = pytest.importorskip("tokenizers")

from btlm_jax.data import tokenizer as T  # noqa: E402

TEXTS = [
    "Hello world, the quick brown fox jumps over the lazy dog. " * 3,
    "def f(x):\n    return x + 1\n\n",
    "Unicode: na\u00efve caf\u00e9 \u2603 \u4e2d\u6587 and   multiple   spaces\tand tabs",
]


def write_gpt2_tokenizer(d, vocab_size=300):
    """A GPT-2 style byte-level BPE (vocab.json + merges.txt) trained on TEXTS, with
    <|endoftext|> as the last id as in GPT-2's vocabulary."""
    bl = tokenizers.ByteLevelBPETokenizer()
    bl.train_from_iterator(TEXTS, vocab_size=vocab_size - 1, show_progress=False)
    d.mkdir(parents=True, exist_ok=True)
    bl.save_model(str(d))
    vocab = json.loads((d / "vocab.json").read_text())
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    return len(vocab)


def test_gpt2_vocab_merges_tokenize_like_the_tokenizers_library(tmp_path):
    n = write_gpt2_tokenizer(tmp_path / "tok")
    tok = T.load_tokenizer(tmp_path / "tok")
    assert tok.kind == "hf" and tok.vocab_size == n and tok.eos_id == n - 1
    ref = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "tok" / "vocab.json"),
                                           str(tmp_path / "tok" / "merges.txt"))
    for text in TEXTS + ["  leading spaces\n\nand new lines", "unseen: zqxj \U0001f600"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text).ids
        assert tok.decode(ids) == text
    # <|endoftext|> is a special token, as in GPT-2's tokenizer
    assert tok.encode("a<|endoftext|>b")[1] == tok.eos_id
    # the file itself, the pickled form and a copied directory give the same tokenizer
    assert T.load_tokenizer(tmp_path / "tok" / "merges.txt").encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[1]) == tok.encode(TEXTS[1])
    out = T.copy_tokenizer_files(tmp_path / "tok", tmp_path / "run" / "tokenizer")
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    assert (out / "vocab.json").read_bytes() == (tmp_path / "tok" / "vocab.json").read_bytes()
    assert T.load_tokenizer(out).encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_gpt2_tokenizer_matches_transformers_python_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_gpt2_tokenizer(tmp_path)
    tok = T.load_tokenizer(tmp_path)
    slow = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in TEXTS + ["x<|endoftext|>y"]:
        assert tok.encode(text) == slow.encode(text)


def test_tokenizer_json_sentencepiece_and_bytes_copy_and_reload(tmp_path):
    write_gpt2_tokenizer(tmp_path / "g")
    hf_json = tmp_path / "tj" / "tokenizer.json"
    hf_json.parent.mkdir()
    T.load_tokenizer(tmp_path / "g").save(hf_json)
    for src in (hf_json, hf_json.parent):
        tok = T.load_tokenizer(src)
        out = T.copy_tokenizer_files(tok, tmp_path / "c1")
        assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]
        assert T.load_tokenizer(out).encode(TEXTS[2]) == tok.encode(TEXTS[2])
    blob = T.train_sentencepiece(TEXTS * 20, 400)
    (tmp_path / "sp.model").write_bytes(blob)
    sp = T.load_tokenizer(tmp_path / "sp.model")
    out = T.copy_tokenizer_files(sp, tmp_path / "c1")  # replaces the tokenizer.json there
    assert sorted(p.name for p in out.iterdir()) == ["sp.model"]
    assert T.load_tokenizer(out).encode(TEXTS[0]) == sp.encode(TEXTS[0])
    out = T.copy_tokenizer_files("bytes", tmp_path / "c2")
    assert T.load_tokenizer(out).kind == "bytes"


def test_tokenizer_errors_name_the_path(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(T.TokenizerError, match="no merges.txt"):
        T.load_tokenizer(tmp_path)
    with pytest.raises(T.TokenizerError, match="nothing-here"):
        T.load_tokenizer(tmp_path / "nothing-here")


# ------------------------------------------------------------------------ published BTLM format
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

torch = pytest.importorskip("torch")

N_HEAD, D, N_LAYER, D_FF, N_POS = 24, 48, 2, 64, 64


def standard_slopes(n):
    """ALiBi slopes (Press et al.): 2^(-8h/n) for a power of two n; otherwise those of the
    largest power of two p < n, then every other slope of the 2p sequence for the rest."""
    def pow2(k):
        return [2.0 ** (-8.0 * h / k) for h in range(1, k + 1)]
    p = 1
    while p * 2 <= n:
        p *= 2
    return np.array(pow2(p) + pow2(2 * p)[0::2][: n - p])


def published_config(vocab, generation, alibi_scaling):
    """config.json as cerebras/btlm-3b-8k-base publishes it, at tiny size."""
    c = {"activation_function": "swiglu", "architectures": ["BTLMLMHeadModel"],
         "model_type": "btlm", "n_embd": D, "n_head": N_HEAD, "n_inner": D_FF, "n_layer": N_LAYER,
         "n_positions": N_POS, "position_embedding_type": "alibi", "vocab_size": vocab,
         "layer_norm_epsilon": 1e-5, "initializer_range": 0.073, "scale_attn_weights": True,
         "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
         "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": vocab - 1,
         "eos_token_id": vocab - 1, "alibi_scaling": alibi_scaling, "use_cache": True}
    if generation == "mup_":
        c.update(mup_width_scale=0.5, mup_embeddings_scale=14.6, mup_output_alpha=2.22,
                 mup_scale_qk_dot_by_d=True)
    else:  # the first revision: unprefixed names, output_logits_scale = alpha * width
        c.update(width_scale=0.5, embeddings_scale=14.6, output_logits_scale=1.11,
                 scale_qk_dot_by_d=True)
    return c


def write_published_btlm(d, generation="mup_", alibi_scaling=None, seed=0, shards=1):
    """A tiny BTLM folder in the published on-disk form: bf16 pytorch_model.bin (tied lm_head
    sharing wte's storage, bf16 slopes [H, 1]), config.json, vocab.json + merges.txt."""
    vocab = write_gpt2_tokenizer(d)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.1, mean=0.0):
        return mean + std * torch.randn(*shape, generator=g)

    sd = {"transformer.wte.weight": rnd(vocab, D, std=0.08)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        sd.update({
            p + "ln_1.weight": rnd(D, mean=1.0), p + "ln_1.bias": rnd(D, std=0.05),
            p + "attn.c_attn.weight": rnd(D, 3 * D, std=0.5), p + "attn.c_attn.bias": rnd(3 * D),
            p + "attn.c_proj.weight": rnd(D, D, std=0.2), p + "attn.c_proj.bias": rnd(D),
            p + "ln_2.weight": rnd(D, mean=1.0), p + "ln_2.bias": rnd(D, std=0.05),
            p + "mlp.c_fc.weight": rnd(D, D_FF, std=0.2), p + "mlp.c_fc.bias": rnd(D_FF),
            p + "mlp.c_fc2.weight": rnd(D, D_FF, std=0.2), p + "mlp.c_fc2.bias": rnd(D_FF),
            p + "mlp.c_proj.weight": rnd(D_FF, D, std=0.2), p + "mlp.c_proj.bias": rnd(D)})
    sd["transformer.ln_f.weight"] = rnd(D, mean=1.0)
    sd["transformer.ln_f.bias"] = rnd(D, std=0.05)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    sd["transformer.relative_pe.slopes"] = torch.tensor(standard_slopes(N_HEAD))[:, None].to(
        torch.bfloat16)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied: one storage in the file
    if shards == 1:
        torch.save(sd, d / "pytorch_model.bin")
    else:
        names = sorted(sd)
        weight_map = {}
        for s in range(shards):
            fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
            part = {k: sd[k] for k in names[s::shards]}
            torch.save(part, d / fname)
            weight_map.update({k: fname for k in part})
        (d / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(published_config(vocab, generation, alibi_scaling)))
    return {k: v.float().numpy().astype(np.float64) for k, v in sd.items()}


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def reference_logits(t, c, ids, slopes=None, scaling=True):
    """float64 BTLM forward from the architecture: pre-LN blocks, fused QKV (GPT-2 Conv1D
    [in, out]), q.k / d_head (muP), ALiBi bias -(m_h / s) |i - j| with s the alibi_scaling
    divisor for this forward's key count, SwiGLU c_fc(x) * silu(c_fc2(x)), tied head,
    embeddings x embeddings_scale, logits x output scale."""
    ids = np.asarray(ids)
    b, n = ids.shape
    emb = c.get("mup_embeddings_scale", c.get("embeddings_scale"))
    out_scale = (c["mup_output_alpha"] * c["mup_width_scale"] if "mup_output_alpha" in c
                 else c["output_logits_scale"])
    h, dh = c["n_head"], c["n_embd"] // c["n_head"]
    m = t["transformer.relative_pe.slopes"][:, 0] if slopes is None else slopes
    sc, s = c.get("alibi_scaling") or {}, 1.0
    if scaling and sc.get("factor") is not None:
        s = sc["factor"]
    elif scaling and sc.get("train_seq_len") is not None and n > sc["train_seq_len"]:
        s = n / sc["train_seq_len"]
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    bias = -(m / s)[:, None, None] * np.abs(i - j)[None]
    x = t["transformer.wte.weight"][ids] * emb
    for layer in range(c["n_layer"]):
        p = f"transformer.h.{layer}."
        a = _ln(x, t[p + "ln_1.weight"], t[p + "ln_1.bias"])
        qkv = a @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = (qkv[..., z * D:(z + 1) * D].reshape(b, n, h, dh).transpose(0, 2, 1, 3)
                   for z in range(3))
        w = q @ k.transpose(0, 1, 3, 2) / dh + bias[None]
        w = np.where(j <= i, w, -np.inf)
        w = np.exp(w - w.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = (w @ v).transpose(0, 2, 1, 3).reshape(b, n, D)
        x = x + o @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        a = _ln(x, t[p + "ln_2.weight"], t[p + "ln_2.bias"])
        up = a @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"]
        gate = a @ t[p + "mlp.c_fc2.weight"] + t[p + "mlp.c_fc2.bias"]
        x = x + (up * gate / (1 + np.exp(-gate))) @ t[p + "mlp.c_proj.weight"] \
            + t[p + "mlp.c_proj.bias"]
    x = _ln(x, t["transformer.ln_f.weight"], t["transformer.ln_f.bias"])
    return x @ t["lm_head.weight"].T * out_scale


def reference_greedy(t, c, prompt, n_new):
    """Greedy decoding with the reference, one full forward per new token (so a dynamic
    alibi_scaling sees the growing key count, as the reference's cached decoding does)."""
    seq, out = list(prompt), []
    for _ in range(n_new):
        lg = reference_logits(t, c, np.array([seq]))[0, -1]
        top2 = np.sort(lg)[-2:]
        assert top2[1] - top2[0] > 1e-3 * np.abs(lg).max(), "near tie: pick another prompt"
        out.append(int(np.argmax(lg)))
        seq.append(out[-1])
    return out


def assert_logits_close(got, want):
    err = np.abs(np.asarray(got, np.float64) - want).max()
    assert err < 1e-4 * np.abs(want).max(), (err, np.abs(want).max())


def check_loaded(lm, t, c, tmp_path):
    """Token ids, logits at a short and a long length, greedy generation against the reference."""
    ref_tok = tokenizers.ByteLevelBPETokenizer(str(tmp_path / "hf" / "vocab.json"),
                                               str(tmp_path / "hf" / "merges.txt"))
    text = TEXTS[0]
    ids = lm.tokenizer.encode(text)
    assert ids == ref_tok.encode(text).ids and lm.tokenizer.decode(ids) == text
    batch = np.array([ids[:13], ids[5:18]])
    for n in (6, 13):  # below and above a dynamic train_seq_len of 8
        want = reference_logits(t, c, batch[:, :n])
        got = lm.logits(batch[:, :n])
        assert got.dtype == np.float32 and got.shape == want.shape
        assert_logits_close(got, want)
    prompt = ids[:5]
    want = reference_greedy(t, c, prompt, 8)  # crosses the dynamic train_seq_len of 8
    assert lm.generate([prompt], max_new_tokens=8, stop_at_eos=False)[0] == want
    assert lm.generate(lm.tokenizer.decode(prompt), max_new_tokens=8, stop_at_eos=False) == \
        lm.tokenizer.decode(want)


CASES = [("mup_", {"type": "linear", "train_seq_len": 8}),
         ("", {"type": "linear", "train_seq_len": 8}),
         ("mup_", None), ("", {"type": "linear", "factor": 2.0})]


@pytest.mark.parametrize("generation,alibi_scaling", CASES)
def test_published_btlm_folder_loads_in_memory(tmp_path, generation, alibi_scaling):
    import btlm_jax

    t = write_published_btlm(tmp_path / "hf", generation, alibi_scaling)
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    lm = btlm_jax.load_model(tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before  # nothing written
    assert lm.step == 0 and lm.cfg.model.n_heads == N_HEAD and lm.params is not None
    # the bf16 slopes are carried, not recomputed
    np.testing.assert_array_equal(lm.cfg.model.alibi_slopes,
                                  t["transformer.relative_pe.slopes"][:, 0])
    check_loaded(lm, t, c, tmp_path)
    if alibi_scaling and "train_seq_len" in alibi_scaling and generation:
        # prompts of different lengths in one call: each decoded with its own key count
        ids = lm.tokenizer.encode(TEXTS[1])
        prompts = [ids[:3], ids[2:9], ids[4:7]]
        want = [reference_greedy(t, c, q, 6) for q in prompts]
        assert lm.generate(prompts, max_new_tokens=6, stop_at_eos=False) == want
        # bf16 parameters and compute: same shapes, logits near the reference
        lm16 = btlm_jax.load_model(tmp_path / "hf", dtype="bfloat16")
        assert lm16.params["embed"]["embedding"].dtype.name == "bfloat16"
        ref = reference_logits(t, c, np.array([ids[:12]]))
        assert np.abs(lm16.logits([ids[:12]]) - ref).max() < 0.05 * np.abs(ref).max()


def test_reference_sees_stored_slopes_and_dynamic_scaling(tmp_path):
    """The checks above can fail: exact slopes or no dynamic scaling move logits beyond 1e-4."""
    t = write_published_btlm(tmp_path / "hf", "mup_", {"type": "linear", "train_seq_len": 8})
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    ids = np.random.RandomState(0).randint(0, c["vocab_size"], size=(2, 13))
    want = reference_logits(t, c, ids)
    stored = t["transformer.relative_pe.slopes"][:, 0]
    assert np.abs(stored / standard_slopes(N_HEAD) - 1).max() > 1e-3  # bf16 rounding
    for other in (reference_logits(t, c, ids, slopes=standard_slopes(N_HEAD)),
                  reference_logits(t, c, ids, scaling=False)):
        with pytest.raises(AssertionError):
            assert_logits_close(other, want)


def test_sharded_bin_and_safetensors_read_like_the_single_file(tmp_path):
    from safetensors.torch import save_file

    from btlm_jax.convert import hf

    write_published_btlm(tmp_path / "one")
    write_published_btlm(tmp_path / "bin", shards=3)
    one = hf.read_tensors(tmp_path / "one")
    assert one["transformer.relative_pe.slopes"].dtype.name == "bfloat16"  # stored dtype kept
    sharded = hf.read_tensors(tmp_path / "bin")
    assert sorted(sharded) == sorted(one)
    for k in one:
        np.testing.assert_array_equal(sharded[k], one[k], err_msg=k)
    # safetensors shards + model.safetensors.index.json (lm_head left out: tied)
    st = tmp_path / "st"
    st.mkdir()
    sd = torch.load(tmp_path / "one" / "pytorch_model.bin", weights_only=True)
    sd.pop("lm_head.weight")
    names, weight_map = sorted(sd), {}
    for s in range(2):
        fname = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in names[s::2]}, str(st / fname))
        weight_map.update({k: fname for k in names[s::2]})
    (st / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = hf.read_tensors(st)
    assert sorted(got) == sorted(k for k in one if k != "lm_head.weight")
    for k in got:
        np.testing.assert_array_equal(got[k], one[k], err_msg=k)
    # a shard named in the index but absent is named
    (st / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(hf.ConversionError, match="model-00002-of-00002.safetensors is listed"):
        hf.read_tensors(st)


class _NotATensor:
    pass


def test_bin_is_never_fully_unpickled_and_missing_torch_is_named(tmp_path, monkeypatch):
    from btlm_jax.convert import hf

    (tmp_path / "evil").mkdir()
    torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": _NotATensor()},
               tmp_path / "evil" / "pytorch_model.bin")
    with pytest.raises(hf.ConversionError, match=r"weights_only=True"):
        hf.read_tensors(tmp_path / "evil")
    write_published_btlm(tmp_path / "hf")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(hf.ConversionError, match=r"pytorch_model.bin.*pip install 'btlm_jax\[hf\]'"):
        hf.read_tensors(tmp_path / "hf")


def test_slopes_checked_at_their_stored_precision(tmp_path):
    from btlm_jax.convert import hf

    std = standard_slopes(N_HEAD)
    bf16 = torch.tensor(std)[:, None].to(torch.bfloat16)
    # bf16-rounded slopes (off by up to 0.4%) are accepted at bf16 precision and carried
    carried = hf.checked_slopes({"transformer.relative_pe.slopes": hf_array(bf16)}, N_HEAD)
    np.testing.assert_array_equal(carried, bf16.float().numpy()[:, 0])
    # the bf16 values re-exported as float32 are still accepted (export -> import)
    assert hf.checked_slopes({"transformer.relative_pe.slopes": bf16.float().numpy()},
                             N_HEAD) == carried
    # exact float32 slopes need not be carried; a 0.2% error in float32 values is refused
    assert hf.checked_slopes({"transformer.relative_pe.slopes": std[:, None].astype(np.float32)},
                             N_HEAD) == ()
    with pytest.raises(hf.ConversionError, match="float32 precision"):
        hf.checked_slopes({"transformer.relative_pe.slopes":
                           (std[:, None] * 1.002).astype(np.float32)}, N_HEAD)
    # slopes of another head count or order are refused, naming the tensor
    with pytest.raises(hf.ConversionError, match="relative_pe.slopes are not the standard"):
        hf.checked_slopes({"transformer.relative_pe.slopes": hf_array(bf16.flip(0))}, N_HEAD)


def hf_array(t):
    import ml_dtypes

    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _convert(*args):
    out = subprocess.run([sys.executable, "-m", "btlm_jax.convert", *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_convert_import_load_run_export_round_trip(tmp_path):
    """`convert import` of the published format (first-revision keys, dynamic alibi_scaling)
    -> load_model(run_dir) equals the reference -> `convert export` -> the same tensors, slopes,
    alibi_scaling and tokenizer files back."""
    import btlm_jax
    from btlm_jax.convert import hf

    dyn = {"type": "linear", "train_seq_len": 8}
    t = write_published_btlm(tmp_path / "hf", "", dyn)
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    _convert("import", f"--hf_dir={tmp_path / 'hf'}", f"--workdir={tmp_path / 'run'}")
    for name in ("vocab.json", "merges.txt"):  # the tokenizer is pinned into the run
        assert (tmp_path / "run" / "tokenizer" / name).read_bytes() == \
            (tmp_path / "hf" / name).read_bytes()
    lm = btlm_jax.load_model(tmp_path / "run")
    assert lm.cfg.model.alibi_scaling_train_seq_len == 8
    # held padded (model.pad_multiple=128: vocabulary 300 -> 384, d_ff 64 -> 128), exported cut
    assert lm.params["embed"]["embedding"].shape == (384, D) and c["vocab_size"] == 300
    assert lm.params["layers"]["mlp"]["wo"]["kernel"].shape == (N_LAYER, 128, D)
    check_loaded(lm, t, c, tmp_path)

    _convert("export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'out'}")
    out = tmp_path / "out"
    written = json.loads((out / "config.json").read_text())
    assert written["alibi_scaling"] == dyn and written["n_head"] == N_HEAD
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    back = hf.read_tensors(out)
    np.testing.assert_array_equal(back["transformer.relative_pe.slopes"].astype(np.float64),
                                  t["transformer.relative_pe.slopes"])
    for k, v in back.items():  # the bf16 weights come back exactly (float32 holds them)
        np.testing.assert_array_equal(np.asarray(v, np.float64), t[k], err_msg=k)
    cfg2, params2, _ = hf.load_hf(out)
    assert cfg2.model.alibi_slopes == lm.cfg.model.alibi_slopes
    assert cfg2.model.alibi_scaling_train_seq_len == 8
    import jax

    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(lm.params)[0],
                                 jax.tree_util.tree_flatten_with_path(params2)[0]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
    # an export of a run without dynamic scaling writes none, even with train_seq_len set
    assert hf.hf_config(_without_dynamic(lm.cfg.model), "btlm")["alibi_scaling"] is None


def _without_dynamic(m):
    import copy

    m = copy.deepcopy(m)
    m.alibi_scaling_train_seq_len = 0
    assert m.train_seq_len == 8
    return m


def test_effective_slopes_semantics():
    """Carried slopes; fixed factor; dynamic train_seq_len by key count (static or traced);
    position interpolation on top of dynamic scaling takes the larger divisor."""
    import jax
    import jax.numpy as jnp

    from btlm_jax.config import ConfigError, default_config, validate
    from btlm_jax.models.alibi import effective_slopes

    cfg = default_config()
    m = cfg.model
    m.n_heads, m.d_model = 6, 48
    std = standard_slopes(6)
    np.testing.assert_allclose(effective_slopes(m, 10), std, rtol=1e-7)
    carried = tuple(float(x) for x in torch.tensor(std).to(torch.bfloat16).float())
    m.alibi_slopes = carried
    np.testing.assert_array_equal(effective_slopes(m, 10), np.float32(carried))
    m.alibi_scaling = 2.0
    np.testing.assert_allclose(effective_slopes(m, 100, 3.0), np.float32(carried) / 6.0, rtol=1e-6)
    m.alibi_scaling, m.alibi_scaling_train_seq_len = 1.0, 8
    for key_len, div in ((4, 1.0), (8, 1.0), (12, 1.5), (32, 4.0)):
        np.testing.assert_allclose(effective_slopes(m, key_len), np.float32(carried) / div, rtol=1e-6)
        traced = jax.jit(lambda k: effective_slopes(m, k))(jnp.int32(key_len))
        np.testing.assert_allclose(traced, np.float32(carried) / div, rtol=1e-6)
    np.testing.assert_allclose(effective_slopes(m, 12, 2.0), np.float32(carried) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(effective_slopes(m, 32, 2.0), np.float32(carried) / 4.0, rtol=1e-6)
    m.alibi_scaling = 2.0  # fixed and dynamic together: refused, naming both keys
    with pytest.raises(ConfigError, match="alibi_scaling_train_seq_len"):
        validate(cfg)
    m.alibi_scaling, m.alibi_slopes = 1.0, carried[:4]
    with pytest.raises(ConfigError, match="model.alibi_slopes has 4 values: give 6"):
        validate(cfg)


# ----------------------------------------------------------------------------------------------
# a run directory imported from the published format with a dynamic alibi_scaling (issues 28, 30)


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    """The published layout with ``alibi_scaling: {"train_seq_len": 8}``, imported in process
    into a run directory: (reference tensors, config.json, the folder holding hf/ and run/)."""
    from btlm_jax.convert.workdir import import_checkpoint

    d = tmp_path_factory.mktemp("dynamic")
    t = write_published_btlm(d / "hf", "mup_", {"type": "linear", "train_seq_len": 8})
    c = json.loads((d / "hf" / "config.json").read_text())
    import_checkpoint(str(d / "hf"), str(d / "run"))
    return t, c, d


def test_generate_cli_decodes_mixed_prompt_lengths_with_their_own_key_counts(dynamic_run):
    """`btlm-generate` with a 3-token and a 9-token prompt: batched together, the short prompt's
    left padding would count as keys and switch the dynamic scaling on (3 + 6 <= 8 keys of its
    own, 9 + 6 in the batch). Each greedy continuation must equal the float64 reference's."""
    t, c, d = dynamic_run
    tok = T.load_tokenizer(d / "hf")
    ids = tok.encode(TEXTS[1])
    prompts = [tok.decode(ids[:3]), tok.decode(ids[:9])]
    enc = [tok.encode(p) for p in prompts]
    assert [len(e) for e in enc] == [3, 9]
    r = subprocess.run([sys.executable, "-m", "btlm_jax.generate", f"--workdir={d / 'run'}",
                        *[f"--prompt={p}" for p in prompts], "--max_new_tokens=6",
                        "--temperature=0", "--json"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    gens = json.loads(r.stdout.strip().splitlines()[-1])["generations"]
    for g, e in zip(gens, enc):
        want = reference_greedy(t, c, e, 6)
        if tok.eos_id in want:  # generation stops after the end-of-text token
            want = want[:want.index(tok.eos_id) + 1]
        assert g["tokens"] == want, (g["prompt"], g["tokens"], want)


def test_load_model_casts_a_run_directory_to_bfloat16(dynamic_run):
    import jax

    import btlm_jax
    from btlm_jax.api import LoadError

    t, c, d = dynamic_run
    lm16 = btlm_jax.load_model(d / "run", dtype="bfloat16")
    assert lm16.cfg.model.dtype == lm16.cfg.model.param_dtype == "bfloat16"
    assert {x.dtype.name for x in jax.tree_util.tree_leaves(lm16.params)} == {"bfloat16"}
    ids = T.load_tokenizer(d / "hf").encode(TEXTS[0])[:12]
    ref = reference_logits(t, c, np.array([ids]))  # 12 keys: the dynamic scaling acts
    err = np.abs(lm16.logits([ids]) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err
    # the float32 run is within 1e-4 of the reference, bf16 is not (it is a different model)
    assert err > 1e-4 * np.abs(ref).max()
    with pytest.raises(LoadError, match="float16"):
        btlm_jax.load_model(d / "run", dtype="float16")
