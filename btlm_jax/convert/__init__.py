"""Hugging Face checkpoints <-> btlm_jax (safetensors only; see :mod:`btlm_jax.convert.hf`).

``python -m btlm_jax.convert import --hf_dir=DIR --workdir=RUN [--tokenizer=PATH]`` turns a
Hugging Face BTLM (cerebras/btlm-3b-8k-base) or GPT-2 / Cerebras-GPT checkpoint into a run
directory (``config.json`` + an Orbax checkpoint at step 0) that ``evaluate``, ``generate`` and
``main`` (fine-tuning) use like any other run. ``python -m btlm_jax.convert export --workdir=RUN
--out=DIR [--layout=btlm|gpt2]`` writes ``config.json`` + ``model.safetensors`` back.
"""

from btlm_jax.convert.hf import (  # noqa: F401
    ConversionError, expected_shapes, from_hf, hf_config, load_hf, model_overrides, read_tensors,
    save_hf, to_hf)
