"""End-to-end: text file -> espeak-ng synthesis -> train text-only and multi-modal -> results."""

import json
import os

import numpy as np
import pytest

from btlm_jax.punctuation import config as cfg_mod
from btlm_jax.punctuation import main as main_mod
from btlm_jax.punctuation import synth


def _write_text(path, n_sentences=70, seed=0):
    rng = np.random.default_rng(seed)
    nouns = "cat dog river house garden teacher window engine letter market".split()
    verbs = "sees finds likes moves opens paints follows keeps".split()
    adjs = "small quiet green old bright heavy".split()
    docs = []
    for d in range(10):
        sents = []
        for _ in range(n_sentences // 10):
            a, b = rng.choice(nouns, 2)
            s = f"The {rng.choice(adjs)} {a} {rng.choice(verbs)} the {b}"
            kind = rng.integers(0, 3)
            if kind == 0:
                s += f", and the {rng.choice(nouns)} waits."
            elif kind == 1:
                s = f"Does the {a} {rng.choice(verbs)[:-1]} the {b}?"
            else:
                s += "."
            sents.append(s)
        docs.append(" ".join(sents))
    path.write_text("\n\n".join(docs) + "\n")


def _expected_params(m, acoustic):
    n = m.projection_dim * m.bottleneck_dim + m.bottleneck_dim
    d_in = m.bottleneck_dim
    if acoustic:
        n += 5 * m.acoustic_dim + m.acoustic_dim
        d_in += m.acoustic_dim
    for _ in range(m.n_layers):
        n += 2 * (m.kernel_width * d_in * 3 * m.hidden_dim + 3 * m.hidden_dim)
        d_in = 2 * m.hidden_dim
    return n + d_in * 4 + 4


@pytest.mark.slow
def test_end_to_end_handful_of_utterances(tmp_path):
    pytest.importorskip("espeakng_loader")
    text = tmp_path / "prose.txt"
    _write_text(text)
    c = cfg_mod.default_config()
    c.data.text = str(text)
    c.data.cache_dir = str(tmp_path / "data")
    c.data.min_words, c.data.max_words = 6, 16
    c.data.test_fraction = 0.3
    c.data.n_train, c.data.n_test = 12, 5
    m = c.model
    m.projection_dim, m.bottleneck_dim, m.acoustic_dim, m.hidden_dim, m.n_layers = 32, 8, 4, 8, 1
    c.train.steps, c.train.batch_size, c.train.log_every, c.train.checkpoint_every = 6, 4, 3, 6
    c.eval.batch_size, c.eval.latency_utterances, c.eval.min_support = 8, 2, 1

    res = main_mod.run(c, tmp_path / "run", log=lambda *_: None)

    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(on_disk["models"]) == {"text", "multimodal"}
    assert set(on_disk["multimodal_beats_text"]) == {"test", "test_voice2"}
    test_words = sum(len(r["words"]) for r in synth.load_split(c.data.cache_dir, "test"))
    for kind, e in res["models"].items():
        assert e["params"] == _expected_params(m, kind == "multimodal")
        assert e["int8_bytes"] < e["float32_bytes"] / 2
        assert e["latency"]["median_ms"] > 0 and e["latency"]["n"] == 2
        for split in ("test", "test_voice2"):
            r = e[split]
            assert sum(v["support"] for v in r["per_class"].values()) == test_words
            assert 0.0 <= r["macro_f1"] <= 1.0
            assert np.sum(r["confusion"]) == test_words
    assert (tmp_path / "run" / "ckpt" / "multimodal" / "6").is_dir()

    # Re-running the synthesis is incremental: nothing is re-synthesised.
    utts = sorted((tmp_path / "data" / "utts").iterdir())
    before = {p: os.stat(p).st_mtime_ns for p in utts}
    synth.build(c, c.data.cache_dir, verbose=False)
    assert {p: os.stat(p).st_mtime_ns for p in sorted((tmp_path / "data" / "utts").iterdir())} == before
    # The second voice really is different audio: same texts, different timing.
    a = synth.load_split(c.data.cache_dir, "test")
    b = synth.load_split(c.data.cache_dir, "test_voice2")
    assert [r["words"] for r in a] == [r["words"] for r in b]
    assert not np.allclose(a[0]["features"][:, 0], b[0]["features"][:, 0])


def test_missing_text_file_is_a_clear_error(tmp_path):
    c = cfg_mod.default_config()
    c.data.text = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        synth.plan_splits(c)
