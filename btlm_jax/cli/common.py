"""What every command does the same way: start-up and running under the one-line error handler."""

from __future__ import annotations

from absl import app, flags, logging

from btlm_jax import errors


def start(argv, *, distributed: bool = True) -> None:
    """The start of a command's ``main``: no stray arguments, library INFO logs off (they drown
    progress output), and multi-host start-up when the environment asks for it."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    if distributed:
        from btlm_jax.parallel.distributed import maybe_initialize

        maybe_initialize()


def run_app(main, *required: str) -> None:
    """``app.run(main)`` with ``required`` flags; user errors, including config overrides that
    absl parses inside ``app.run`` (with ``--config=FILE``), print as one ``error:`` line."""
    for name in required:
        flags.mark_flag_as_required(name)
    with errors.cli():
        app.run(main)
