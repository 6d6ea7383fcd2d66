"""How long an experiment's default grid will take here, without running it: one short probe run
per distinct model shape, timed as a sweep's worker runs it, extrapolated to every run.

    python -m experiments.estimate_time NAME [--probe-steps 30] [--workers 2] [experiment options]

Each probe is the shape's first grid cell with ``train.steps`` set to ``--probe-steps`` (its
evaluations and post-training hook as in the grid, so their cost is in the probe), run as one
single-threaded process (as ``--workers 2`` runs on 2 cores). Per run: fixed cost (compilation,
evaluations, hook) + steps x seconds per step (median of the probe's later steps). The estimate
is the sum over the grid divided by ``--workers``; extra LRs added where an optimum lands on the
grid's edge are not included (each adds one run per seed). Noisy on a shared machine: the load
average is printed with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from btlm_jax.experiments import local, recipes, runner
from btlm_jax.experiments.grid import Task
from btlm_jax.cli.overrides import get_value, load_config

SHAPE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "train.seq_len",
              "train.batch_size", "model.vocab_size")


def _shape(task: Task) -> tuple:
    cfg = load_config(task.config, task.overrides)
    return tuple(get_value(cfg, k) for k in SHAPE_KEYS), int(cfg.train.steps)


def _probe(task: Task, steps: int, root: Path) -> dict:
    ov = {**task.overrides, **recipes.length_overrides(steps, evals=1)}
    probe = dataclasses.replace(task, overrides=ov, workdir=str(root / task.name))
    t0 = time.time()
    _, failures = local.run_local([probe], workers=1, threads=1, log=lambda m: None)
    wall = time.time() - t0
    if failures:
        raise RuntimeError(f"probe {task.name} failed: {failures[0][1]}")
    metrics = [json.loads(x) for x in (Path(probe.workdir) / "metrics.jsonl").read_text()
               .splitlines() if x.strip()]
    tps = [m["tokens_per_sec"] for m in metrics if m.get("tokens_per_sec") and m["step"] > 2]
    cfg = load_config(task.config, task.overrides)
    per_step = statistics.median(cfg.train.batch_size * cfg.train.seq_len / t for t in tps)
    return {"per_step": per_step, "fixed": max(0.0, wall - steps * per_step), "wall": wall}


def estimate(name: str, argv: Sequence[str], probe_steps: int = 30, workers: int = 2,
             log=print) -> dict:
    spec = runner.load_spec(name)
    p = runner.parser(name, name)
    if hasattr(spec, "add_options"):
        spec.add_options(p)
    with tempfile.TemporaryDirectory() as tmp:
        args = p.parse_args([*argv, "--out", str(Path(tmp) / "plan")])
        tasks, info = runner.plan(spec, args)
        shapes: dict = {}
        for t in tasks:
            shape, steps = _shape(t)
            shapes.setdefault(shape, []).append((t, steps))
        total, rows = 0.0, []
        for shape, members in shapes.items():
            pr = _probe(members[0][0], probe_steps, Path(tmp) / "probe")
            secs = sum(pr["fixed"] + s * pr["per_step"] for _, s in members)
            total += secs
            rows.append({"shape": dict(zip(SHAPE_KEYS, shape)), "runs": len(members),
                         "steps": sum(s for _, s in members), **pr, "seconds": secs})
            log(f"  {dict(zip(SHAPE_KEYS, shape))}: {len(members)} runs, "
                f"{rows[-1]['steps']} steps, {pr['per_step']:.3f} s/step + {pr['fixed']:.0f} s "
                f"fixed per run -> {secs / 60:.1f} min of one core-pair worker")
    return {"experiment": name, "runs": len(tasks), "workers": workers,
            "minutes": total / workers / 60, "shapes": rows, "load": os.getloadavg()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.estimate_time",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=("d2z", "alibi_pi", "mup", "dedup"))
    p.add_argument("--probe-steps", type=int, default=30)
    p.add_argument("--workers", type=int, default=2, help="the sweep's --workers")
    args, rest = p.parse_known_args(argv)
    r = estimate(args.name, rest, args.probe_steps, args.workers)
    print(f"{r['name'] if 'name' in r else r['experiment']}: {r['runs']} runs, about "
          f"{r['minutes']:.0f} min with --workers {r['workers']} (load average now "
          f"{r['load'][0]:.1f}; LR-grid extensions not included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
