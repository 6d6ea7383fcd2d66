"""The training driver: data, sharded state, jitted steps, evaluation, logging, checkpoints.

All I/O lives here; the model, optimizer and step functions are pure. A run directory holds
everything needed to resume exactly: ``config.json``, ``checkpoints/`` (Orbax, with the data
iterator state), ``metrics.jsonl`` and TensorBoard events.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from btlm_jax import optim
from btlm_jax.config import ConfigError, parse_phases, validate
from btlm_jax.models.btlm import BTLM
from btlm_jax.parallel import mesh as mesh_lib
from btlm_jax.train.checkpoint import Checkpointer
from btlm_jax.train.step import BATCH_KEYS, TrainState, eval_step, train_step

# Keys whose change makes an existing checkpoint unusable (shapes or the meaning of the state).
_STATE_DEFINING = ("model", "optim.name")


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"[btlm_jax] {msg}", flush=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def write_config(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes the resolved config; refuses a workdir trained with a different model."""
    path = workdir / "config.json"
    new = json.loads(cfg.to_json_best_effort())
    if path.exists():
        old = json.loads(path.read_text())
        fo, fn = _flatten(old), _flatten(new)
        diff = sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
        fatal = [k for k in diff if any(k == p or k.startswith(p + ".") for p in _STATE_DEFINING)]
        if fatal and (workdir / "checkpoints").exists():
            raise ConfigError(
                f"{workdir} holds a run with a different model: "
                + ", ".join(f"{k} was {fo.get(k)!r}, now {fn.get(k)!r}" for k in fatal)
                + ". Use a new --workdir, or rerun with the workdir's config.json.")
        if diff:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            (workdir / f"config.{stamp}.json").write_text(json.dumps(old, indent=2))
            log("config changed since the last run in this workdir: "
                + ", ".join(f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}" for k in diff)
                + f" (previous config kept as config.{stamp}.json)")
    if jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(new, indent=2))
        os.replace(tmp, path)


def resolve_data(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Fills data.train / data.eval with the embedded sample corpus when unset."""
    from btlm_jax.data.sample import build_sample_corpus

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if not cfg.data.train:
        paths = build_sample_corpus(cfg.data.cache_dir or None)
        cfg.data.train = paths["train"]
        if not cfg.data.eval:
            cfg.data.eval = paths["eval"]
        log(f"data.train unset: using the embedded sample corpus at {paths['train']}")
    return cfg


class _Preemption:
    """Turns SIGTERM (and Ctrl-C) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class MetricsWriter:
    def __init__(self, workdir: Path, resume_step: int, tensorboard: bool):
        self.path = workdir / "metrics.jsonl"
        self.primary = jax.process_index() == 0
        if self.primary and self.path.exists():
            # Lines past the restored checkpoint came from work that was lost; they are logged
            # again (identically) by this run, so drop them to keep one line per step.
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.tb = None
        if tensorboard and self.primary:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict):
        if not self.primary:
            return
        # JSON has no inf/nan (e.g. tau is infinite while the LR is 0): write null instead.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


_MEASURED_PEAKS: dict[str, float] = {}  # dtype -> TFLOP/s of this process's device


def _to_float(tree) -> dict:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


class Trainer:
    """Holds the compiled pieces of a run. ``Trainer(cfg, workdir).run()`` trains to the end."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, devices=None):
        from btlm_jax.data import pipeline
        from btlm_jax.data.tokenizer import load_or_train

        self.cfg = cfg = validate(resolve_data(cfg))
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, self.workdir)
        self.phases = parse_phases(cfg)
        self.total_steps = sum(p[2] for p in self.phases)
        self.pipeline = pipeline
        self.tokenizer = load_or_train(cfg, cfg.data.train)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                f"vocabulary ({self.tokenizer.vocab_size}); raise model.vocab_size")
        self.sources = list(pipeline.source_names(cfg))
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)  # devices: default all
        self.model = BTLM(cfg.model)
        self.tx, self.lr_schedule = optim.build(cfg, self.total_steps)
        self._setup_state_shardings()
        self.ckpt = Checkpointer(
            str(self.workdir / "checkpoints"), keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save)
        self._eval_cache: dict[int, list] = {}

    @classmethod
    def for_compile(cls, cfg: ml_collections.ConfigDict, devices=None) -> "Trainer":
        """A Trainer with model, optimizer, mesh and shardings but no data, tokenizer or
        workdir: enough to lower and compile the steps ahead of time (``describe --mesh``)."""
        self = cls.__new__(cls)
        self.cfg = cfg = validate(cfg)
        self.phases = parse_phases(cfg)
        self.total_steps = sum(p[2] for p in self.phases)
        self.mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        self.model = BTLM(cfg.model)
        self.tx, self.lr_schedule = optim.build(cfg, self.total_steps)
        self._setup_state_shardings()
        return self

    def mfu_metrics(self, tokens_per_sec: float, seq_len: int) -> dict:
        """Model TFLOP/s and MFU (against the nominal peak where known, and against a matmul
        peak measured once per process on this device; ``logging.measure_peak``)."""
        from btlm_jax import perf

        peak = None
        if self.cfg.logging.measure_peak:
            key = self.cfg.model.dtype
            if key not in _MEASURED_PEAKS:
                _MEASURED_PEAKS[key] = perf.measure_matmul_peak(key, repeats=2)
            peak = _MEASURED_PEAKS[key]
        return perf.mfu_metrics(tokens_per_sec, self.cfg.model, seq_len, measured_peak=peak)

    def abstract_batch(self, seq_len: int, batch_size: int) -> dict:
        dtypes = {"loss_mask": jnp.float32}
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes.get(k, jnp.int32),
                                        sharding=self.batch_sharding) for k in BATCH_KEYS}

    def compile_train_step(self, seq_len: int, batch_size: int):
        """Lowers and compiles the train step for abstract inputs (nothing is allocated)."""
        with nn.logical_axis_rules(self.rules):
            return self.jit_train_step().lower(
                self.abstract_state, self.abstract_batch(seq_len, batch_size)).compile()

    # ----- state ---------------------------------------------------------------------------
    def _init_state(self, rng):
        dummy = jnp.zeros((1, 8), jnp.int32)
        params = nn.unbox(self.model.init(rng, dummy)["params"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.tx.init(params))

    def _setup_state_shardings(self):
        rng = jax.random.PRNGKey(self.cfg.seed)
        dummy = jnp.zeros((1, 8), jnp.int32)
        abstract = jax.eval_shape(self._init_state, rng)
        self.streaming = None
        if self.cfg.mesh.layout == "weight_streaming":
            from btlm_jax.parallel.streaming import StreamingLayout

            self.streaming = StreamingLayout(self.cfg.model, self.mesh)
            self.state_shardings = self.streaming.state_shardings(abstract)
            self.batch_sharding = self.streaming.batch_sharding
            batch_axes = self.streaming.batch_axes
        else:
            boxed = jax.eval_shape(lambda r: self.model.init(r, dummy), rng)
            logical = nn.get_partition_spec(boxed)["params"]
            with nn.logical_axis_rules(mesh_lib.LOGICAL_RULES):
                param_sh = mesh_lib.logical_to_sharding(logical, self.mesh)
            # every sharded dimension divisible, every large parameter actually sharded
            mesh_lib.check_param_shardings(abstract.params, logical, param_sh, self.mesh)
            opt_sh = mesh_lib.tree_shardings_like_params(abstract.opt_state, param_sh, self.mesh)
            self.state_shardings = TrainState(
                step=mesh_lib.replicated(self.mesh), params=param_sh, opt_state=opt_sh)
            self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
            batch_axes = None
        for i, (_, bs, _) in enumerate(self.phases):
            mesh_lib.check_batch(bs // self.cfg.train.grad_accum_steps, self.mesh,
                                 "train.batch_size / train.grad_accum_steps" if not
                                 self.cfg.train.phases else
                                 f"train.phases[{i}] batch / train.grad_accum_steps", batch_axes)
        if self.cfg.data.eval:
            mesh_lib.check_batch(self.cfg.eval.batch_size, self.mesh, "eval.batch_size", batch_axes)
        self.abstract_state = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract, self.state_shardings)
        self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract.params))

    def init_state(self):
        init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        return init(jax.random.PRNGKey(self.cfg.seed))

    # ----- compiled steps ------------------------------------------------------------------
    def train_step_fn(self):
        """The pure train step of the configured layout (to jit, or to lower ahead of time)."""
        if self.streaming is not None:
            from btlm_jax.parallel import streaming

            return functools.partial(
                streaming.train_step, layout=self.streaming, tx=self.tx,
                lr_schedule=self.lr_schedule, grad_accum_steps=self.cfg.train.grad_accum_steps)
        return functools.partial(train_step, model=self.model, tx=self.tx,
                                 lr_schedule=self.lr_schedule,
                                 grad_accum_steps=self.cfg.train.grad_accum_steps)

    @property
    def rules(self):
        return mesh_lib.LOGICAL_RULES if self.streaming is None else self.streaming.rules

    def jit_train_step(self):
        return jax.jit(self.train_step_fn(),
                       in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,))

    def _under_rules(self, fn):
        def run(*args):  # the model's activation constraints read the rules at trace time
            with nn.logical_axis_rules(self.rules):
                return fn(*args)
        return run

    @functools.cached_property
    def train_step(self):
        return self._under_rules(self.jit_train_step())

    @functools.cached_property
    def eval_step(self):
        model = self.model if self.streaming is None else self.streaming.model
        fn = functools.partial(eval_step, model=model, num_sources=len(self.sources))
        return self._under_rules(
            jax.jit(fn, in_shardings=(self.state_shardings.params, self.batch_sharding)))

    def to_global(self, local_batch: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items() if k in BATCH_KEYS}

    # ----- data ----------------------------------------------------------------------------
    def phase_of(self, step: int) -> int:
        """Index of the phase that the step with ``step`` completed steps belongs to."""
        end = 0
        for i, (_, _, n) in enumerate(self.phases):
            end += n
            if step < end:
                return i
        return len(self.phases) - 1

    def phase_start(self, phase: int) -> int:
        return sum(p[2] for p in self.phases[:phase])

    def make_iterator(self, phase: int):
        seq_len, batch_size, _ = self.phases[phase]
        return self.pipeline.make_train_iterator(
            self.cfg, self.tokenizer, seq_len=seq_len, batch_size=batch_size, phase=phase,
            process_index=jax.process_index(), process_count=jax.process_count())

    def eval_batches(self, seq_len: int):
        if seq_len not in self._eval_cache:
            self._eval_cache[seq_len] = self.pipeline.make_eval_batches(
                self.cfg, self.tokenizer, seq_len=seq_len, batch_size=self.cfg.eval.batch_size,
                num_batches=self.cfg.eval.num_batches)
        return self._eval_cache[seq_len]

    def evaluate(self, params, seq_len: int) -> dict:
        if not self.cfg.data.eval:
            return {}
        tot = None
        for b in self.eval_batches(seq_len):
            # every process holds the whole eval batch: global shape = local shape
            g = {k: jax.make_array_from_process_local_data(
                     self.batch_sharding, np.asarray(b[k]), np.asarray(b[k]).shape)
                 for k in BATCH_KEYS + ("source_ids",)}
            out = jax.device_get(self.eval_step(params, g))
            tot = out if tot is None else jax.tree_util.tree_map(np.add, tot, out)
        if tot is None:
            return {}
        res = {"eval_loss": float(tot["loss_sum"] / max(tot["count"], 1.0))}
        for i, s in enumerate(self.sources):
            if tot["source_count"][i] > 0:
                res[f"eval_loss/{s}"] = float(tot["source_loss_sum"][i] / tot["source_count"][i])
        return res

    # ----- the loop ------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        latest = self.ckpt.latest_step()
        counters = {s: 0 for s in self.sources}
        data_state = None
        if latest is not None:
            state, saved = self.ckpt.restore(latest, self.abstract_state)
            data_state = saved
            counters.update(saved.get("tokens_per_source", {}))
            log(f"resumed from {self.workdir / 'checkpoints'} at step {latest}")
        else:
            state = self.init_state()
        step = int(jax.device_get(state.step))
        log(f"model: {self.num_params:,} parameters; mesh {dict(self.mesh.shape)}; "
            f"{self.total_steps} steps in {len(self.phases)} phase(s)")
        writer = MetricsWriter(self.workdir, step, cfg.logging.tensorboard)
        last = {}
        if step >= self.total_steps:
            log(f"run already complete ({step}/{self.total_steps} steps); nothing to do")
            writer.close()
            self.ckpt.close()
            return {"step": step, "complete": True}

        bar = None
        if cfg.logging.progress_bar and jax.process_index() == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True,
                       file=sys.stdout, mininterval=1.0)
        phase = self.phase_of(step)
        it = self.make_iterator(phase)
        if data_state is not None and data_state.get("phase") == phase:
            it.set_state(data_state["iterator"])
        window_tokens, window_start = 0, time.perf_counter()
        skipped_data = 0
        preempted = False
        try:
            with _Preemption() as pre:
                while step < self.total_steps:
                    new_phase = self.phase_of(step)
                    if new_phase != phase:
                        phase = new_phase
                        it = self.make_iterator(phase)
                        log(f"phase {phase}: seq_len {self.phases[phase][0]}, "
                            f"batch {self.phases[phase][1]}")
                    local = next(it)
                    src = np.asarray(local["source_ids"])
                    mask = np.asarray(local["loss_mask"]) > 0
                    for i, n in enumerate(np.bincount(src[mask], minlength=len(self.sources))):
                        counters[self.sources[i]] += int(n)
                    state, m = self.train_step(state, self.to_global(local))
                    step += 1
                    window_tokens += int(mask.sum()) * jax.process_count()
                    is_log = step % cfg.train.log_every_steps == 0 or step == self.total_steps
                    is_eval = step % cfg.eval.every_steps == 0 or step == self.total_steps
                    if is_log or is_eval:
                        rec = {"step": step, **_to_float(m)}
                        now = time.perf_counter()
                        rec["tokens_per_sec"] = window_tokens / max(now - window_start, 1e-9)
                        window_tokens, window_start = 0, now
                        rec.update(self.mfu_metrics(rec["tokens_per_sec"], self.phases[phase][0]))
                        rec["phase"] = phase
                        seen = sum(counters.values())
                        for s, n in counters.items():
                            rec[f"tokens/{s}"] = n
                            rec[f"token_share/{s}"] = n / max(seen, 1)
                        skipped_data = int(getattr(it, "skipped_documents", 0) or 0)
                        if skipped_data:
                            rec["data/skipped_documents"] = skipped_data
                        rec.update(_to_float(optim.group_metrics(state.opt_state, step)))
                        if is_eval:
                            rec.update(self.evaluate(state.params, self.phases[phase][0]))
                        if not math.isfinite(rec["loss"]):
                            raise FloatingPointError(
                                f"loss is {rec['loss']} at step {step}; the last good checkpoint "
                                f"is kept in {self.workdir / 'checkpoints'}. Lower optim.peak_lr "
                                "or check the data.")
                        writer.write(rec)
                        last = rec
                        if bar is not None:
                            post = {"loss": f"{rec['loss']:.3f}", "tok/s": f"{rec['tokens_per_sec']:.0f}",
                                    "TFLOP/s": f"{rec['model_tflops']:.3g}"}
                            mfu = rec.get("mfu_nominal", rec.get("mfu_measured"))
                            if mfu is not None:
                                post["MFU"] = f"{100 * mfu:.1f}%"
                            if "eval_loss" in rec:
                                post["eval"] = f"{rec['eval_loss']:.3f}"
                            bar.set_postfix(post, refresh=False)
                    if bar is not None:
                        bar.update(1)
                    save_now = step % cfg.checkpoint.every_steps == 0 or step == self.total_steps
                    if pre.requested:
                        save_now, preempted = True, True
                    if save_now:
                        self.ckpt.save(step, state, {
                            "phase": phase, "iterator": it.get_state(),
                            "tokens_per_source": counters}, force=True)
                    if preempted:
                        name = signal.Signals(pre.signum).name
                        log(f"{name} received: saved a checkpoint at step {step}; rerun the "
                            "same command to resume")
                        break
        finally:
            if bar is not None:
                bar.close()
            self.ckpt.close()
            writer.close()
        return {"step": step, "preempted": preempted, "complete": step >= self.total_steps, **last}


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``cfg`` in ``workdir``; returns the last metrics."""
    return Trainer(cfg, workdir).run()
