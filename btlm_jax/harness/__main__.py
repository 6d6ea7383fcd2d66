"""``python -m btlm_jax.harness --model=PATH --tasks=a,b [--include_path=DIR] [--num_fewshot=N]
[--limit=N] [--batch_size=N] [--log_samples] [--output_path=DIR] [--json]``.

``PATH`` is a run directory or a Hugging Face folder (:func:`btlm_jax.load_model`). Prints
lm_eval's results table, or with ``--json`` the dict that ``lm_eval.simple_evaluate`` returns
(``results``, ``samples`` with ``--log_samples``, ...) as one JSON line, the last line printed.
``--output_path`` writes lm_eval's results (and samples) files there. A progress bar over the
requests goes to stderr.
"""

from __future__ import annotations

import json
import sys

from btlm_jax import errors
from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "Run directory or Hugging Face folder.")
_TASKS = flags.DEFINE_string("tasks", None, "Comma-separated lm_eval task (or group) names.")
_INCLUDE = flags.DEFINE_string("include_path", None, "Directory of extra task YAMLs.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples (default: the task's).")
_LIMIT = flags.DEFINE_float("limit", None, "Documents per task (< 1: a fraction); for testing.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Requests per batch.")
_MAX_LEN = flags.DEFINE_integer("max_length", None, "Context length (default model.max_seq_len).")
_SAMPLES = flags.DEFINE_bool("log_samples", False, "Keep per-document samples in the output.")
_OUT = flags.DEFINE_string("output_path", None, "Directory for lm_eval's results/samples files.")
_BOOT = flags.DEFINE_integer("bootstrap_iters", 100000, "Bootstrap iterations for stderrs (0: off).")
_JSON = flags.DEFINE_bool("json", False, "Print simple_evaluate's dict as the last line (JSON).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import logging as pylogging

    pylogging.getLogger("lm-eval").setLevel(pylogging.WARNING)
    pylogging.getLogger("lm_eval").setLevel(pylogging.WARNING)
    from lm_eval.utils import handle_non_serializable, make_table

    from btlm_jax.config import ConfigError
    from btlm_jax.harness.lm import BTLMEvalLM, HarnessError, load_handle

    try:
        handle = load_handle(_MODEL.value)
        lm = BTLMEvalLM(handle, batch_size=_BATCH.value, max_length=_MAX_LEN.value)
        from btlm_jax.harness.run import evaluate

        limit = _LIMIT.value
        if limit is not None and limit >= 1:
            limit = int(limit)
        res = evaluate(lm, _TASKS.value, include_path=_INCLUDE.value,
                       num_fewshot=_FEWSHOT.value, limit=limit, log_samples=_SAMPLES.value,
                       bootstrap_iters=_BOOT.value)
    except (HarnessError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    res["config"]["model"] = str(_MODEL.value)
    if _OUT.value:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=_OUT.value)
        samples = res.get("samples")
        tracker.save_results_aggregated(
            results={k: v for k, v in res.items() if k != "samples"}, samples=samples)
        for task in (samples or {}):
            tracker.save_results_samples(task_name=task, samples=samples[task])
    if _JSON.value:
        sys.stdout.flush()
        print(json.dumps(res, default=handle_non_serializable))
    else:
        print(make_table(res))
        if res.get("groups"):
            print(make_table(res, "groups"))


def run():
    flags.mark_flags_as_required(["model", "tasks"])
    with errors.cli():  # overrides parsed inside app.run (with --config=...) fail as one line
        app.run(main)


if __name__ == "__main__":
    run()
