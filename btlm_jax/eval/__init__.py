"""Evaluation of trained (or imported) models: perplexity per source and per evaluation length,
per-position loss in buckets, ALiBi position interpolation, and sampling with a KV cache.

- :mod:`btlm_jax.eval.session`: load a run directory read-only (its config, pinned tokenizer, and
  the parameters of the newest readable checkpoint) onto the training
  :class:`~btlm_jax.train.program.Program`'s mesh and shardings.
- :mod:`btlm_jax.eval.perplexity`: loss / perplexity per length and position-interpolation setting.
- :mod:`btlm_jax.eval.plot`: loss-against-position figures.
- :mod:`btlm_jax.eval.sampling`: batched generation with a KV cache and jitted decode steps.

Command lines: ``python -m btlm_jax.evaluate`` and ``python -m btlm_jax.generate``.
"""
