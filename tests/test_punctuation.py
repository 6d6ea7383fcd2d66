"""Unit tests for btlm_jax.punctuation: QRNN scan, projection, pitch, TTS alignment, metrics."""

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btlm_jax.punctuation import config as cfg_mod
from btlm_jax.punctuation import features as F
from btlm_jax.punctuation import main as main_mod
from btlm_jax.punctuation import model as M
from btlm_jax.punctuation import projection as P
from btlm_jax.punctuation import text as T
from btlm_jax.punctuation import tts


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_fo_pool_equals_loop():
    rng = np.random.default_rng(0)
    f = rng.uniform(size=(3, 17, 5)).astype(np.float32)
    z = rng.normal(size=(3, 17, 5)).astype(np.float32)
    c = np.zeros((3, 5))
    ref = []
    for t in range(17):
        c = f[:, t] * c + (1 - f[:, t]) * z[:, t]
        ref.append(c)
    np.testing.assert_allclose(jax.jit(M.fo_pool)(jnp.asarray(f), jnp.asarray(z)), np.stack(ref, 1), atol=1e-5)


def _numpy_direction(x, kernel, bias):
    """Step-by-step QRNN direction on one unpadded sequence (T, D): causal conv, fo-pooling."""
    k, _, three_h = kernel.shape
    h_dim = three_h // 3
    c = np.zeros(h_dim)
    out = []
    for t in range(len(x)):
        g = bias.astype(np.float64).copy()
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                g += x[src] @ kernel[j]
        z, f, o = np.tanh(g[:h_dim]), _sigmoid(g[h_dim:2 * h_dim]), _sigmoid(g[2 * h_dim:])
        c = f * c + (1 - f) * z
        out.append(o * np.tanh(c))
    return np.array(out)


def test_bidirectional_qrnn_equals_step_by_step_loop_with_padding():
    layer = M.BiQRNNLayer(hidden=6, kernel_width=3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    lengths = [9, 5]
    mask = np.arange(9)[None] < np.array(lengths)[:, None]
    params = jax.jit(lambda k: layer.init(k, x, mask, train=False))(jax.random.key(0))
    got = np.asarray(jax.jit(lambda p: layer.apply(p, x, mask, train=False))(params))
    p = jax.tree.map(np.asarray, params["params"])
    for b, n in enumerate(lengths):
        fwd = _numpy_direction(x[b, :n], p["fwd"]["conv"]["kernel"], p["fwd"]["conv"]["bias"])
        bwd = _numpy_direction(x[b, :n][::-1], p["bwd"]["conv"]["kernel"], p["bwd"]["conv"]["bias"])[::-1]
        np.testing.assert_allclose(got[b, :n], np.concatenate([fwd, bwd], -1), atol=1e-5)
        np.testing.assert_array_equal(got[b, n:], 0.0)


def test_zoneout_only_in_training():
    layer = M.QRNNDirection(hidden=4, zoneout=1.0)  # every forget gate forced to 1: c stays c_0=0
    x = np.random.default_rng(2).normal(size=(1, 6, 3)).astype(np.float32)
    mask = np.ones((1, 6), bool)
    params = jax.jit(lambda k: layer.init(k, x, mask, train=False))(jax.random.key(0))
    apply = jax.jit(lambda p, r, train: layer.apply(p, x, mask, train=train, rngs={"dropout": r}),
                    static_argnums=2)
    np.testing.assert_array_equal(np.asarray(apply(params, jax.random.key(1), True)), 0.0)
    assert np.abs(np.asarray(apply(params, jax.random.key(1), False))).max() > 1e-3


def test_projection_matches_hash_formula_and_is_stable_across_processes():
    v = P.project_token("punctuation", 256)
    # Independent reading of the documented rule: bit pairs (b0, b1) of BLAKE2b -> b0 * (1 - 2 b1).
    digest = hashlib.blake2b(b"punctuation", digest_size=64, salt=bytes(16)).digest()
    bits = [(digest[i // 8] >> (i % 8)) & 1 for i in range(512)]
    ref = [bits[2 * j] * (1 - 2 * bits[2 * j + 1]) for j in range(256)]
    np.testing.assert_array_equal(v, ref)
    code = ("from btlm_jax.punctuation.projection import project_token as p;"
            "print(''.join('%d' % (x + 1) for x in p('punctuation', 256)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == "".join(str(x + 1) for x in v)
    assert len(P.project_token("punctuation", 1024)) == 1024  # more than one hash block


def test_projection_value_distribution():
    vecs = np.stack([P.project_token(f"tok{i}", 256) for i in range(2000)]).astype(np.float64)
    n = vecs.size
    for value, prob in ((0, 0.5), (1, 0.25), (-1, 0.25)):
        frac = np.mean(vecs == value)
        assert abs(frac - prob) < 6 * np.sqrt(prob * (1 - prob) / n), (value, frac)
    # Distinct tokens are nearly orthogonal: cosine ~ N(0, 1/(d/2)) for ternary vectors.
    norms = np.linalg.norm(vecs, axis=1)
    cos = (vecs[:500] @ vecs[500:1000].T) / np.outer(norms[:500], norms[500:1000])
    assert abs(cos.mean()) < 0.01 and cos.std() < 1.3 / np.sqrt(128)


@pytest.mark.parametrize("f0", [85.0, 140.0, 233.3, 410.0])
def test_yin_recovers_tone_within_2_percent(f0):
    sr = 22050
    t = np.arange(int(0.6 * sr)) / sr
    rng = np.random.default_rng(0)
    # Harmonic tone with a strong second harmonic plus noise: octave errors would show as 2x / 0.5x.
    x = 0.4 * np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(2 * np.pi * 2 * f0 * t + 1.0)
    x += 0.01 * rng.normal(size=len(t))
    est, _ = F.yin(x, sr)
    voiced = est[np.isfinite(est)]
    assert len(voiced) > 0.8 * len(est)
    assert abs(np.median(voiced) / f0 - 1) < 0.02


def test_yin_marks_noise_unvoiced():
    x = np.random.default_rng(0).normal(size=22050) * 0.1
    est, _ = F.yin(x, 22050)
    assert np.mean(np.isfinite(est)) < 0.1


def test_normalize_per_utterance_zscore():
    x = np.array([[1.0, 5.0], [2.0, np.nan], [4.0, 7.0]])
    z = F.normalize_per_utterance(x, eps=0.0)
    np.testing.assert_allclose(z[:, 0], (x[:, 0] - 7 / 3) / np.std(x[:, 0]), rtol=1e-5)
    np.testing.assert_allclose(z[:, 1], [-1.0, 0.0, 1.0], rtol=1e-5)


def test_align_word_events_shares_merged_words_by_length():
    text = "I am fine. Thanks"
    # Events: "I" at 0 (covers "I am"), "fine." at char 5, "Thanks" reported one char early (10).
    starts = tts.align_word_events(text, [(0, 1, 0), (5, 4, 300), (10, 1, 900)], 1500)
    # "I am" share [0, 300) in proportion to character counts 1:2 -> "am" starts at 100.
    np.testing.assert_array_equal(starts, [0, 100, 300, 900])


def test_words_labels_and_cleaning():
    words, labels = T.words_and_labels("Hello there, friend. Are you well?")
    assert words == ("hello", "there", "friend", "are", "you", "well")
    assert labels == (0, 1, 2, 0, 0, 3)
    assert T.clean_sentence("Call foo(x) to do it.", 40) is None
    assert T.clean_sentence("First: use the built-in one; then stop!", 40) == \
        "First, use the built in one, then stop."


def test_document_split_is_disjoint():
    docs = [f"Sentence number {w} is here. Another sentence {w} ends." for w in
            ("one two three four five six seven eight nine ten eleven twelve".split())]
    docs.append(docs[0])  # a duplicated document must not leak into test
    utts = T.make_utterances(docs, min_words=3, max_words=10, seed=0)
    train, test = T.split_by_document(utts, 0.4, seed=0)
    assert train and test
    assert not {u.spoken for u in train} & {u.spoken for u in test}


def test_classification_report_against_counts():
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, 500)
    pred = np.where(rng.uniform(size=500) < 0.6, gold, rng.integers(0, 4, 500))
    rep = main_mod.classification_report(gold, pred, 4, min_support=1)
    f1s = []
    for c, name in enumerate(T.CLASSES):
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        prec = tp / sum(1 for p in pred if p == c)
        rec = tp / sum(1 for g in gold if g == c)
        assert rep["per_class"][name]["precision"] == pytest.approx(prec)
        assert rep["per_class"][name]["recall"] == pytest.approx(rec)
        f1s.append(2 * prec * rec / (prec + rec))
    assert rep["macro_f1"] == pytest.approx(np.mean(f1s[1:]))


def test_int8_quantisation_size_and_error():
    params = {"k": jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 5)), jnp.float32),
              "b": jnp.ones(5)}
    deq, size = main_mod.quantize_int8(params)
    assert size == 3 * 8 * 5 + 5 * 4 + 5 * 4  # int8 weights, f32 per-channel scales, f32 bias
    scale = np.abs(np.asarray(params["k"])).max(axis=(0, 1)) / 127
    assert np.all(np.abs(np.asarray(deq["k"]) - np.asarray(params["k"])) <= scale / 2 + 1e-7)


def test_config_errors_name_the_key():
    c = cfg_mod.default_config()
    c.train.models = "text,audio"
    with pytest.raises(cfg_mod.ConfigError, match="train.models"):
        cfg_mod.validate(c)
    c = cfg_mod.default_config()
    c.model.projection_dim = 30
    with pytest.raises(cfg_mod.ConfigError, match="model.projection_dim"):
        cfg_mod.validate(c)


def test_tts_word_boundaries_monotonic_and_cover_the_audio():
    pytest.importorskip("espeakng_loader")
    engine = tts.get_engine()
    engine.set_voice("en-us", 175)
    text = ("The quick brown fox jumps over the lazy dog, and then it rests. "
            "Does the dog ever wake up? Nobody knows, but the fox runs away.")
    syn = engine.synthesize(text)
    starts = syn.word_starts
    assert len(starts) == len(text.split())
    assert np.all(np.diff(starts) > 0), "every word starts after the previous one"
    hop = int(0.01 * syn.sample_rate)
    energy = F.rms_db(syn.audio, syn.sample_rate)
    silent = F.silence_mask(energy)
    speech_frames = np.flatnonzero(~silent)
    # No speech before the first word; the last word starts before the audio ends.
    assert starts[0] <= speech_frames[0] * hop + hop
    assert starts[-1] < len(syn.audio)
    # Every word's span [start_i, start_{i+1}) holds audible speech of its own.
    bounds = np.append(starts, len(syn.audio))
    for i in range(len(starts)):
        a, b = -(-bounds[i] // hop), bounds[i + 1] // hop
        assert (~silent[a:b]).any(), f"word {i} ({text.split()[i]!r}) has no audio"
    # The engine pauses after punctuation: the measured pauses say where the commas and stops are.
    feats = F.word_features(syn.audio, syn.sample_rate, starts)
    _, labels = T.words_and_labels(text)
    labels = np.array(labels)
    pauses = feats[:-1, 1]
    assert pauses[labels[:-1] > 0].min() > 0.08 > pauses[labels[:-1] == 0].max()


def test_missing_voice_is_a_clear_error():
    pytest.importorskip("espeakng_loader")
    with pytest.raises(tts.EspeakError, match="no voice 'xx-nonexistent'"):
        tts.get_engine().set_voice("xx-nonexistent", 175)
