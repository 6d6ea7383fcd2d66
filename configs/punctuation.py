"""Unspoken punctuation prediction (Soboleva et al., ICASSP 2021) on espeak-ng synthetic speech.

    python -m btlm_jax.punctuation.main --workdir=/tmp/punct               # default, ~4k utterances
    python -m btlm_jax.punctuation.main --workdir=/tmp/p --config=configs/punctuation.py:tiny

Presets: "" (default run: 4,200 utterances, 2 x 1,500 steps; measured 20 minutes on 2 CPU cores
shared with other jobs at load average 8-19, synthesis 11 min of it), "tiny" (about a minute).
"""

from btlm_jax.punctuation.config import default_config


def get_config(preset: str = ""):
    c = default_config()
    if preset in ("", "default"):
        pass
    elif preset == "tiny":
        c.data.n_train = 24
        c.data.n_test = 8
        c.data.min_words = 6
        c.data.max_words = 20
        c.model.projection_dim = 64
        c.model.bottleneck_dim = 16
        c.model.acoustic_dim = 8
        c.model.hidden_dim = 16
        c.model.n_layers = 1
        c.train.steps = 30
        c.train.batch_size = 8
        c.train.log_every = 10
        c.train.checkpoint_every = 20
        c.eval.latency_utterances = 5
    else:
        raise ValueError(f"configs/punctuation.py: unknown preset {preset!r}; use '' or 'tiny'")
    return c
