"""The training program: everything a run computes, from a config alone, with no I/O.

``Program.from_config(cfg)`` builds the mesh, model, optimizer and LR schedule, the state and
batch shardings (one placement path: :func:`btlm_jax.parallel.sharding.placement`), the abstract
and initial state, and the jitted train and eval steps. It reads no data, trains no tokenizer and
writes nothing, so training (:mod:`btlm_jax.train.loop`), evaluation, generation, checkpoint
conversion, ahead-of-time memory reports and benchmarks all build the same program.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from btlm_jax import optim
from btlm_jax.config import parse_phases, phase_of, validate
from btlm_jax.models.btlm import BTLM, activation_mesh
from btlm_jax.models.padding import logical_num_params
from btlm_jax.parallel import mesh as mesh_lib
from btlm_jax.parallel.sharding import Placement, placement
from btlm_jax.train.step import BATCH_KEYS, TrainState, eval_step, train_step


def _init_state(model, tx, rng):
    params = nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


@dataclasses.dataclass
class Program:
    """The compiled pieces of a run. Build with :meth:`from_config`."""

    cfg: ml_collections.ConfigDict
    phases: list[tuple[int, int, int]]
    mesh: Any
    model: BTLM
    tx: Any
    lr_schedule: Any
    place: Placement
    abstract_state: Any  # TrainState of ShapeDtypeStructs carrying the shardings
    num_params: int  # of the logical model (model.pad_multiple's padding not counted)
    _eval_steps: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, devices=None) -> "Program":
        cfg = validate(cfg)
        phases = parse_phases(cfg)
        mesh = mesh_lib.make_mesh(cfg.mesh, devices)
        model = BTLM(cfg.model)
        tx, lr = optim.build(cfg, sum(p[2] for p in phases))
        rng = jax.random.PRNGKey(cfg.seed)
        abstract = jax.eval_shape(functools.partial(_init_state, model, tx), rng)
        boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), rng)
        logical = nn.get_partition_spec(boxed)["params"]
        place = placement(cfg, mesh, model, abstract, logical, tx)
        _check_batches(cfg, phases, place)
        sharded = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract, place.state_shardings)
        n = logical_num_params(abstract.params, cfg.model)  # padding (pad_multiple) excluded
        return cls(cfg=cfg, phases=phases, mesh=mesh, model=model, tx=tx, lr_schedule=lr,
                   place=place, abstract_state=sharded, num_params=n)

    # ----- shapes and shardings --------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(p[2] for p in self.phases)

    @property
    def state_shardings(self):
        return self.place.state_shardings

    @property
    def batch_sharding(self):
        return self.place.batch_sharding

    @property
    def rules(self):
        return self.place.rules

    def abstract_batch(self, seq_len: int, batch_size: int) -> dict:
        dtypes = {"loss_mask": jnp.float32}
        return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes.get(k, jnp.int32),
                                        sharding=self.batch_sharding) for k in BATCH_KEYS}

    def phase_of(self, step: int) -> int:
        """Index of the phase that the step with ``step`` completed steps belongs to."""
        return phase_of(self.phases, step)

    # ----- state -----------------------------------------------------------------------------
    def init_state(self) -> TrainState:
        init = jax.jit(functools.partial(_init_state, self.model, self.tx),
                       out_shardings=self.state_shardings)
        return init(jax.random.PRNGKey(self.cfg.seed))

    def init_opt_state(self, params):
        """A fresh optimizer state for ``params`` (an imported checkpoint), placed like training."""
        return jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)

    # ----- steps -----------------------------------------------------------------------------
    def train_step_fn(self):
        """The pure train step with this program's model, optimizer and placement hooks."""
        p = self.place
        return functools.partial(
            train_step, model=p.model, tx=self.tx, lr_schedule=self.lr_schedule,
            grad_accum_steps=self.cfg.train.grad_accum_steps, to_device=p.to_device,
            to_host=p.to_host, streams=p.streams, update_fn=p.update_fn, add_fn=p.add_fn)

    def jit_train_step(self):
        return jax.jit(self.train_step_fn(),
                       in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, None), donate_argnums=(0,),
                       compiler_options=self.place.compiler_options)

    @contextlib.contextmanager
    def tracing(self):
        """The context the model is traced in: the logical-axis rules and the activation mesh,
        so the activations are constrained as ``mesh.rules`` says (``act_*`` axes)."""
        with nn.logical_axis_rules(self.rules), activation_mesh(self.mesh):
            yield

    def under_rules(self, fn):
        def run(*args):  # the model's activation constraints read the rules at trace time
            with self.tracing():
                return fn(*args)
        return run

    @functools.cached_property
    def train_step(self):
        return self.under_rules(self.jit_train_step())

    def counting_train_step(self, num_sources: int):
        """The jitted train step that also returns ``tokens_per_source`` (int32
        ``[num_sources]``): the loss-masked target tokens of the global batch per ``source_ids``
        (which the batch then carries), counted on the devices, hence global whatever the
        process count. The loop trains with it."""
        key = ("train", num_sources)
        if key not in self._eval_steps:  # (the dict caches every jitted step of the program)
            base = self.train_step_fn()

            def fn(state, batch):
                state, metrics = base(state, {k: batch[k] for k in BATCH_KEYS})
                counted = batch["loss_mask"] > 0
                metrics["tokens_per_source"] = jnp.stack(
                    [jnp.sum(counted & (batch["source_ids"] == i), dtype=jnp.int32)
                     for i in range(num_sources)])
                return state, metrics

            self._eval_steps[key] = self.under_rules(jax.jit(
                fn, in_shardings=(self.state_shardings, self.batch_sharding),
                out_shardings=(self.state_shardings, None), donate_argnums=(0,),
                compiler_options=self.place.compiler_options))
        return self._eval_steps[key]

    def compile_train_step(self, seq_len: int, batch_size: int):
        """Lowers and compiles the train step for abstract inputs (nothing is allocated)."""
        with self.tracing():
            return self.jit_train_step().lower(
                self.abstract_state, self.abstract_batch(seq_len, batch_size)).compile()

    def eval_step(self, num_sources: int, params_fn=None):
        """The jitted eval step ``(params, batch, alibi_scale) -> loss sums`` for ``num_sources``
        data sources; the same function serves the loop and ``evaluate``. ``params_fn`` (e.g.
        dequantisation) is applied to the parameters inside the step; the compiler then places
        the parameters, otherwise they are sharded as in the train state."""
        key = (num_sources, params_fn)
        if key not in self._eval_steps:
            model, tf = self.place.model, params_fn or (lambda p: p)

            def fn(params, batch, scale):
                return eval_step(tf(params), batch, model=model, num_sources=num_sources,
                                 alibi_scale=scale)
            psh = self.state_shardings.params if params_fn is None else None
            self._eval_steps[key] = self.under_rules(
                jax.jit(fn, in_shardings=(psh, self.batch_sharding, None)))
        return self._eval_steps[key]

    def eval_sums(self, params, batches, num_sources: int, alibi_scale: float = 1.0,
                  params_fn=None) -> dict | None:
        """Loss sums (float64 NumPy) over evaluation ``batches`` that every process holds whole;
        None when there are none. The one evaluation path of the loop and ``evaluate``."""
        step = self.eval_step(num_sources, params_fn)
        tot = None
        for b in batches:
            g = self.to_global(b, BATCH_KEYS + ("source_ids",), replicated_rows=True)
            out = jax.device_get(step(params, g, np.float32(alibi_scale)))
            out = {k: np.asarray(v, np.float64) for k, v in out.items()}
            tot = out if tot is None else {k: tot[k] + out[k] for k in tot}
        return tot

    def to_global(self, local_batch: dict, keys=BATCH_KEYS, replicated_rows: bool = False) -> dict:
        """Global arrays from this process's rows (``replicated_rows``: every process holds the
        whole batch, as in evaluation)."""
        out = {}
        for k in keys:
            v = np.asarray(local_batch[k])
            shape = v.shape if replicated_rows else None
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v, shape)
        return out


def _check_batches(cfg, phases, place: Placement) -> None:
    for i, (_, bs, _) in enumerate(phases):
        what = ("train.batch_size / train.grad_accum_steps" if not cfg.train.phases
                else f"train.phases[{i}] batch / train.grad_accum_steps")
        mesh_lib.check_batch(bs // cfg.train.grad_accum_steps, place.mesh, what, place.batch_axes)
    if cfg.data.eval:
        mesh_lib.check_batch(cfg.eval.batch_size, place.mesh, "eval.batch_size", place.batch_axes)
