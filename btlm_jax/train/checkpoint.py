"""Orbax checkpoints of the train state plus the data iterator state (exact resume).

A checkpoint step directory holds two items: ``state`` (params, optimizer state, step; sharded
arrays restored onto the current mesh) and ``data`` (JSON: the Grain iterator state, the phase
and the per-source token counters), so a resumed run sees exactly the batches an uninterrupted
run would.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir does not fit the model/optimizer the config describes."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save and not read_only,
            create=not read_only, read_only=read_only)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores onto the shardings carried by ``abstract_state`` (ShapeDtypeStructs)."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            want = jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract_state.params)
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} does not match the configured model "
                f"({type(e).__name__}: {str(e)[:800]}). It was written by a run with a different "
                "model or optimizer config. Use a new --workdir for the new config, or restore "
                "the config this workdir was trained with (see config.json in the workdir). "
                f"Parameter shapes the current config expects: {want}") from e
        return restored["state"], restored["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
