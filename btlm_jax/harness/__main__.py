"""lm-evaluation-harness tasks on a run directory or a Hugging Face folder.

    btlm-harness --model=PATH --tasks=a,b [--include_path=DIR] [--num_fewshot=N] [--limit=N]
        [--batch_size=N] [--log_samples] [--output_path=DIR] [--json]
    (= python -m btlm_jax.harness ...; needs the eval extra: pip install -e '.[eval]')

PATH is a run directory or a Hugging Face folder (btlm_jax.load_model). Prints lm_eval's results
table, or with --json the dict that lm_eval.simple_evaluate returns (results, samples with
--log_samples, ...) as one JSON line, the last line printed. --output_path writes lm_eval's
results (and samples) files under DIR/<model folder name>/, as lm_eval does. A progress bar over
the requests goes to stderr.
"""

from __future__ import annotations

import json
import sys

from pathlib import Path

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app, start

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
errors.define_verbose_flag()


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv, distributed=False)
    import logging as pylogging

    pylogging.getLogger("lm-eval").setLevel(pylogging.WARNING)
    pylogging.getLogger("lm_eval").setLevel(pylogging.WARNING)
    try:
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError as e:
        raise errors.UserError(f"btlm-harness needs lm_eval ({e}); install the eval extra: "
                               "pip install -e '.[eval]'") from e

    from btlm_jax.harness.lm import BTLMEvalLM, load_handle
    from btlm_jax.harness.run import evaluate

    handle = load_handle(_MODEL.value)
    lm = BTLMEvalLM(handle, batch_size=_BATCH.value, max_length=_MAX_LEN.value)
    limit = _LIMIT.value
    if limit is not None and limit >= 1:
        limit = int(limit)
    res = evaluate(lm, _TASKS.value, include_path=_INCLUDE.value, num_fewshot=_FEWSHOT.value,
                   limit=limit, log_samples=_SAMPLES.value, bootstrap_iters=_BOOT.value)
    res["config"]["model"] = str(_MODEL.value)
    if _OUT.value:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=_OUT.value)
        # the files go to OUT/<model name>/ as with lm_eval's own CLI (without this: OUT/None/)
        tracker.general_config_tracker.log_experiment_args(
            model_source="btlm_jax", model_args={"path": _model_name(_MODEL.value)},
            system_instruction=None, chat_template=None, fewshot_as_multiturn=False)
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


def _model_name(path: str) -> str:
    """The folder name of a run directory or Hugging Face folder (``runs/tiny`` -> ``tiny``)."""
    return Path(str(path).rstrip("/")).name or str(path)


def run():
    run_app(main, "model", "tasks", prog="btlm-harness")


if __name__ == "__main__":
    run()
