"""Parameter groups: a rule table (glob on parameter paths -> group) and the groups' settings.

A parameter's path is its keys joined by ``/`` (``layers/attn/query/kernel``; a leading
``params`` and Flax's ``value`` inside partitioning boxes are allowed and ignored by the globs,
which all start with ``*/``). The first rule whose glob matches ``"/" + path`` wins; a parameter
that no rule matches is an error naming it, so a new kind of parameter cannot silently fall into
the wrong group.

:func:`mup_groups` derives BTLM's table from the config (Yang et al.'s muP for Adam, as BTLM uses
it): hidden matrices train at ``lr / w`` (``w = d_model / base_d_model``), the FFN output kernel at
``lr / w_ff`` (``w_ff = d_ff / base_d_ff``; it reads the FFN width), embeddings (token and
position, and an untied output head, whose logits already carry muP's ``1 / w`` multiplier) at
``lr``, biases and LayerNorm parameters at ``lr`` with no weight decay. Embeddings keep weight
decay.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """How a group trains: LR = schedule * ``lr_mult``; weight decay on or off."""

    lr_mult: float = 1.0
    weight_decay: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class GroupRules:
    """``rules``: (glob, group name) pairs, first match wins; ``groups``: name -> ParamGroup."""

    rules: tuple[tuple[str, str], ...]
    groups: Mapping[str, ParamGroup]

    def __post_init__(self):
        for glob, name in self.rules:
            if name not in self.groups:
                raise ValueError(
                    f"rule {glob!r} -> {name!r}: no such group (groups: {', '.join(self.groups)})")
        for name, g in self.groups.items():
            if not (g.lr_mult > 0):
                raise ValueError(f"group {name!r}: lr_mult={g.lr_mult} must be > 0")

    def label(self, path: str) -> str:
        target = "/" + path.strip("/")
        for glob, name in self.rules:
            if fnmatch.fnmatchcase(target, glob):
                return name
        raise ValueError(
            f"parameter {path!r} matches no optimizer group rule; rules: "
            + ", ".join(f"{g} -> {n}" for g, n in self.rules))

    def labels(self, params: Any) -> Any:
        """A tree like ``params`` holding each leaf's group name."""
        return jax.tree_util.tree_map_with_path(lambda p, _: self.label(path_str(p)), params)

    def assignment(self, params: Any) -> dict[str, list[str]]:
        """Group name -> the paths of the parameters in it (for logging and tests)."""
        out: dict[str, list[str]] = {name: [] for name in self.groups}
        for p, _ in jax.tree_util.tree_leaves_with_path(params):
            path = path_str(p)
            out[self.label(path)].append(path)
        return out


def path_str(key_path) -> str:
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name == "value":  # flax partitioning boxes (nn.Partitioned / LogicallyPartitioned)
                continue
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


MUP_RULES: tuple[tuple[str, str], ...] = (
    ("*/bias", "no_decay"),
    ("*/scale", "no_decay"),  # LayerNorm gains
    ("*/embedding", "embed"),  # embed/, pos_embed/
    ("*/lm_head/kernel", "embed"),  # untied output head (logits x output_mult / w)
    ("*/mlp/wo/kernel", "hidden_ff"),
    ("*/kernel", "hidden"),  # q, k, v, attention out, wi / wi_0 / wi_1
)


def width_multipliers(cfg) -> tuple[float, float]:
    """(w, w_ff) used for LR scaling: both 1 unless model.mup.enabled and optim.mup_lr_scaling."""
    m = cfg.model
    if not (m.mup.enabled and cfg.optim.mup_lr_scaling):
        return 1.0, 1.0
    if m.mup.base_d_model <= 0 or m.mup.base_d_ff <= 0:
        raise ValueError(
            f"model.mup.base_d_model={m.mup.base_d_model}, model.mup.base_d_ff="
            f"{m.mup.base_d_ff}: must be > 0 for muP LR scaling")
    return m.d_model / m.mup.base_d_model, m.d_ff / m.mup.base_d_ff


def mup_groups(cfg) -> GroupRules:
    """BTLM's muP rule table for the full config (``cfg.model``, ``cfg.optim``)."""
    w, w_ff = width_multipliers(cfg)
    return GroupRules(
        rules=MUP_RULES,
        groups={
            "hidden": ParamGroup(lr_mult=1.0 / w, weight_decay=True),
            "hidden_ff": ParamGroup(lr_mult=1.0 / w_ff, weight_decay=True),
            "embed": ParamGroup(lr_mult=1.0, weight_decay=True),
            "no_decay": ParamGroup(lr_mult=1.0, weight_decay=False),
        },
    )
