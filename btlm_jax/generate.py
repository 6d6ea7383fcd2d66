"""``python -m btlm_jax.generate``: the `btlm-generate` command (:mod:`btlm_jax.cli.generate`)."""

from btlm_jax.cli.generate import main, run  # noqa: F401

if __name__ == "__main__":
    run()
