"""Divergence guard: no non-finite or exploding step reaches a checkpoint.

Every step the loop hands the step's device metrics to :meth:`DivergenceGuard.check`. The loss,
gradient norm and parameter norm (already computed inside the jitted step) are read back one step
late, so the host never waits for the step it just dispatched; before a checkpoint is written,
:meth:`DivergenceGuard.verify` reads the current step's too. A step is bad when one of them is not
finite, or (``train.max_loss_spike = r > 0``) when its loss exceeds ``r`` times the mean of the
last good losses. A bad step is written to the metric sinks (``"diverged"`` names the reason) and
then, with ``train.on_divergence = "stop"``, the run stops with :class:`DivergenceError` naming the
step and the last good checkpoint: nothing after it was saved, so keep-N cannot have removed it
(it is the newest checkpoint). With ``"rollback"`` the weights and optimizer state of the last
good checkpoint are restored and training goes on from the bad step with the following batches
(the batches of the steps in between are skipped; the step counter, and with it the data position
and the learning-rate schedule, keeps going).
"""

from __future__ import annotations

import collections
import math

import jax

from btlm_jax.errors import UserError

MAX_ROLLBACKS = 5  # per process lifetime; a run that keeps diverging stops
_WINDOW, _MIN_HISTORY = 50, 10  # loss spike: mean of up to 50 good losses, once 10 are known


class DivergenceError(UserError, FloatingPointError):
    """The loss or the gradient norm is not finite, or the loss spiked (train.max_loss_spike)."""


class DivergenceGuard:
    def __init__(self, cfg, checkpoint_dir, ckpt, abstract_state, sinks, log):
        self.max_spike = float(cfg.train.max_loss_spike)
        self.mode = cfg.train.on_divergence
        self.checkpoint_dir, self.ckpt = checkpoint_dir, ckpt
        self.abstract_state, self.sinks, self.log = abstract_state, sinks, log
        self.pending: list[tuple[int, dict]] = []  # (step, device scalars), oldest first
        self.history: collections.deque = collections.deque(maxlen=_WINDOW)
        self.good_step = None  # the newest checkpoint written by this process (all verified)
        self.rollbacks = 0
        latest = ckpt.latest_step()
        if latest is not None:
            self.good_step = latest

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
        """Before a checkpoint of ``ctx.state``: every step up to the current one is good."""
        self._check(ctx, upto=len(self.pending))

    def saved(self, step: int) -> None:
        self.good_step = step

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
                continue
            self._diverged(ctx, step, values, why)
            return

    def _diverged(self, ctx, step: int, values: dict, why: str) -> None:
        rec = {"step": step, **values, "diverged": why}
        for s in self.sinks:
            s.write(rec)
        self.pending = []
        where = (f"the last good checkpoint is step {self.good_step} in {self.checkpoint_dir}"
                 if self.good_step is not None else
                 f"no checkpoint was written yet ({self.checkpoint_dir} holds none)")
        if (self.mode == "rollback" and self.good_step is not None
                and self.rollbacks < MAX_ROLLBACKS):
            self.ckpt.wait()
            state, _ = self.ckpt.restore(self.good_step, self.abstract_state)
            self.rollbacks += 1
            ctx.state = state.replace(step=jax.device_put(
                jax.numpy.asarray(ctx.step, state.step.dtype), state.step.sharding))
            ctx.record = None
            self.history.clear()
            self.log(f"training diverged at step {step} ({why}); rolled back to the weights of "
                     f"step {self.good_step} and skipped the batches of steps "
                     f"{self.good_step + 1}-{ctx.step}; continuing at step {ctx.step + 1} "
                     f"(rollback {self.rollbacks} of at most {MAX_ROLLBACKS})")
            return
        if self.mode == "rollback" and self.good_step is not None:
            why += f"; {MAX_ROLLBACKS} rollbacks did not help"
        raise DivergenceError(
            f"training diverged at step {step}: {why}; no checkpoint after it was written and "
            f"{where}. Lower optim.peak_lr (or check the data around that step) and rerun to "
            "resume from it, or set train.on_divergence=rollback to skip the batches")
