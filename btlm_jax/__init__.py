"""btlm_jax: a JAX/Flax codebase for BTLM-style language models and their training recipes.

``btlm_jax.load_model(path)`` (a run directory or a Hugging Face checkpoint folder) is the entry
point for notebooks and tools; see :mod:`btlm_jax.api`. It is imported lazily, so ``import
btlm_jax`` stays cheap.
"""

__all__ = ["load_model", "LoadedModel"]


def __getattr__(name):
    if name in ("load_model", "LoadedModel"):
        from btlm_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'btlm_jax' has no attribute {name!r}")
