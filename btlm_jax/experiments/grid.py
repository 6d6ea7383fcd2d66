"""Grids and tasks.

A *task* is one cell of a sweep: a config file (``FILE[:ARG]``, as ``--config=`` takes it), typed
overrides, a run directory, free-form ``meta`` (the grid labels, for the results table) and
optionally a ``post`` hook (``"module:function"``) run in the same process after training.
:meth:`Task.command` is the plain ``python -m btlm_jax.main`` command that trains the cell.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from btlm_jax.cli.overrides import DEFAULT_CONFIG, SweepError, override_args, resolve_config

RESULT_FILE = "result.json"
TASK_FILE = "task.json"
LOG_FILE = "run.log"


def _check_axis(name: str, values: Any) -> list:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SweepError(f"grid axis {name!r}: expected a list of values, got {values!r}")
    values = list(values)
    if not values:
        raise SweepError(f"grid axis {name!r} has no values")
    return values


def expand_grid(axes: Mapping[str, Sequence[Any]],
                base: Mapping[str, Any] | None = None) -> list[dict]:
    """The Cartesian product of ``axes`` (key order, last key fastest), each point merged over
    ``base``. An empty axis is an error (it would silently produce no runs)."""
    lists = {k: _check_axis(k, v) for k, v in axes.items()}
    return [{**dict(base or {}), **dict(zip(lists, combo))}
            for combo in itertools.product(*lists.values())]


def axis(key: str, values: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    """A grid axis over one config key: ``{value: {key: value}}``."""
    return {v: {key: v} for v in _check_axis(key, values)}


def expand_axes(axes: Mapping[str, Mapping[Any, Mapping[str, Any]]]) -> list[tuple[dict, dict]]:
    """Named axes, each ``{label: overrides}``, to ``[(labels, overrides)]`` over their product
    (key order, last axis fastest). Labels go into a run's ``meta``; later axes win on a key."""
    for name, cases in axes.items():
        if not isinstance(cases, Mapping):
            raise SweepError(f"grid axis {name!r}: expected {{label: overrides}}, got {cases!r}")
        _check_axis(name, cases)
    names = list(axes)
    out = []
    for labels in itertools.product(*(list(axes[n]) for n in names)):
        overrides: dict[str, Any] = {}
        for n, lab in zip(names, labels):
            overrides.update(axes[n][lab])
        out.append((dict(zip(names, labels)), overrides))
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_name(values: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe name from grid values: ``peak_lr=0.003,schedule=d2z``."""
    name = ",".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in values.items()) or "run"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


@dataclasses.dataclass
class Task:
    name: str
    workdir: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    config: str = DEFAULT_CONFIG  # FILE[:ARG], as --config= takes it
    post: str | None = None  # "module:function(workdir, cfg, train_result, **post_args)"
    post_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    cost: float = 1.0  # relative run time, for scheduling the longest runs first

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "command": self.command()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Task":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - {"command"})
        if unknown:
            raise SweepError(f"task has unknown field(s) {', '.join(unknown)}")
        if "name" not in d or "workdir" not in d:
            raise SweepError(f"task {dict(d)!r} needs at least 'name' and 'workdir'")
        return cls(**{k: v for k, v in d.items() if k in fields})

    def args(self) -> list[str]:
        """``--config=... --config.KEY=VALUE ... --workdir=...``: main's arguments for the cell."""
        return [f"--config={resolve_config(self.config)}", *override_args(self.overrides),
                f"--workdir={self.workdir}"]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "btlm_jax.main", *self.args()]

    @property
    def result_path(self) -> Path:
        return Path(self.workdir) / RESULT_FILE

    def finished(self) -> bool:
        return self.result_path.exists()


def check_unique(tasks: Sequence[Task]) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        wd = str(Path(t.workdir).absolute())
        if wd in seen:
            raise SweepError(f"tasks {seen[wd]!r} and {t.name!r} share the workdir {wd}")
        seen[wd] = t.name


def write_tasks(tasks: Sequence[Task], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))
    return path


def read_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    if not path.exists():
        raise SweepError(f"task list {path} does not exist")
    out = []
    for i, ln in enumerate(path.read_text().splitlines(), 1):
        if ln.strip():
            try:
                out.append(Task.from_json(json.loads(ln)))
            except json.JSONDecodeError as e:
                raise SweepError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return out
