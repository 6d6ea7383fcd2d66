"""The training driver: restore, then a flat loop whose periodic work is hooks.

Data flow: config -> :class:`~btlm_jax.train.program.Program` (pure: mesh, model, optimizer,
shardings, jitted steps) -> this loop (data feed, hooks) -> :func:`~btlm_jax.train.step.train_step`
-> :class:`~btlm_jax.models.btlm.BTLM`. The run directory (:mod:`btlm_jax.train.run_dir`) holds
everything needed to resume exactly: ``config.json``, ``tokenizer/``, ``checkpoints/`` (Orbax,
with the token counters and the rollback log: the data position follows from the step and the
log, see :mod:`~btlm_jax.train.feed`), ``rollbacks.json``, ``metrics.jsonl`` and TensorBoard
events. A divergence stops the run or rolls it back (:mod:`~btlm_jax.train.guard`): the loop then
continues from the restored checkpoint's step.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from btlm_jax import optim
from btlm_jax.train.feed import TrainFeed
from btlm_jax.train.guard import DivergenceGuard
from btlm_jax.train.hooks import Context, Hooks, ProgressBar, Throughput, make_sinks
from btlm_jax.train.lock import workdir_lock
from btlm_jax.train.preemption import StopVote
from btlm_jax.train.program import Program
from btlm_jax.train.run_dir import (Preemption, RunDir, log, resumed_rollbacks,
                                    write_rollbacks)

_MEASURED_PEAKS: dict[str, float] = {}  # dtype -> TFLOP/s of this process's device


def _to_float(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def mfu_metrics(cfg, tokens_per_sec: float, seq_len: int) -> dict:
    """Model TFLOP/s and MFU (against the nominal peak where known, and against a matmul peak
    measured once per process on this device; ``logging.measure_peak``)."""
    from btlm_jax.train import perf

    peak = None
    if cfg.logging.measure_peak:
        key = cfg.model.dtype
        if key not in _MEASURED_PEAKS:
            _MEASURED_PEAKS[key] = perf.measure_matmul_peak(key, repeats=2)
        peak = _MEASURED_PEAKS[key]
    return perf.mfu_metrics(tokens_per_sec, cfg.model, seq_len, measured_peak=peak)


def eval_metrics(program: Program, feed: TrainFeed, params, seq_len: int) -> dict:
    """``eval_loss`` and ``eval_loss/<source>`` on the held-out batches at ``seq_len``."""
    tot = program.eval_sums(params, feed.eval_batches(seq_len), len(feed.sources))
    if tot is None:
        return {}
    res = {"eval_loss": float(tot["loss_sum"] / max(tot["count"], 1.0))}
    for i, s in enumerate(feed.sources):
        if tot["source_count"][i] > 0:
            res[f"eval_loss/{s}"] = float(tot["source_loss_sum"][i] / tot["source_count"][i])
    return res


def default_hooks(run: RunDir, program: Program, feed: TrainFeed, ckpt, pre: Preemption,
                  start: int) -> Hooks:
    """The loop's periodic work, in order: count, record, evaluate, check, write, progress, save,
    stop. After a rollback (in check or save) the step's remaining hooks are skipped."""
    cfg, hooks, rate = run.cfg, Hooks(), Throughput()

    def record(ctx: Context):
        if ctx.record is None:
            rate.add(feed.take_tokens())  # global tokens, counted in the train step
            scalars = {k: v for k, v in ctx.metrics.items() if k != "tokens_per_source"}
            rec = {"step": ctx.step, **_to_float(scalars), "tokens_per_sec": rate.take()}
            rec.update(mfu_metrics(cfg, rec["tokens_per_sec"], ctx.seq_len))
            rec.update(phase=ctx.phase, **feed.token_metrics())
            if feed.skipped_documents:
                rec["data/skipped_documents"] = feed.skipped_documents
            rec.update(_to_float(optim.group_metrics(ctx.state.opt_state, ctx.step)))
            ctx.record = rec

    def evaluate(ctx: Context):
        record(ctx)
        ctx.record.update(eval_metrics(program, feed, ctx.state.params, ctx.seq_len))
        if cfg.eval.get("harness_tasks"):  # lm-eval tasks on the live parameters
            from btlm_jax.harness.hook import harness_metrics

            ctx.record.update(harness_metrics(cfg, program.model, ctx.state.params,
                                              run.tokenizer))

    sinks = make_sinks(cfg, run.path, start, len(feed.rollbacks))
    # every step: loss / grad norm finite (and no loss spike) before anything is saved
    guard = DivergenceGuard(cfg, run, ckpt, program.abstract_state, feed, sinks, log)

    def write(ctx: Context):
        if ctx.record is not None:
            for s in sinks:
                s.write(ctx.record)
            ctx.last_record = ctx.record

    vote = StopVote()

    def stop_if_preempted(ctx: Context):
        # every process votes every step; all stop (and save, collectively) at the same step
        if vote.vote(pre.requested):
            guard.save(ctx)  # (verified first; a rollback there leaves the restored step saved)
            ctx.stop = ctx.preempted = True
            why = f"{pre.name} received" if pre.requested else "another process was preempted"
            who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
            print(f"[btlm_jax] {who}{why}: saved a checkpoint at step {ctx.step}; rerun the same "
                  "command to resume", flush=True)

    hooks.add("count", 1, lambda ctx: feed.count(ctx.metrics))
    hooks.add("record", cfg.train.log_every_steps, record)
    hooks.add("evaluate", cfg.eval.every_steps, evaluate)
    hooks.add("check", 1, guard.check)
    hooks.add("write", 1, write)
    if cfg.logging.progress_bar and jax.process_index() == 0:
        bar = ProgressBar(program.total_steps, start)
        hooks.add("progress", 1, bar.update)
        hooks.on_close(bar.close)
    hooks.add("checkpoint", cfg.checkpoint.every_steps, guard.save)
    hooks.add("preemption", 1, stop_if_preempted)
    for s in sinks:
        hooks.on_close(s.close)
    return hooks


def restore_or_init(program: Program, ckpt, feed: TrainFeed, run: RunDir):
    """The latest checkpoint's state, token counters and rollback log (else a fresh state);
    ``RUN/rollbacks.json`` is rewritten to the log the run continues with."""
    found = ckpt.restore_latest(program.abstract_state, log)  # skips corrupt steps, one line each
    if found is None:
        feed.restore(None, rollbacks=[])
        write_rollbacks(run.path, [])
        return program.init_state()
    latest, state, saved = found
    feed.restore(saved, rollbacks=resumed_rollbacks(run.path, latest,
                                                    (saved or {}).get("rollbacks")))
    write_rollbacks(run.path, feed.rollbacks)
    n = len(feed.rollbacks)
    log(f"resumed from {run.checkpoint_dir} at step {latest}"
        + (f" ({n} rollback{'s' * (n > 1)} in its log)" if n else ""))
    return state


def train(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``cfg`` in ``workdir``; returns the last metrics.
    A second run on the same workdir stops at once (:mod:`btlm_jax.train.lock`)."""
    with workdir_lock(workdir):
        return _train(cfg, workdir, devices)


def _train(cfg: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
    run = RunDir.for_training(workdir, cfg)
    program = Program.from_config(run.cfg, devices)
    feed = TrainFeed(run.cfg, run.tokenizer, program.phases, program.phase_of)
    ckpt = run.checkpointer()
    state = restore_or_init(program, ckpt, feed, run)
    ctx = Context(step=int(jax.device_get(state.step)), total_steps=program.total_steps,
                  state=state)
    log(f"model: {program.num_params:,} parameters; mesh {dict(program.mesh.shape)}; "
        f"{ctx.total_steps} steps in {len(program.phases)} phase(s)")
    if ctx.is_last:
        log(f"run already complete ({ctx.step}/{ctx.total_steps} steps); nothing to do")
        ckpt.close()
        return {"step": ctx.step, "complete": True}
    with Preemption() as pre:
        hooks = default_hooks(run, program, feed, ckpt, pre, ctx.step)
        train_step = program.counting_train_step(len(feed.sources))
        try:
            while not ctx.stop and not ctx.is_last:
                batch = feed.global_batch(ctx.step, program.batch_sharding)
                ctx.phase, ctx.seq_len = feed.phase, program.phases[feed.phase][0]
                ctx.state, ctx.metrics = train_step(ctx.state, batch)
                ctx.step, ctx.record = ctx.step + 1, None
                hooks(ctx)
        finally:
            hooks.close()
            ckpt.close()
            feed.close()
    # the last logged record, then where the run stopped (a preempted run saved a checkpoint at
    # exactly this step; the record may be from an earlier logged step)
    return {**ctx.last_record, "step": ctx.step, "preempted": ctx.preempted,
            "complete": ctx.is_last}
