"""BTLM and Cerebras-GPT presets: ``--config=configs/btlm.py:PRESET`` in the repository.

The presets ship with the package (:mod:`btlm_jax.presets`); this file keeps the repository's
config-file form working. From any directory a bare name does the same: ``--config=PRESET``.
"""

from btlm_jax.presets import CEREBRAS_GPT, PRESETS, get_config  # noqa: F401
