"""``python -m launch.sweep grid|task ...``: the `btlm-sweep` command (:mod:`btlm_jax.cli.sweep`)."""

import sys

from btlm_jax.cli.sweep import main

if __name__ == "__main__":
    sys.exit(main())
