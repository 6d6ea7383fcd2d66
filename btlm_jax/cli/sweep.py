"""Any grid over a config, run locally (N processes) or as a SLURM job array (submitit).

    btlm-sweep grid --out runs/lr --config=tiny \\
        --grid optim.peak_lr=1e-3,3e-3,1e-2 --grid optim.schedule=d2z,constant \\
        --config.train.steps=100 --workers 2 [--slurm --partition gpu --time 04:00:00]
    btlm-sweep task runs/lr/runs/NAME/task.json     # one task
    (= python -m launch.sweep ...)

``--config.KEY=VALUE`` sets a key in every run, parsed exactly as ``btlm-train`` parses it; each
run is that command (``task.json`` holds it). Every cell's config is checked before any run
starts (a bad cell is one ``error:`` line naming the run and the key, exit 2). The library is
:mod:`btlm_jax.experiments` (grid, local runner, SLURM); rerunning a sweep skips finished runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax import errors
from btlm_jax.cli.common import OVERRIDES_HELP
from btlm_jax.experiments import local, runner
from btlm_jax.experiments.grid import Task, expand_axes, run_name
from btlm_jax.cli.overrides import (DEFAULT_CONFIG, SweepError, check_cell, get_value,
                                    load_config, split_override_args)


def _typed(config: str, key: str, texts: Sequence[str]) -> list:
    """Each text parsed as main parses ``--config.KEY=TEXT``."""
    return [get_value(load_config(config, [f"--config.{key}={t}"]), key) for t in texts]


def _grid_tasks(args, rest: Sequence[str]) -> list[Task]:
    fixed_text = split_override_args(rest)
    fixed = {k: _typed(args.config, k, [v])[0] for k, v in fixed_text.items()}
    axes = {}
    for g in args.grid:
        key, eq, values = g.partition("=")
        if not eq or not values:
            raise SweepError(f"--grid {g!r}: expected KEY=V1,V2,...")
        axes[key] = {v: {key: v} for v in _typed(args.config, key, values.split(","))}
    out = Path(args.out)
    tasks = [Task(name=run_name(labels), workdir=str(out / "runs" / run_name(labels)),
                  overrides={**fixed, **point}, meta=labels, config=args.config)
             for labels, point in expand_axes(axes)]
    for t in tasks:  # what each run checks at start, before any is launched
        check_cell(t.name, load_config(t.config, t.overrides))
    return tasks


def _cli_grid(args, rest: Sequence[str]) -> int:
    tasks = _grid_tasks(args, rest)
    out = Path(args.out)
    print(f"[sweep] {len(tasks)} run(s) in {out}")
    results, complete = runner.launch(tasks, out, args, job_name=out.name or "sweep")
    for r in results:
        print(f"  {r['name']}: {local.summary_line(r)}")
    return 0 if complete or args.slurm else 1


EXAMPLES = """\
examples:
  btlm-sweep grid --out runs/lr --config=tiny --grid optim.peak_lr=1e-3,3e-3 \\
      --grid optim.schedule=d2z,wsd --config.train.steps=200 --workers 2
  btlm-sweep task runs/lr/runs/NAME/task.json

""" + OVERRIDES_HELP


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``error: ...`` line (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(errors.EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="btlm-sweep", description=__doc__.split("\n")[0],
                                epilog=EXAMPLES, formatter_class=fmt)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{grid,task}")
    g = sub.add_parser("grid", help="run a grid of overrides of a config", epilog=EXAMPLES,
                       formatter_class=fmt)
    g.add_argument("--out", required=True, help="sweep directory (runs/, results.jsonl)")
    g.add_argument("--config", default=DEFAULT_CONFIG,
                   help="a preset (tiny, 3b_8k, ...) or FILE.py[:ARG], as btlm-train takes it "
                   "(default: %(default)s)")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of the grid; repeat for more axes")
    g.add_argument("--verbose", action="store_true", help="on a user error print the traceback")
    runner.add_launch_args(g)
    t = sub.add_parser("task", help="run one task file (what each local process runs)")
    t.add_argument("task_file")
    t.add_argument("--verbose", action="store_true", help="on a user error print the traceback")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args, rest = p.parse_known_args(argv)
    try:
        if args.cmd == "task":
            if rest:
                raise SweepError(f"task: unexpected arguments {' '.join(rest)}")
            return local.main([args.task_file])
        return _cli_grid(args, rest)
    except Exception as e:  # noqa: BLE001 - user errors as one line; bugs keep the traceback
        if errors.report(e, verbose_=args.verbose):
            return errors.EXIT_USER_ERROR
        raise


def console():
    sys.exit(main())


if __name__ == "__main__":
    console()
