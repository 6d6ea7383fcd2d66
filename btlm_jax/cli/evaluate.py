"""evaluate a run: loss and perplexity per length, per source and per position.

    btlm-evaluate --workdir=RUN [--data=GLOB] [--lengths=2048,4096,8192]
        [--position_interpolation=off|on|both] [--quantize=none|int8|int4] [--json]
    (= python -m btlm_jax.evaluate ...)

Prints loss and perplexity per evaluation length and position-interpolation setting, per source,
and the loss per position averaged in buckets (so extrapolation beyond the training length is
visible). Writes one loss-against-position PNG per length and setting, and all results (with the
full per-position curves) to RUN/eval/. With --json the last line printed is
{"results": [{"length": L, "position_interpolation": bool, "loss": x, "per_source": {...},
...}, ...]}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from absl import flags

from btlm_jax import errors
from btlm_jax.cli.common import run_app, start

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
_DATA = flags.DEFINE_string("data", "", "Evaluation data glob(s); default: the run's data.eval.")
_LENGTHS = flags.DEFINE_string(
    "lengths", "", "Comma-separated evaluation lengths; default: the training length, 2x and 4x.")
_PI = flags.DEFINE_enum("position_interpolation", "both", ["off", "on", "both"],
                        "ALiBi position interpolation (slopes / (L / L_train) when L > L_train).")
_QUANT = flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"],
                           "Weight-only quantisation of the restored parameters.")
_GROUP = flags.DEFINE_integer("group_size", 128, "int4 group size (inputs per scale).")
_BUCKETS = flags.DEFINE_integer("buckets", 16, "Number of position buckets per length.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Sequences per eval batch (0: eval.batch_size).")
_NUM = flags.DEFINE_integer("num_batches", 0, "Eval batches per length (0: eval.num_batches).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate (-1: latest).")
_PLOTS = flags.DEFINE_bool("plots", True, "Write loss-vs-position PNGs into WORKDIR/eval/.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object on the last line.")
errors.define_verbose_flag()


def parse_lengths(spec: str, default: list[int]) -> list[int]:
    if not spec.strip():
        return default
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lengths={spec!r}: must be comma-separated integers, e.g. 2048,4096") from None
    if not out or min(out) <= 0:
        raise ValueError(f"--lengths={spec!r}: lengths must be positive")
    return out


@errors.entry_point  # user errors: one `error: ...` line, exit 2 (--verbose: the traceback)
def main(argv):
    start(argv)
    import ml_collections

    from btlm_jax.eval.perplexity import Evaluator, train_length
    from btlm_jax.eval.plot import plot_filename, plot_loss_vs_position
    from btlm_jax.eval.session import load_run

    run = load_run(_WORKDIR.value, None if _STEP.value < 0 else _STEP.value)
    lt = train_length(run.cfg)
    lengths = parse_lengths(_LENGTHS.value, [lt, 2 * lt, 4 * lt])
    m = run.cfg.model
    if m.position == "learned" and max(lengths) > m.max_seq_len:
        raise ValueError(
            f"--lengths: {max(lengths)} exceeds model.max_seq_len={m.max_seq_len}; a model "
            "with learned positions cannot be evaluated beyond its position table")
    data_cfg = run.cfg
    if _DATA.value:
        data_cfg = ml_collections.ConfigDict(run.cfg.to_dict())
        data_cfg.data.eval = _DATA.value
    ev = Evaluator(run, data_cfg, quantize=_QUANT.value, group_size=_GROUP.value,
                   batch_size=_BATCH.value or None, num_batches=_NUM.value or None)
    modes = {"off": [False], "on": [True], "both": [False, True]}[_PI.value]
    results = ev.results(lengths, modes, _BUCKETS.value)

    out_dir = Path(_WORKDIR.value) / "eval"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(out_dir, os.W_OK) and not _read_only(out_dir)
    except OSError:
        writable = False
    if not writable:  # a read-only run directory: evaluate anyway, print only
        print(f"note: {out_dir} is not writable; results are printed, not saved", file=sys.stderr)
    print(f"step {run.step}; training length {lt}; quantize={ev.quantize} "
          f"({ev.weight_bytes:,} weight bytes); {ev.num_batches} x {ev.batch_size} sequences "
          "per length")
    for r in results:
        if _PLOTS.value and writable:
            r["plot"] = str(plot_loss_vs_position(r, out_dir / plot_filename(r)))
        pi = "on " if r["position_interpolation"] else "off"
        print(f"L={r['length']:>6} PI={pi} slopes/{r['pi_scale']:<6.3g} loss {r['loss']:.4f}  "
              f"ppl {r['perplexity']:.2f}  ({r['tokens']:,} tokens)")
        for s, v in r["per_source"].items():
            print(f"    {s:<28} loss {v:.4f}  ppl {r['per_source_perplexity'][s]:.2f}")
        print("    by position: " + "  ".join(
            f"[{b['start']},{b['end']}) {b['loss']:.3f}" for b in r["position_buckets"]
            if b["loss"] is not None))
    suffix = "" if ev.quantize == "none" else f"_{ev.quantize}"
    if writable:
        (out_dir / f"results{suffix}.json").write_text(json.dumps({"results": results}))
    if _JSON.value:
        slim = [{k: v for k, v in r.items() if k != "position_loss"} for r in results]
        print(json.dumps({"results": slim}))


def _read_only(path: Path) -> bool:
    """A read-only mount (root's os.access ignores it)."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def run():
    run_app(main, "workdir", prog="btlm-evaluate")


if __name__ == "__main__":
    run()
