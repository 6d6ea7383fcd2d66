"""One placement path: state and batch shardings for either layout, from the config's rule table.

:func:`placement` is the only place that decides where the train state and the batches live:

- ``mesh.layout=standard``: parameters carry logical axis names (``vocab``, ``embed``, ``heads``,
  ``kv``, ``mlp``, ``norm``, ``layers``); ``mesh.rules`` maps them, and the activation axes
  (``act_batch``, ``act_length``, ``act_embed``, ``act_mlp``, ``act_heads``), to mesh axes.
  The optimizer state follows the parameters *by structure* (``optax.tree_map_params``): every
  parameter-shaped subtree of the state gets the parameters' shardings, everything else (counts,
  schedules' scalars) is replicated.
- ``mesh.layout=weight_streaming``: the same function places parameters and optimizer state in
  host memory; the :class:`Placement` then carries the two hooks the one train step calls
  (``to_device`` / ``to_host``) and the streamed model (:mod:`btlm_jax.parallel.streaming`).

Rules are strings ``"logical=mesh_axis[+mesh_axis...]"`` (empty right-hand side: replicated), so
they can be overridden from the command line:
``--config.mesh.rules="('act_batch=data+fsdp','embed=fsdp','mlp=tensor',...)"``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from btlm_jax.config import DEFAULT_MESH_RULES
from btlm_jax.parallel import mesh as mesh_lib
from btlm_jax.parallel.mesh import MESH_AXES, ShardingError

DEFAULT_RULES = DEFAULT_MESH_RULES


def parse_rules(rules) -> tuple[tuple[str, Any], ...]:
    """``("name=a+b", ...)`` -> Flax logical-axis rules ``(("name", ("a", "b")), ...)``."""
    out, seen = [], set()
    for i, r in enumerate(rules):
        if not isinstance(r, str) or r.count("=") != 1:
            raise ShardingError(
                f"mesh.rules[{i}]={r!r}: each rule must be 'logical_axis=mesh_axis[+mesh_axis]' "
                "(e.g. 'embed=fsdp', or 'norm=' for replicated)")
        name, rhs = (s.strip() for s in r.split("="))
        axes = tuple(a.strip() for a in rhs.split("+") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad or not name:
            raise ShardingError(
                f"mesh.rules[{i}]={r!r}: unknown mesh axis {bad[0] if bad else ''!r}; mesh axes "
                f"are {', '.join(MESH_AXES)}")
        if name in seen:
            raise ShardingError(f"mesh.rules[{i}]={r!r}: logical axis {name!r} is mapped twice")
        seen.add(name)
        out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
    return tuple(out)


def rules_from_config(cfg) -> tuple[tuple[str, Any], ...]:
    return parse_rules(cfg.mesh.rules)


def _identity(x):
    return x


@dataclasses.dataclass
class Placement:
    """Where the train state and batches live, and the hooks the train step calls.

    ``to_device`` / ``to_host`` move a pytree between the state's home and the devices (identity
    in the standard layout); ``streams`` says whether they are real moves (weight streaming);
    ``update_fn`` / ``add_fn`` replace the step's optimizer update and gradient sum.
    """

    mesh: Mesh
    rules: tuple
    state_shardings: Any  # a TrainState of shardings
    batch_sharding: NamedSharding
    batch_axes: tuple[str, ...]
    model: Any
    to_device: Callable = _identity
    to_host: Callable = _identity
    streams: bool = False
    # weight streaming: the optimizer update ``(params, opt_state, grad_sums, count) -> (params,
    # opt_state, grad_norm, param_norm)`` and the sum of two micro-batches' gradients, streamed
    # layer by layer (None: the train step's own update and tree sum)
    update_fn: Callable | None = None
    add_fn: Callable | None = None
    # XLA options the train step is compiled with (weight streaming: copy insertion that sees
    # a layer loop read slice i + 1 and write slice i of one stack in place; None: defaults)
    compiler_options: dict | None = None


def optimizer_shardings(tx, abstract_opt_state, param_shardings, replicated):
    """Optimizer-state shardings that follow the parameters by structure."""
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))


def _batch_axes(rules) -> tuple[str, ...]:
    entry = dict(rules).get("act_batch")
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def placement(cfg, mesh: Mesh, model, abstract_state, logical_params, tx) -> Placement:
    """State and batch shardings for ``cfg.mesh.layout`` on ``mesh``.

    ``abstract_state`` is the (unsharded) abstract train state, a struct with ``step``,
    ``params`` and ``opt_state``; ``logical_params`` the parameters' logical PartitionSpecs.
    Every sharded dimension is checked for divisibility, every large parameter for being sharded.
    """
    rules = rules_from_config(cfg)
    rep = NamedSharding(mesh, P())
    if cfg.mesh.layout == "weight_streaming":
        from btlm_jax.parallel import streaming

        return streaming.placement(cfg, mesh, model, abstract_state, rules, tx)
    with nn.logical_axis_rules(rules):
        param_sh = mesh_lib.logical_to_sharding(logical_params, mesh, rules)
    mesh_lib.check_param_shardings(abstract_state.params, logical_params, param_sh, mesh)
    opt_sh = optimizer_shardings(tx, abstract_state.opt_state, param_sh, rep)
    state_sh = abstract_state.replace(step=rep, params=param_sh, opt_state=opt_sh)
    axes = _batch_axes(rules)
    return Placement(mesh=mesh, rules=rules, state_shardings=state_sh,
                     batch_sharding=NamedSharding(mesh, P(axes or None)), batch_axes=axes,
                     model=model)
