"""Orbax checkpoints of the train state plus the data state (exact resume).

A checkpoint step directory holds two items: ``state`` (params, optimizer state, step; sharded
arrays restored onto the current mesh) and ``data`` (JSON, written once by process 0: the phase,
the global per-source token counters and the run's rollback log). There is no data-iterator
state: the batches are keyed by the step and the rollback log (:mod:`btlm_jax.train.feed`), so a
resumed run, on any number of processes, sees exactly the batches an uninterrupted run would.

:meth:`Checkpointer.restore_latest` walks back from the newest step to the newest one that reads
completely: a step that is incomplete or corrupt (an empty step directory, missing metadata, a
truncated array file) is skipped with one line saying why, while a checkpoint of a different
model (readable metadata whose tree or shapes differ from the config's) is refused with
:class:`CheckpointMismatchError`, never skipped. Failures of an asynchronous save are raised at the
next :meth:`Checkpointer.check` (the loop calls it every step), not after the run.

Retention: the newest ``checkpoint.keep`` steps (Orbax's ``LatestN``), and whatever steps
:meth:`Checkpointer.protect` names (Orbax's ``AnyPreservationPolicy`` over both): the divergence
guard (:mod:`btlm_jax.train.guard`) protects the newest good checkpoint and the one a rollback
would restore, so keep-N never deletes them, even with ``checkpoint.keep=1``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policy

from btlm_jax.errors import DiskFullError, enospc_path, is_enospc, quiet_disk_full_logs


class _QuietReadOnly(logging.Filter):
    """Drops Orbax's warnings that a read-only manager is read-only (evaluate, export, ...)."""

    def filter(self, record):
        msg = str(record.msg)
        return not (msg.startswith("Given directory is read only")
                    or msg.startswith("CheckpointManagerOptions.read_only=True"))


logging.getLogger("absl").addFilter(_QuietReadOnly())


class CheckpointMismatchError(ValueError):
    """The checkpoint in the workdir does not fit the model/optimizer the config describes."""


class CheckpointCorruptError(ValueError):
    """No checkpoint step in the directory can be read completely."""


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[btlm_jax] {msg}", flush=True)


def _keystr(path) -> str:
    """``opt_state/1/0/count`` for a path through dicts, attributes or sequences alike (Orbax's
    metadata tree is nested dicts where the state has dataclasses and named tuples)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))[0]
    return {_keystr(p): tuple(getattr(v, "shape", ())) for p, v in flat
            if hasattr(v, "shape")}


class _Protected:
    """An Orbax preservation policy keeping the steps a callable names when a save decides what
    to delete (the callable is read then, so it follows the guard's bookkeeping)."""

    def __init__(self, steps: Callable[[], set]):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        keep = self.steps()
        return [c.step in keep for c in checkpoints]


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        self._protected: Callable[[], set] = set
        quiet_disk_full_logs()  # a full disk is reported once, by _disk_full
        policy = None if read_only else ocp_policy.AnyPreservationPolicy(
            [ocp_policy.preservation_policy.LatestN(n=keep), _Protected(lambda: self._protected())])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)  # a save cut short leaves no partial step
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": ocp.JsonCheckpointHandler()})

    def protect(self, steps: Callable[[], set]) -> None:
        """Keep-N never deletes the steps ``steps()`` names when a save is made."""
        self._protected = steps

    def delete(self, step: int) -> None:
        """Deletes checkpoint ``step`` (all processes call it together)."""
        self.manager.delete(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _disk_full(self, e: BaseException) -> None:
        """A save that failed for lack of space: remove its partial step, raise one clear error."""
        if not is_enospc(e):
            return
        try:  # let the background save threads end before removing what they wrote
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the same failure, reported below
            pass
        self.remove_partial()
        raise DiskFullError(enospc_path(e) or self.directory) from e

    def remove_partial(self) -> None:
        """Removes temporary step directories of saves that did not finish (process 0)."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def check(self) -> None:
        """Raises the error of a finished asynchronous save, if any (e.g. a full disk)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._disk_full(e)
            raise

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        self.check()
        try:
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=force)
        except Exception as e:  # noqa: BLE001
            self._disk_full(e)
            raise

    # ----- restoring ---------------------------------------------------------------------------
    def _problem(self, step: int) -> str | None:
        """Why the step directory is visibly incomplete (None if it looks complete)."""
        d = Path(self.directory) / str(step)
        if not d.is_dir():
            return f"{d} is missing"
        if not any(d.iterdir()):
            return f"the step directory {d} is empty"
        for item in ("state", "data"):
            if not (d / item).is_dir() or not any((d / item).iterdir()):
                return f"{d / item} is missing or empty"
        return None

    def _mismatch(self, step: int, abstract_state: Any) -> str | None:
        """Differences between the checkpoint's tree/shapes and the config's (None: same, or the
        checkpoint's metadata cannot be read, which makes it corrupt rather than different)."""
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: corrupt, not different
            return None
        if meta is None:
            return None
        try:
            have, want = _shapes(meta), _shapes(abstract_state)
        except Exception:  # noqa: BLE001
            return None
        if not have:
            return None
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shape = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        if not (missing or extra or shape):
            return None
        parts = []
        if shape:
            parts.append("shapes differ: " + ", ".join(
                f"{k} is {have[k]} in the checkpoint, {want[k]} in the config" for k in shape[:4]))
        if missing:
            parts.append(f"{len(missing)} arrays the config needs are not in it (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} arrays in it the config does not have (e.g. {extra[0]})")
        return "; ".join(parts)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores ``step`` onto the shardings carried by ``abstract_state``
        (ShapeDtypeStructs). Raises :class:`CheckpointMismatchError` for a different model and
        :class:`CheckpointCorruptError` for an incomplete or unreadable step."""
        problem = self._problem(step)
        if problem:
            raise CheckpointCorruptError(f"checkpoint step {step} is incomplete: {problem}")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - classified: different model, or corrupt
            diff = self._mismatch(step, abstract_state)
            if diff:
                raise CheckpointMismatchError(
                    f"checkpoint {self.directory}/{step} was written by a run with a different "
                    f"model or optimizer config ({diff}). Use a new --workdir for the new config, "
                    "or restore the config this workdir was trained with (see config.json in the "
                    "workdir)") from e
            first = " ".join(str(e).split())
            first = first.split(" See full")[0].split(" [tensorstore_spec")[0][:200]
            raise CheckpointCorruptError(
                f"checkpoint step {step} in {self.directory} cannot be read "
                f"({type(e).__name__}: {first}); an array file is truncated or missing") from e
        return restored["state"], restored["data"]

    def restore_data(self, step: int) -> dict:
        """Only the data state of ``step`` (token counters, rollback log): no arrays are read."""
        try:
            return self.manager.restore(
                step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] or {}
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(
                f"the data state of checkpoint step {step} in {self.directory} cannot be read "
                f"({type(e).__name__})") from e

    def restore_latest(self, abstract_state: Any, log: Callable[[str], None] = _say
                       ) -> tuple[int, Any, dict] | None:
        """The newest step that restores completely, as ``(step, state, data)``; None when the
        directory holds no checkpoint. Corrupt steps are skipped (one line each, newest first)."""
        steps = sorted(self.all_steps(), reverse=True)
        skipped = []
        for step in steps:
            try:
                state, data = self.restore(step, abstract_state)
            except CheckpointCorruptError as e:
                skipped.append(f"step {step}: {e}")
                aside = "" if self.read_only else f" (moved to {self.set_aside(step)})"
                log(f"skipping checkpoint step {step}: {e}{aside}; trying the previous one")
                continue
            if skipped and not self.read_only:
                self.manager.reload()  # forget the steps set aside: they are written again
            return step, state, data
        if steps:
            raise CheckpointCorruptError(
                f"no checkpoint in {self.directory} can be read ({'; '.join(skipped)[:600]}). "
                "Move the directory away to start the run over")
        return None

    def set_aside(self, step: int, why: str = "corrupt") -> str:
        """Moves a step out of the way (the run writes that step again), keeping it for
        inspection next to the checkpoints: ``RUN/checkpoints.<why>/STEP[.N]``."""
        src = Path(self.directory) / str(step)
        dst_dir = Path(f"{self.directory}.{why}")
        dst = dst_dir / str(step)
        n = 1
        while dst.exists():
            dst, n = dst_dir / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            dst_dir.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        return str(dst)

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._disk_full(e)
            raise

    def close(self):
        try:
            self.wait()
        finally:
            self.manager.close()
