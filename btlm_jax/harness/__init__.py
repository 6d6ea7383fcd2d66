"""Downstream evaluation with EleutherAI's lm-evaluation-harness (``lm_eval``, the ``eval`` extra).

* :class:`BTLMEvalLM`: the ``lm_eval`` model over a btlm_jax handle (``cfg``, ``model``,
  ``params``, ``tokenizer``): batched, bucketed ``loglikelihood``, ``loglikelihood_rolling`` and
  KV-cache ``generate_until``.
* :func:`evaluate`: ``lm_eval.simple_evaluate`` on a handle with our task manager rules.
* :func:`btlm_jax.harness.hook.harness_metrics`: the in-loop metrics
  (``eval.harness_tasks``) on live parameters.
* ``python -m btlm_jax.harness --model=PATH --tasks=a,b ...``: the command line.
"""

from btlm_jax.harness.lm import BTLMEvalLM, HarnessError, bucket_length, load_handle
from btlm_jax.harness.run import evaluate, flat_metrics, task_manager

__all__ = ["BTLMEvalLM", "HarnessError", "bucket_length", "evaluate", "flat_metrics",
           "load_handle", "task_manager"]
