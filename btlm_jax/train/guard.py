"""Divergence guard: no bad step reaches a checkpoint, and a rollback resumes a good trajectory.

Every step the loop hands the step's device metrics to :meth:`DivergenceGuard.check`. The loss,
gradient norm and parameter norm (already computed inside the jitted step) are read back one step
late, so the host never waits for the step it just dispatched; :meth:`DivergenceGuard.save`
checks the current step's too before it writes a checkpoint. A step is bad when one of them is
not finite, or (``train.max_loss_spike = r > 0``) when its loss exceeds ``r`` times the mean of
the last good losses.

Good checkpoints. Step ``N``'s loss and gradient are computed from the weights of step ``N - 1``,
so checkpoint ``G`` (the weights after ``G`` steps) counts as *good* only once step ``G + 1`` was
checked good: a checkpoint is written after every step up to it was checked, and becomes good
one step later. Every checkpoint on disk but the newest is therefore good; the newest is good
once the step after it passed. Retention (``checkpoint.keep``) never deletes the newest good
checkpoint nor, with rollback, the one a rollback would restore
(:meth:`Checkpointer.protect <btlm_jax.train.checkpoint.Checkpointer.protect>`).

A bad step ``N`` makes checkpoint ``N - 1``, if there is one, not good. Then:

* ``train.on_divergence = "stop"``: checkpoint ``N - 1`` is moved to ``RUN/checkpoints.diverged/``
  (kept for inspection; a rerun does not resume from it), the bad step is written to the metric
  sinks once (``"diverged"`` names the reason; the record the loop logged for it is replaced)
  and :class:`DivergenceError` names the step and the newest good checkpoint (a rerun resumes
  from it), with advice that fits the mode;
* ``"rollback"`` (as PaLM does it): the newest good checkpoint ``G`` at least
  ``train.rollback_back_steps`` steps before ``N`` (else the oldest good one) is restored whole:
  weights, optimizer state and step counter (so the schedule, the optimizer's counts and the
  logged lr agree at every step) and its token counters; the checkpoints after ``G`` are deleted;
  training goes on from step ``G`` with the data ``train.rollback_skip_batches`` batches past
  ``G``'s position, and at least past the bad step's batch (:mod:`btlm_jax.data.positions`).
  The rollback is appended to the run's rollback log (``RUN/rollbacks.json``, and every later
  checkpoint's data state), ``metrics.jsonl`` drops the records of the discarded steps and keeps
  one record of the rollback. Rollbacks that make no progress end: after :data:`MAX_ROLLBACKS`
  rollbacks in a row to the same checkpoint or an older one, the next divergence stops the run
  with :class:`DivergenceError` (:func:`rollbacks_without_progress`).
"""

from __future__ import annotations

import collections
import math

import jax

from btlm_jax.data.positions import Rollback
from btlm_jax.errors import UserError
from btlm_jax.train.run_dir import write_rollbacks

MAX_ROLLBACKS = 5  # rollbacks in a row that restore no newer checkpoint than the previous one
_WINDOW, _MIN_HISTORY = 50, 10  # loss spike: mean of up to 50 good losses, once 10 are known


class DivergenceError(UserError, FloatingPointError):
    """The loss or the gradient norm is not finite, or the loss spiked (train.max_loss_spike)."""


def rollbacks_without_progress(rollbacks) -> int:
    """How many of the log's last rollbacks in a row restored no newer checkpoint than the one
    before them (1 for a single rollback)."""
    streak, prev = 0, None
    for r in rollbacks:
        streak = streak + 1 if prev is not None and r.restored <= prev else 1
        prev = r.restored
    return streak


class DivergenceGuard:
    """Checks every step, keeps the books of good checkpoints, saves, stops or rolls back.

    ``run``: the :class:`~btlm_jax.train.run_dir.RunDir`; ``ckpt``: its
    :class:`~btlm_jax.train.checkpoint.Checkpointer`; ``feed``: the
    :class:`~btlm_jax.train.feed.TrainFeed` (token counters and rollback log); ``sinks``: the
    metric sinks.
    """

    def __init__(self, cfg, run, ckpt, abstract_state, feed, sinks, log):
        t = cfg.train
        self.max_spike = float(t.max_loss_spike)
        self.mode = t.on_divergence
        self.back, self.skip = int(t.rollback_back_steps), int(t.rollback_skip_batches)
        self.run, self.ckpt, self.abstract_state = run, ckpt, abstract_state
        self.feed, self.sinks, self.log = feed, sinks, log
        self.pending: list[tuple[int, dict]] = []  # (step, device scalars), oldest first
        self.history: collections.deque = collections.deque(maxlen=_WINDOW)
        steps = sorted(ckpt.all_steps())
        # every checkpoint but the newest was confirmed before the newest was written; the run
        # resumes from the newest (restore_latest sets unreadable ones aside)
        self.good = set(steps[:-1])
        self.unconfirmed = steps[-1] if steps else None
        self.saved_step = steps[-1] if steps else None
        self.horizon = self.saved_step  # the newest step saved or being saved
        ckpt.protect(self.protected)

    # ----- the books ---------------------------------------------------------------------------
    def _good_on_disk(self) -> list[int]:
        return sorted(self.good & set(self.ckpt.all_steps()))

    def newest_good(self) -> int | None:
        good = self._good_on_disk()
        return good[-1] if good else None

    def target(self, bad_step: int) -> int | None:
        """The checkpoint a rollback from ``bad_step`` restores: the newest good one at least
        ``train.rollback_back_steps`` before it, else the oldest good one."""
        good = self._good_on_disk()
        early = [g for g in good if g <= bad_step - self.back]
        return early[-1] if early else (good[0] if good else None)

    def protected(self) -> set:
        """What keep-N must not delete now: the newest good checkpoint, and with rollback the
        checkpoint a divergence at the next step would restore."""
        keep = set()
        newest = self.newest_good()
        if newest is not None:
            keep.add(newest)
        if self.mode == "rollback" and self.horizon is not None:
            t = self.target(self.horizon + 1)
            if t is not None:
                keep.add(t)
        return keep

    # ----- the hooks ---------------------------------------------------------------------------
    def check(self, ctx) -> None:
        """Every step: takes this step's scalars, checks the previous steps' (one step late);
        raises an asynchronous checkpoint save's failure (e.g. a full disk) here, at the next
        step."""
        self.ckpt.check()
        m = ctx.metrics
        self.pending.append((ctx.step, {k: m[k] for k in ("loss", "grad_norm", "param_norm")
                                        if k in m}))
        self._check(ctx, upto=len(self.pending) - 1)

    def verify(self, ctx) -> None:
        """Every step up to the current one is checked (raises or rolls back if one is bad)."""
        self._check(ctx, upto=len(self.pending))

    def save(self, ctx) -> None:
        """Writes a checkpoint of ``ctx.state`` once every step up to it is checked good."""
        self.verify(ctx)
        if ctx.restarted or self.saved_step == ctx.step:
            return
        self.horizon = ctx.step  # (read by protected() while the save decides what to delete)
        self.ckpt.save(ctx.step, ctx.state, self.feed.state(), force=True)
        self.saved_step = self.unconfirmed = ctx.step

    # ----- the checks --------------------------------------------------------------------------
    def _reason(self, values: dict) -> str | None:
        for k in ("loss", "grad_norm", "param_norm"):
            if k in values and not math.isfinite(values[k]):
                return f"{k} is {values[k]}"
        loss = values.get("loss")
        if (self.max_spike > 0 and loss is not None and len(self.history) >= _MIN_HISTORY):
            mean = sum(self.history) / len(self.history)
            if loss > self.max_spike * mean:
                return (f"loss {loss:.4g} is more than train.max_loss_spike={self.max_spike:g} "
                        f"times the mean of the last {len(self.history)} steps ({mean:.4g})")
        return None

    def _check(self, ctx, upto: int) -> None:
        if upto <= 0:
            return
        todo, self.pending = self.pending[:upto], self.pending[upto:]
        fetched = jax.device_get([v for _, v in todo])
        for (step, _), values in zip(todo, fetched):
            values = {k: float(v) for k, v in values.items()}
            why = self._reason(values)
            if why is None:
                if "loss" in values:
                    self.history.append(values["loss"])
                if self.unconfirmed is not None and step == self.unconfirmed + 1:
                    self.good.add(self.unconfirmed)  # a good loss from its weights
                    self.unconfirmed = None
                continue
            self._diverged(ctx, step, values, why)
            return

    # ----- a bad step --------------------------------------------------------------------------
    def _diverged(self, ctx, step: int, values: dict, why: str) -> None:
        self.pending = []
        self.ckpt.wait()
        bad = self.unconfirmed if self.unconfirmed == step - 1 else None  # its loss is this one
        self.unconfirmed = None
        rollbacks = self.feed.rollbacks
        target = self.target(step) if self.mode == "rollback" else None
        entry = None if target is None else Rollback(step, target, self.skip)
        if entry is not None and rollbacks_without_progress(rollbacks + [entry]) > MAX_ROLLBACKS:
            entry = None
        if entry is not None:
            return self._roll_back(ctx, entry, values, why)  # deletes the bad checkpoint too
        aside = None
        if bad is not None:  # kept for inspection; a rerun resumes from the good one before it
            aside = self.ckpt.set_aside(bad, "diverged")
        for s in self.sinks:  # one record of the bad step, not the one logged for it
            s.rewind(step - 1, len(rollbacks))
            s.write({"step": step, **values, "diverged": why})
        raise DivergenceError(self._message(step, why, aside, target))

    def _message(self, step: int, why: str, aside: str | None, target: int | None) -> str:
        where = self.run.checkpoint_dir
        newest = self.newest_good()
        msg = f"training diverged at step {step}: {why}"
        if aside:
            msg += (f"; checkpoint {step - 1}, whose weights gave that loss, was moved to "
                    f"{aside}")
        if newest is not None:
            msg += (f"; the newest good checkpoint is step {newest} in {where} (a rerun resumes "
                    "from it)")
        else:
            msg += f"; no good checkpoint was written ({where} holds none to resume from)"
        batch = (f"btlm-batches --workdir={self.run.path} --steps={step}:{step + 1} --decode "
                 "shows the step's batch")
        if self.mode == "rollback" and target is not None:
            return (msg + f". {MAX_ROLLBACKS} rollbacks in a row restored the same checkpoint "
                    "or an older one: lower optim.peak_lr (or raise optim.warmup_steps) and "
                    "rerun; " + batch)
        if self.mode == "rollback":
            return (msg + ". There is no good checkpoint to roll back to: lower optim.peak_lr, "
                    "or save checkpoints more often (checkpoint.every_steps), and rerun; "
                    + batch)
        return (msg + ". Lower optim.peak_lr (or check the data: " + batch + ") and rerun, or "
                "set train.on_divergence=rollback to restore a good checkpoint and skip the "
                "batches")

    def _roll_back(self, ctx, entry: Rollback, values: dict, why: str) -> None:
        g = entry.restored
        state, saved = self.ckpt.restore(g, self.abstract_state)
        for s in sorted(self.ckpt.all_steps()):
            if s > g:  # the discarded trajectory's checkpoints
                self.ckpt.delete(s)
        old = self.feed.rollbacks
        rollbacks = old + [entry]
        self.feed.restore(saved, rollbacks=rollbacks)
        write_rollbacks(self.run.path, rollbacks)
        rec = {"step": entry.diverged, **values, "diverged": why, "rollback": len(rollbacks),
               "restored_step": g, "rollback_skip_batches": entry.skip}
        for s in self.sinks:
            s.rewind(g, len(old))
            s.write(rec)
        self.good = set(x for x in self.good if x <= g) | {g}
        self.unconfirmed, self.saved_step, self.horizon = None, g, g
        self.history.clear()
        ctx.state, ctx.step, ctx.metrics, ctx.record = state, g, None, None
        ctx.restarted = True
        self.log(f"training diverged at step {entry.diverged} ({why}); rolled back to checkpoint "
                 f"{g} (weights, optimizer state, step and token counters) and skipped the data "
                 f"of at least {max(entry.skip, entry.diverged - g)} batches from there; "
                 f"continuing at step {g + 1} (rollback {len(rollbacks)}, "
                 f"{rollbacks_without_progress(rollbacks)} of at most {MAX_ROLLBACKS} in a row "
                 f"to the same checkpoint or an older one). The diverged step's batch: "
                 f"btlm-batches --workdir={self.run.path} "
                 f"--steps={entry.diverged}:{entry.diverged + 1} "
                 f"--rollbacks={len(old)}")
