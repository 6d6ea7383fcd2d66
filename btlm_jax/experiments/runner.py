"""The one runner of every reproduction: ``python -m experiments.NAME`` (or
``python -m btlm_jax.experiments.runner NAME``) with the shared options.

An experiment is a config file ``configs/experiments/NAME.py`` holding

- ``get_config(arg)``: the training config of the experiment's base cell (its model and run
  settings; ``arg`` is ``scale=S``, ``smoke``, ...), so one cell of the sweep is the plain command
  ``python -m btlm_jax.main --config=configs/experiments/NAME.py:ARG --config.KEY=VALUE ...``;
- ``get_sweep(args)``: the grid, ``{"config_arg", "axes": {name: {label: overrides}}, "fixed",
  "meta_keys", "post", "post_args", "prepare", "prepare_args", "info", "extend"}`` (all but
  ``axes`` optional; ``prepare(args, out, data, **prepare_args)`` may add axes and info, e.g.
  corpora; ``extend``: ``{"axis", "key", "over", "factor", "rounds"}`` extends an LR axis where
  a group's optimum (the mean over the ``over`` axes, e.g. seeds) lies on the grid's edge:
  :func:`extend_tasks`);
- ``ANALYSIS``: the module whose ``analyze(results, info, out)`` returns (summary, figures,
  report) (``experiments/NAME.py``, also what ``notebooks/repro_NAME.ipynb`` import);
- optionally ``add_options(parser)`` for the experiment's own command-line options.

The runner prepares the data and tokenizer (shared by every cell), expands the grid into tasks,
runs them (local processes, or a SLURM array with ``--slurm``), gathers ``OUT/results.jsonl`` and
writes ``OUT/summary.json`` and ``OUT/figures/``. Finished runs are skipped, so rerunning resumes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from btlm_jax.experiments import data as exp_data
from btlm_jax.experiments.grid import Task, expand_axes, run_name
from btlm_jax.experiments.local import gather, run_local
from btlm_jax.cli.overrides import (ROOT, SweepError, check_cell, get_value, load_config,
                                    split_override_args)


def log(msg: str) -> None:
    print(msg, flush=True)


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The launch options every sweep command shares."""
    p.add_argument("--workers", type=int, default=2,
                   help="parallel local runs (default 2; 0: one at a time in this process)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (0: cores / workers)")
    g = p.add_argument_group("SLURM (instead of running locally; needs the `slurm` extra)")
    g.add_argument("--slurm", action="store_true",
                   help="submit the unfinished runs as one SLURM job array (submitit); rerun "
                   "without --slurm after the array finishes to gather results and figures")
    g.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"),
                   help="submitit executor: slurm, or local processes / this process (tests)")
    g.add_argument("--wait", action="store_true", help="wait for the array and gather")
    g.add_argument("--partition", default="")
    g.add_argument("--time", default="04:00:00", help="time limit per run (requeued past it)")
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--gpus-per-task", type=int, default=0)
    g.add_argument("--max-parallel", type=int, default=0, help="array throttle (%%N)")


def _submit(tasks: Sequence[Task], out_dir: Path, args, job_name: str, log) -> bool:
    """Submits the array; waits for it unless it went to a real SLURM queue. Returns waited?"""
    from btlm_jax.experiments import slurm

    if all(t.finished() for t in tasks):
        log("[sweep] every run is finished; gathering results")
        return True
    ex = slurm.executor(out_dir, cluster=args.cluster, job_name=job_name,
                        partition=args.partition, time_limit=args.time,
                        cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task,
                        max_parallel=args.max_parallel)
    jobs = slurm.submit(tasks, out_dir, ex)
    if not jobs:
        log("[sweep] every run is finished; gathering results")
        return True
    log(f"[sweep] submitted {len(jobs)} run(s) as job array {jobs[0].job_id.split('_')[0]} "
        f"(logs: {out_dir / 'slurm'})")
    if args.cluster == "slurm" and not args.wait:
        log("[sweep] rerun this command without --slurm when the array has finished to gather "
            "results and figures")
        return False
    for job in jobs:
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - reported; the task is retried on the next run
            log(f"[sweep] job {job.job_id} failed: {str(e).strip().splitlines()[-1]}")
    return True


def launch(tasks: Sequence[Task], out_dir: Path, args, job_name: str,
           log: Callable[[str], None] = log) -> tuple[list[dict], bool]:
    """Runs ``tasks`` as the shared launch options say. Returns (results gathered into
    ``OUT/results.jsonl``, complete?)."""
    if getattr(args, "slurm", False):
        if not _submit(tasks, Path(out_dir), args, job_name, log):
            return gather(tasks, Path(out_dir) / "results.jsonl"), False
    else:
        _, failures = run_local(tasks, workers=args.workers, threads=args.threads or None, log=log)
        for task, err in failures:
            log(f"[sweep] run {task.name} failed: {err}")
    results = gather(tasks, Path(out_dir) / "results.jsonl")
    return results, len(results) == len(tasks)


# ----------------------------------------------------------------------------------------------
# Experiments.


def load_spec(name: str):
    """The module ``configs/experiments/NAME.py``."""
    path = ROOT / "configs" / "experiments" / f"{name}.py"
    if not path.exists():
        raise SweepError(f"no experiment {name!r}: {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_experiment_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.CONFIG_FILE = f"configs/experiments/{name}.py"
    return mod


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}", description=description,
        epilog="Any --config.KEY=VALUE (as python -m btlm_jax.main takes it) is set in every run.")
    p.add_argument("--out", default=str(ROOT / "runs" / "repro" / name),
                   type=lambda x: str(Path(x).expanduser().absolute()),
                   help="output directory: runs/, results.jsonl, figures/ (default %(default)s)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="model/data scale: 1 = the 2-core CPU default; larger for real hardware")
    p.add_argument("--data", default="",
                   help="training text: comma-separated globs of .txt/.jsonl/.jsonl.zst (or "
                   "label=glob); split into train and held-out here. Default: the embedded corpus")
    p.add_argument("--smoke", action="store_true", help="a 2-3 run grid of a few steps (tests)")
    p.add_argument("--seed", type=int, default=0)
    add_launch_args(p)
    return p


def _fixed(base, data: dict, args, sweep: dict, cli: dict) -> dict[str, Any]:
    tok = exp_data.tokenizer_for(data["train"], base.model.vocab_size)
    exp_data.index_eval(data["eval"])
    return {"data.train": data["train"], "data.eval": data["eval"], "data.tokenizer": tok,
            "seed": int(args.seed), **sweep.get("fixed", {}), **cli}


def _hook(ref: str) -> Callable:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    mod, _, fn = ref.partition(":")
    return getattr(importlib.import_module(mod), fn)


def make_tasks(config: str, base, axes: dict, fixed: dict, sweep: dict, out: Path) -> list[Task]:
    """One task per grid point: ``fixed`` then the point's overrides over the base config."""
    tasks = []
    for labels, point in expand_axes(axes):
        ov = {**fixed, **point}

        def final(key: str, ov=ov) -> Any:
            return ov[key] if key in ov else get_value(base, key)

        meta = {**labels, **{m: final(k) for m, k in sweep.get("meta_keys", {}).items()}}
        name = run_name(labels)
        cost = float(final("train.steps") * (final("model.d_model") + 64) ** 2
                     * final("model.n_layers"))
        tasks.append(Task(name=name, workdir=str(out / "runs" / name), overrides=ov, meta=meta,
                          config=config, post=sweep.get("post"),
                          post_args=dict(sweep.get("post_args", {})), cost=cost))
    return tasks


def plan(spec, args, cli_overrides: dict | None = None) -> tuple[list[Task], dict]:
    """The experiment's tasks and its info (for summary.json)."""
    out = Path(args.out)
    sweep = spec.get_sweep(args)
    config = f"{spec.CONFIG_FILE}:{sweep.get('config_arg', '')}".rstrip(":")
    cli_overrides = cli_overrides or {}
    parsed = load_config(config, [f"--config.{k}={v}" for k, v in cli_overrides.items()])
    base = load_config(config)
    cli = {k: get_value(parsed, k) for k in cli_overrides}  # typed by main's parser
    swept = sorted({k for cases in sweep["axes"].values() for ov in cases.values() for k in ov}
                   & set(cli))
    if swept:
        raise SweepError(f"--config.{swept[0]}: the experiment's grid sets this key in every run")
    data = exp_data.prepare_data(args.data, out)
    fixed = _fixed(base, data, args, sweep, cli)
    axes, info = dict(sweep["axes"]), dict(sweep.get("info", {}))
    if sweep.get("prepare"):
        extra = _hook(sweep["prepare"])(args, out, data, **sweep.get("prepare_args", {}))
        axes, info = {**extra.get("axes", {}), **axes}, {**info, **extra.get("info", {})}
    tasks = make_tasks(config, base, axes, fixed, sweep, out)
    for t in tasks:  # what each run checks at start, before any is launched
        check_cell(t.name, load_config(t.config, t.overrides))
    _PLANS[id(tasks)] = (config, base, axes, fixed, sweep, out)
    info = {"experiment": spec.NAME, "data": data["name"], "scale": args.scale,
            "config": config, **info, "smoke": bool(args.smoke)}
    return tasks, info


_PLANS: dict[int, tuple] = {}


def _final_loss(r: dict) -> float:
    v = r.get("final", {}).get("eval_loss") if r.get("status") == "ok" else None
    return float(v) if v is not None and v == v else float("inf")


def extend_tasks(tasks: Sequence[Task], results: Sequence[dict], axes: dict, ext: dict,
                 make: Callable[[dict], list[Task]]) -> list[Task]:
    """New tasks for the groups whose loss-vs-LR curve (mean over the ``ext["over"]`` axes) has
    its minimum on an edge of the ``ext["axis"]`` values run so far: one more LR, a factor
    ``ext["factor"]`` beyond that edge, for every value of the ``over`` axes. ``make(axes)``
    turns a restricted grid into tasks."""
    from btlm_jax.experiments.stats import edge_extensions

    lr_axis, over = ext["axis"], set(ext.get("over", ()))
    groups = [a for a in axes if a != lr_axis and a not in over]
    by_name = {r["name"]: r for r in results}
    losses: dict[tuple, dict[float, list[float]]] = {}
    for t in tasks:
        g = tuple(t.meta[a] for a in groups)
        loss = _final_loss(by_name[t.name]) if t.name in by_name else float("nan")
        losses.setdefault(g, {}).setdefault(float(t.meta[lr_axis]), []).append(loss)
    curves = {g: {lr: (sum(v) / len(v) if all(x == x for x in v) else float("nan"))
                  for lr, v in c.items()} for g, c in losses.items()}
    # a group with a missing run (failed, or not run yet) is not extended
    curves = {g: c for g, c in curves.items() if all(v == v for v in c.values())}
    names = {t.name for t in tasks}
    new: list[Task] = []
    for g, lrs in edge_extensions(curves, float(ext.get("factor", 2.0))).items():
        sub = {}
        for a, cases in axes.items():
            if a == lr_axis:
                sub[a] = {lr: {ext["key"]: lr} for lr in lrs}
            elif a in over:
                sub[a] = cases
            else:
                sub[a] = {g[groups.index(a)]: cases[g[groups.index(a)]]}
        new.extend(t for t in make(sub) if t.name not in names)
    return new


def run_extended(tasks: list[Task], out: Path, args, name: str,
                 launch_fn: Callable | None = None) -> tuple[list[Task], list[dict], bool]:
    """Launches ``tasks``; with the sweep's ``extend`` rule, then reruns with the extra LRs
    where an optimum landed on the grid's edge, up to ``rounds`` times. Returns (all tasks,
    results, complete?)."""
    launch_fn = launch_fn or launch
    ctx = _PLANS.get(id(tasks))
    results, complete = launch_fn(tasks, out, args, job_name=name)
    if ctx is None or not ctx[4].get("extend") or not complete:
        return tasks, results, complete
    config, base, axes, fixed, sweep, out_dir = ctx
    ext = sweep["extend"]
    tasks = list(tasks)
    for rnd in range(int(ext.get("rounds", 3))):
        new = extend_tasks(tasks, results, axes, ext,
                           lambda sub: make_tasks(config, base, sub, fixed, sweep, out_dir))
        if not new:
            break
        log(f"[{name}] optimum on the LR grid's edge: round {rnd + 1} adds {len(new)} run(s) "
            f"(LRs {sorted({t.meta[ext['axis']] for t in new})})")
        tasks.extend(new)
        results, complete = launch_fn(tasks, out, args, job_name=name)
        if not complete:
            break
    return tasks, results, complete


def _analyze(spec, results: list[dict], info: dict, out: Path) -> None:
    summary, figures, report = _hook(spec.ANALYSIS + ":analyze")(results, info, out)
    (out / "summary.json").write_text(json.dumps({**info, **summary}, indent=1))
    log(report)
    log("figures: " + ", ".join(figures))


def main(name: str, argv: Sequence[str] | None = None) -> int:
    """Plans, runs, gathers and analyses experiment ``name``; the exit status."""
    spec = load_spec(name)
    p = parser(name, (spec.__doc__ or name).strip().split("\n\n")[0])
    if hasattr(spec, "add_options"):
        spec.add_options(p)
    args, rest = p.parse_known_args(argv)
    out = Path(args.out)
    try:
        tasks, info = plan(spec, args, split_override_args(rest))
        log(f"[{name}] {len(tasks)} runs ({info.get('headline', '')}); data: {info['data']}; "
            f"out: {out}")
        tasks, results, complete = run_extended(tasks, out, args, name)
    except (exp_data.ExperimentError, SweepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.slurm and not complete:
        return 0
    if results:
        _analyze(spec, results, info, out)
    if not complete:
        log(f"{len(tasks) - len(results)} of {len(tasks)} runs failed or are missing (see the "
            f"messages above); rerun the same command to retry them. Partial results are in {out}")
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m btlm_jax.experiments.runner NAME [options]")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
