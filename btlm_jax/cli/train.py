"""Train (or resume) a model: ``python -m btlm_jax.main --config=configs/btlm.py:tiny --workdir=DIR``.

Any config key can be overridden on the command line, e.g. ``--config.train.steps=200
--config.optim.schedule=d2z``. Rerunning the same command on the same workdir resumes from the
latest checkpoint; SIGTERM saves a checkpoint and exits cleanly.
"""

from __future__ import annotations


from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app, start
from btlm_jax.cli.overrides import define_config_flag

with errors.cli():  # a misspelt --config.KEY override fails here, while the flag is defined
    # the one --config flag definition (sweeps parse their cells with it too)
    _CONFIG = define_config_flag()
errors.define_verbose_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv)
    from btlm_jax.train.loop import train

    result = train(_CONFIG.value, _WORKDIR.value)
    keys = [k for k in ("step", "loss", "eval_loss", "tokens_per_sec") if k in result]
    print("done: " + ", ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float)
                               else f"{k}={result[k]}" for k in keys), flush=True)


def run():
    run_app(main, "workdir")


if __name__ == "__main__":
    run()
