"""Periodic work of the training loop as hooks, and the metric sinks.

A :class:`Hook` is a function of the loop's :class:`Context` run every ``every`` steps (and on the
last step when ``at_end``). The loop (:mod:`btlm_jax.train.loop`) runs the hooks after each step in
the order they were registered: count the step's tokens, record its metrics, evaluate, check
them, write them to the sinks, advance the progress bar, save a checkpoint, honour preemption. Add
a hook with :meth:`Hooks.add` to run your own work at a period (e.g. a probe every 500 steps).

Sinks receive each logged record: :class:`JsonlSink` (``metrics.jsonl``), :class:`TensorBoardSink`
and :class:`WandbSink` (``logging.wandb=True``). ``metrics.jsonl`` holds the run's current
trajectory: one record per logged step, and one record per rollback (``"rollback": i``, the
``i``-th entry of the run's rollback log, written at the step that diverged); a rollback or a
resume rewinds it (:meth:`JsonlSink.rewind`), so no record of a discarded or lost step stays.
TensorBoard and W&B cannot delete what they were sent: see :meth:`TensorBoardSink.rewind` and
:meth:`WandbSink.rewind` for what they show after a rollback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax


@dataclasses.dataclass
class Context:
    """What the hooks see and change after each step."""

    step: int
    total_steps: int
    state: Any
    metrics: Any = None  # the step's device metrics
    phase: int = 0
    seq_len: int = 0
    record: dict | None = None  # the metrics record being logged at this step, if any
    restarted: bool = False  # a rollback replaced the state: the step's remaining hooks skip
    stop: bool = False
    preempted: bool = False
    last_record: dict = dataclasses.field(default_factory=dict)

    @property
    def is_last(self) -> bool:
        return self.step >= self.total_steps


@dataclasses.dataclass
class Hook:
    name: str
    every: int
    fn: Callable[[Context], None]
    at_end: bool = True

    def due(self, ctx: Context) -> bool:
        return ctx.step % self.every == 0 or (self.at_end and ctx.is_last)


class Hooks:
    def __init__(self):
        self.hooks: list[Hook] = []
        self.closers: list[Callable[[], None]] = []

    def add(self, name: str, every: int, fn: Callable[[Context], None], at_end: bool = True):
        self.hooks.append(Hook(name, max(int(every), 1), fn, at_end))

    def on_close(self, fn: Callable[[], None]):
        self.closers.append(fn)

    def __call__(self, ctx: Context) -> None:
        ctx.restarted = False
        for h in self.hooks:
            if ctx.restarted:  # rolled back: ctx.step is the restored checkpoint's
                break
            if h.due(ctx):
                h.fn(ctx)

    def close(self) -> None:
        for fn in reversed(self.closers):
            fn()


# ----------------------------------------------------------------------------------------------
# Sinks.


def _finite_scalars(record: dict) -> dict:
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}


class JsonlSink:
    """``metrics.jsonl``: one JSON object per logged step and per rollback (process 0 writes)."""

    def __init__(self, path: Path, resume_step: int, rollbacks: int = 0):
        self.path = path
        # Lines past the restored checkpoint came from work that was lost; they are logged
        # again by this run, so drop them to keep one line per step.
        self.rewind(resume_step, rollbacks)

    def rewind(self, step: int, rollbacks: int) -> None:
        """Keeps the records of steps up to ``step`` and of the first ``rollbacks`` rollbacks."""
        if not self.path.exists():
            return
        kept = []
        for ln in self.path.read_text().splitlines():
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError:
                continue  # a line torn by a crash or a full disk
            if ("rollback" in rec and rec["rollback"] <= rollbacks) or (
                    "rollback" not in rec and rec.get("step", 0) <= step):
                kept.append(ln)
        # rewritten whole or not at all (a full disk leaves the old file)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, record: dict):
        # JSON has no inf/nan (e.g. tau is infinite while the LR is 0): write null instead.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        line = (json.dumps(clean) + "\n").encode()
        # one write of the whole line; a line cut short (e.g. a full disk) is cut off again
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                n = os.write(fd, line)
                if n != len(line):
                    raise OSError(28, "No space left on device", str(self.path))
            except OSError as e:
                os.ftruncate(fd, size)
                raise OSError(e.errno, e.strerror, str(self.path)) from e
        finally:
            os.close(fd)

    def close(self):
        pass


class TensorBoardSink:
    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(logdir))

    def write(self, record: dict):
        for k, v in _finite_scalars(record).items():
            self.tb.add_scalar(k, v, record["step"])

    def rewind(self, step: int, rollbacks: int) -> None:
        """Nothing to do: event files are append-only, and TensorBoard itself drops a series'
        points at and after a step once that series is written at the step again (its
        "preemption" of a restarted job's data). The steps a rollback discards thus disappear
        as the new trajectory logs them; the series only the rollback record has (``rollback``,
        ``restored_step``) stay."""

    def close(self):
        self.tb.close()


class WandbSink:
    """Weights & Biases (``logging.wandb``); offline (files under ``RUN/wandb``) when not
    logged in or ``logging.wandb_mode=offline``: ``wandb sync RUN/wandb/offline-*`` uploads.

    W&B's step must increase: W&B ignores a record at a step below the newest it holds (with a
    warning each), so this sink does not send those (see :meth:`rewind`)."""

    def __init__(self, cfg, run_path: Path):
        try:
            import wandb
        except ImportError:
            from btlm_jax.config import ConfigError

            raise ConfigError("logging.wandb=True needs the wandb package: pip install "
                              "'btlm_jax[wandb]' (or set logging.wandb=False)") from None
        mode = cfg.logging.wandb_mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
        self.run = wandb.init(
            project=cfg.logging.wandb_project, name=run_path.name, dir=str(run_path),
            id=_stable_id(run_path), resume="allow", mode=mode,
            config=json.loads(cfg.to_json_best_effort()))
        self.newest = self.run.starting_step  # a resumed W&B run's history goes this far

    def write(self, record: dict):
        step = int(record["step"])
        if step < self.newest:
            return  # W&B would ignore it (see rewind)
        self.newest = step
        self.run.log(_finite_scalars(record), step=step)

    def rewind(self, step: int, rollbacks: int) -> None:
        """Nothing W&B can do: its history cannot be cut back. After a rollback from the bad
        step N to checkpoint G, the W&B run keeps the discarded steps up to N and shows the new
        trajectory from N on (steps G + 1 .. N - 1 are logged to ``metrics.jsonl`` only); after
        a resume, the steps before the newest W&B holds keep their first values (the same,
        resumes being exact)."""

    def close(self):
        self.run.finish()


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _stable_id(run_path: Path) -> str:
    import hashlib

    return hashlib.sha1(str(run_path).encode()).hexdigest()[:16]


def make_sinks(cfg, run_path: Path, resume_step: int, rollbacks: int = 0) -> list:
    if jax.process_index() != 0:
        return []
    sinks: list = [JsonlSink(run_path / "metrics.jsonl", resume_step, rollbacks)]
    if cfg.logging.tensorboard:
        sinks.append(TensorBoardSink(run_path / "tensorboard"))
    if cfg.logging.wandb:
        sinks.append(WandbSink(cfg, run_path))
    return sinks


class ProgressBar:
    """A tqdm bar over steps (process 0) whose postfix shows the last logged record."""

    def __init__(self, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                        file=sys.stdout, mininterval=1.0)

    def update(self, ctx: Context) -> None:
        rec = ctx.record
        if rec is not None:
            post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_sec']:.0f}",
                    "TFLOP/s": f"{rec['model_tflops']:.3g}"}
            mfu = rec.get("mfu_nominal", rec.get("mfu_measured"))
            if mfu is not None:
                post["MFU"] = f"{100 * mfu:.1f}%"
            if "eval_loss" in rec:
                post["eval"] = f"{rec['eval_loss']:.3f}"
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(ctx.step - self.bar.n)  # 1, or back after a rollback

    def close(self):
        self.bar.close()


class Throughput:
    """Tokens per second over the window since the last logged step."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, n: int):
        self.tokens += n

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate
