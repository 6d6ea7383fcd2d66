"""``python -m btlm_jax.main``: the `btlm-train` command (:mod:`btlm_jax.cli.train`)."""

from btlm_jax.cli.train import main, run  # noqa: F401

if __name__ == "__main__":
    run()
