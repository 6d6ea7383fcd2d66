"""Running lm_eval tasks on a btlm_jax model: task lookup, :func:`evaluate`, flat metrics."""

from __future__ import annotations

import math
import os
from typing import Any

from btlm_jax.harness.lm import BTLMEvalLM, HarnessError

_TASK_MANAGERS: dict[tuple, Any] = {}


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (empty entries dropped)."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    return [t.strip() for t in tasks if t and t.strip()]


def task_manager(tasks: list[str], include_path: str | None = None):
    """An ``lm_eval`` TaskManager that knows ``tasks`` (cached per include path).

    With ``include_path`` the directory alone is indexed first (fast); lm_eval's built-in task
    index (about 10 s to build) is added only when a task is not found there.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        if not os.path.isdir(include_path):
            raise HarnessError(f"include_path={include_path!r} is not a directory of task YAMLs")
        include_path = os.path.abspath(include_path)
    candidates = [(include_path, False), (include_path, True)] if include_path else [(None, True)]
    tm = None
    for key in candidates:
        if key not in _TASK_MANAGERS:
            _TASK_MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=key[1])
        tm = _TASK_MANAGERS[key]
        known = set(tm.all_tasks)
        missing = [t for t in tasks if t not in known and not os.path.isfile(t)]
        if not missing:
            return tm
    where = f"in {include_path} or " if include_path else ""
    raise HarnessError(f"unknown task(s) {', '.join(missing)}: not found {where}among lm_eval's "
                       "tasks; check the name (lm_eval --tasks list) or give --include_path")


def evaluate(model: Any, tasks: str | list[str], *, include_path: str | None = None,
             num_fewshot: int | None = None, limit: float | None = None, batch_size: int = 8,
             log_samples: bool = False, bootstrap_iters: int = 100000, progress: bool = True,
             seed_globals: bool = True) -> dict:
    """``lm_eval.simple_evaluate`` on a btlm_jax handle (or a :class:`BTLMEvalLM`).

    Returns simple_evaluate's dict (``results``, ``configs``, ..., ``samples`` with
    ``log_samples``). ``seed_globals=False`` leaves Python's and NumPy's global random state alone
    (inside training); few-shot sampling keeps its own seed either way.
    """
    from lm_eval import simple_evaluate

    names = parse_tasks(tasks)
    if not names:
        raise HarnessError("no tasks given: name at least one lm_eval task (comma-separated)")
    lm = model if isinstance(model, BTLMEvalLM) else BTLMEvalLM(
        model, batch_size=batch_size, progress=progress)
    seeds = {} if seed_globals else {"random_seed": None, "numpy_random_seed": None,
                                     "torch_random_seed": None}
    res = simple_evaluate(
        model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
        bootstrap_iters=bootstrap_iters, task_manager=task_manager(names, include_path), **seeds)
    if res is None:
        raise HarnessError("lm_eval returned no results (not the main process)")
    return res


def flat_metrics(results: dict, prefix: str = "harness") -> dict[str, float]:
    """``{"harness/<task>/<metric>": value}`` from simple_evaluate's ``results`` section.

    lm_eval keys metrics ``"<metric>,<filter>"``; the filter is dropped when it is ``none`` and
    appended as ``<metric>_<filter>`` otherwise. Non-numeric entries (aliases, "N/A" stderrs)
    are skipped.
    """
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}_{filt}"
            if math.isfinite(float(value)):
                out[f"{prefix}/{task}/{name}"] = float(value)
    return out
