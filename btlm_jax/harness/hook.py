"""In-loop harness evaluation: ``eval.harness_tasks`` on the live training parameters.

The training loop calls :func:`harness_metrics` at its evaluation steps with the parameters it
holds (sharded like training; nothing is written or restored) and logs the returned
``harness/<task>/<metric>`` values with its other metrics. The lm_eval model (and so its compiled
shapes) is kept between calls for the same model object, with the parameters swapped in.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

_LMS: dict[tuple, Any] = {}


def harness_tasks(cfg) -> list[str]:
    """The configured in-loop tasks (``eval.harness_tasks``, comma-separated; empty = off)."""
    from btlm_jax.harness.run import parse_tasks

    return parse_tasks(str(cfg.eval.get("harness_tasks", "") or ""))


def harness_metrics(cfg, model, params, tokenizer) -> dict[str, float]:
    """Runs ``eval.harness_tasks`` on ``params``; ``{"harness/<task>/<metric>": value}``.

    ``eval.harness_include_path`` adds a directory of task YAMLs, ``eval.harness_limit`` (> 0)
    caps the documents per task; the batch size is ``eval.batch_size``. Returns ``{}`` when no
    task is configured. Standard errors are not bootstrapped (``bootstrap_iters=0``) and the
    global Python/NumPy random state is left alone.
    """
    tasks = harness_tasks(cfg)
    if not tasks:
        return {}
    from btlm_jax.harness.lm import BTLMEvalLM
    from btlm_jax.harness.run import evaluate, flat_metrics

    bs = int(cfg.eval.batch_size)
    key = (id(model), bs)
    lm = _LMS.get(key)
    handle = SimpleNamespace(cfg=cfg, model=model, params=params, tokenizer=tokenizer)
    if lm is None or lm.model is not model:
        lm = _LMS[key] = BTLMEvalLM(handle, batch_size=bs, progress=False)
    else:
        lm.params = params  # same placement as before: the live training parameters
    limit = int(cfg.eval.get("harness_limit", 0) or 0)
    res = evaluate(lm, tasks, include_path=str(cfg.eval.get("harness_include_path", "") or "")
                   or None, limit=limit or None, bootstrap_iters=0, seed_globals=False)
    return flat_metrics(res)
