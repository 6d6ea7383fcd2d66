"""Any grid over a config file, run locally (N processes) or as a SLURM job array (submitit).

    python -m launch.sweep grid --out runs/lr --config=configs/btlm.py:tiny \\
        --grid optim.peak_lr=1e-3,3e-3,1e-2 --grid optim.schedule=d2z,constant \\
        --config.train.steps=100 --workers 2 [--slurm --partition gpu --time 04:00:00]
    python -m launch.sweep task runs/lr/runs/NAME/task.json     # one task

``--config.KEY=VALUE`` sets a key in every run, parsed exactly as ``python -m btlm_jax.main``
parses it; each run is that command (``task.json`` holds it). The library is
:mod:`btlm_jax.experiments` (grid, local runner, SLURM); rerunning a sweep skips finished runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import local, runner
from btlm_jax.experiments.grid import Task, expand_axes, run_name
from btlm_jax.cli.overrides import SweepError, get_value, load_config, split_override_args


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
    return [Task(name=run_name(labels), workdir=str(out / "runs" / run_name(labels)),
                 overrides={**fixed, **point}, meta=labels, config=args.config)
            for labels, point in expand_axes(axes)]


def _cli_grid(args, rest: Sequence[str]) -> int:
    tasks = _grid_tasks(args, rest)
    out = Path(args.out)
    print(f"[sweep] {len(tasks)} run(s) in {out}")
    results, complete = runner.launch(tasks, out, args, job_name=out.name or "sweep")
    for r in results:
        print(f"  {r['name']}: {local.summary_line(r)}")
    return 0 if complete or args.slurm else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid", help="run a grid of overrides of a config file",
                       epilog="--config.KEY=VALUE: set in every run, as python -m btlm_jax.main")
    g.add_argument("--out", required=True, help="sweep directory (runs/, results.jsonl)")
    g.add_argument("--config", default="configs/btlm.py:tiny", help="FILE[:ARG], as main takes it")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    runner.add_launch_args(g)
    t = sub.add_parser("task", help="run one task file (what each local process runs)")
    t.add_argument("task_file")
    args, rest = p.parse_known_args(argv)
    try:
        if args.cmd == "task":
            if rest:
                raise SweepError(f"task: unexpected arguments {' '.join(rest)}")
            return local.main([args.task_file])
        return _cli_grid(args, rest)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def console():
    sys.exit(main())


if __name__ == "__main__":
    console()
