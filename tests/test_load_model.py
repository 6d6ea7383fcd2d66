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
