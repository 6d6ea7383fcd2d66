"""``python -m btlm_jax.evaluate``: the `btlm-evaluate` command (:mod:`btlm_jax.cli.evaluate`)."""

from btlm_jax.cli.evaluate import main, run  # noqa: F401

if __name__ == "__main__":
    run()
