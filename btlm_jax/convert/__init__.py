"""Hugging Face checkpoints <-> btlm_jax (safetensors, or .bin via ``torch.load(weights_only=True)``;
see :mod:`btlm_jax.convert.hf`).

``python -m btlm_jax.convert import --hf_dir=DIR --workdir=RUN [--tokenizer=PATH]`` turns a
Hugging Face BTLM (cerebras/btlm-3b-8k-base) or GPT-2 / Cerebras-GPT checkpoint into a run
directory (``config.json`` + an Orbax checkpoint at step 0) that ``evaluate``, ``generate`` and
``main`` (fine-tuning) use like any other run. ``python -m btlm_jax.convert export --workdir=RUN
--out=DIR [--layout=btlm|gpt2]`` writes ``config.json`` + ``model.safetensors`` back, with the
run's tokenizer files. ``btlm_jax.load_model(HF_DIR)`` loads a folder in memory without importing.
"""

from btlm_jax.convert.hf import (  # noqa: F401
    ConversionError, checked_slopes, expected_shapes, from_hf, hf_config, load_hf, model_overrides,
    read_tensors, save_hf, to_hf, weight_files)
