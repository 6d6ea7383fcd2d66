"""Config schema for the punctuation experiments: defaults and validation that names the bad key."""

from __future__ import annotations

import ml_collections

MODEL_KINDS = ("text", "multimodal")


class ConfigError(ValueError):
    """A config value is invalid. The message names the key and says what to do."""


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.data = d = ml_collections.ConfigDict()
    d.cache_dir = ""  # "" -> <workdir>/data
    d.text = ""  # punctuated English text file; "" -> prose shipped with Python
    d.min_words = 10  # utterance length target range (whole sentences)
    d.max_words = 40
    d.test_fraction = 0.15  # fraction of source documents held out for test
    d.n_train = 3000  # utterances (0: all available)
    d.n_test = 600
    d.seed = 0
    d.voice = "en-us"  # training and matched-test voice (espeak-ng name[+variant])
    d.rate = 175  # words per minute
    d.pitch = 50  # 0..100
    d.test2_voice = "en+f3"  # second test set: another accent/variant and speaking rate
    d.test2_rate = 230
    d.test2_pitch = 65
    d.workers = 1  # synthesis processes

    c.model = m = ml_collections.ConfigDict()
    m.projection_dim = 256  # ternary hashed features per token
    m.bottleneck_dim = 64
    m.acoustic_dim = 16  # width of the projected acoustic features
    m.hidden_dim = 64  # QRNN units per direction
    m.n_layers = 2
    m.kernel_width = 3
    m.zoneout = 0.1
    m.dropout = 0.1

    c.train = t = ml_collections.ConfigDict()
    t.models = "text,multimodal"  # which variants to train
    t.steps = 1500
    t.batch_size = 32
    t.learning_rate = 3e-3
    t.warmup_steps = 100
    t.weight_decay = 1e-4
    t.grad_clip = 1.0
    t.seed = 0
    t.log_every = 250
    t.checkpoint_every = 500

    c.eval = e = ml_collections.ConfigDict()
    e.batch_size = 128
    e.min_support = 10  # classes with fewer test examples are reported but not macro-averaged
    e.latency_utterances = 100
    return c


def _fail(key: str, msg: str):
    raise ConfigError(f"config key {key!r}: {msg}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    d, m, t, e = c.data, c.model, c.train, c.eval
    if not 1 <= d.min_words <= d.max_words:
        _fail("data.min_words", f"need 1 <= data.min_words <= data.max_words, got {d.min_words}, {d.max_words}")
    if not 0.0 < d.test_fraction < 1.0:
        _fail("data.test_fraction", f"must be in (0, 1), got {d.test_fraction}")
    for k in ("n_train", "n_test"):
        if d[k] < 0:
            _fail(f"data.{k}", f"must be >= 0 (0 = all), got {d[k]}")
    for k in ("rate", "test2_rate"):
        if not 80 <= d[k] <= 450:
            _fail(f"data.{k}", f"espeak-ng speaking rate must be 80..450 words/min, got {d[k]}")
    for k in ("pitch", "test2_pitch"):
        if not 0 <= d[k] <= 100:
            _fail(f"data.{k}", f"espeak-ng pitch must be 0..100, got {d[k]}")
    if d.workers < 1:
        _fail("data.workers", f"must be >= 1, got {d.workers}")
    for k in ("projection_dim", "bottleneck_dim", "acoustic_dim", "hidden_dim", "n_layers", "kernel_width"):
        if m[k] < 1:
            _fail(f"model.{k}", f"must be a positive integer, got {m[k]}")
    if m.projection_dim % 4:
        _fail("model.projection_dim", f"must be a multiple of 4 (2 hash bits per feature), got {m.projection_dim}")
    for k in ("zoneout", "dropout"):
        if not 0.0 <= m[k] < 1.0:
            _fail(f"model.{k}", f"must be in [0, 1), got {m[k]}")
    kinds = [k.strip() for k in t.models.split(",") if k.strip()]
    bad = [k for k in kinds if k not in MODEL_KINDS]
    if not kinds or bad:
        _fail("train.models", f"comma-separated subset of {MODEL_KINDS}, got {t.models!r}")
    for k in ("steps", "batch_size", "log_every", "checkpoint_every"):
        if t[k] < 1:
            _fail(f"train.{k}", f"must be >= 1, got {t[k]}")
    if t.learning_rate <= 0:
        _fail("train.learning_rate", f"must be > 0, got {t.learning_rate}")
    if e.batch_size < 1 or e.latency_utterances < 1 or e.min_support < 0:
        _fail("eval", "batch_size and latency_utterances must be >= 1, min_support >= 0")
    return c


def model_kinds(c: ml_collections.ConfigDict) -> list[str]:
    return [k.strip() for k in c.train.models.split(",") if k.strip()]
