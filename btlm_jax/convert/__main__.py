"""``python -m btlm_jax.convert``: the `btlm-convert` command (:mod:`btlm_jax.cli.convert`)."""

from btlm_jax.cli.convert import main, run  # noqa: F401

if __name__ == "__main__":
    run()
