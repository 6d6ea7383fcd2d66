"""Sweeps: a grid of config overrides, run locally (N processes) or as a SLURM array.

A *task* is one training run: a config preset plus dotted overrides (``optim.peak_lr``...), a
run directory, free-form ``meta`` (the grid values, for the results table) and optionally a
``post`` hook (``"module:function"``) run in the same process after training (e.g. evaluation at
several lengths). Finishing a task writes ``WORKDIR/result.json``; a task whose result exists is
skipped, so rerunning a sweep resumes it (an interrupted run resumes from its checkpoint).

Library use (the experiments in ``experiments/``)::

    tasks = [Task(name, workdir, overrides={...}, meta={...}) for ...]
    results, failures = run_local(tasks, workers=2)      # or write_slurm(tasks, out_dir)
    gather(tasks, out_dir / "results.jsonl")

Command line (any grid over ``configs/btlm.py`` presets)::

    python -m launch.sweep grid --out runs/lr --grid optim.peak_lr=1e-3,3e-3,1e-2 \\
        --grid optim.schedule=d2z,constant --set train.steps=100 --workers 2 [--slurm]
    python -m launch.sweep task --tasks runs/lr/tasks.jsonl --index 3    # one task (SLURM)

A diverged run (non-finite loss) is a result, not a failure: ``status`` is ``"diverged"``.
Any other error leaves no result (the task is retried on the next run) and is reported with the
path of the task's log.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib
import importlib.util
import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILE = "result.json"
TASK_FILE = "task.json"
LOG_FILE = "run.log"


class SweepError(ValueError):
    """A bad grid, override or task file; the message names the culprit."""


# ----------------------------------------------------------------------------------------------
# Grids and tasks.


def expand_grid(axes: dict[str, Sequence[Any]], base: dict[str, Any] | None = None) -> list[dict]:
    """The Cartesian product of ``axes`` (in the given key order, last key fastest), each point
    merged over ``base``. An empty axis is an error (it would silently produce no runs)."""
    base = dict(base or {})
    for k, vals in axes.items():
        if isinstance(vals, (str, bytes)) or not isinstance(vals, Iterable):
            raise SweepError(f"grid axis {k!r}: expected a list of values, got {vals!r}")
        if len(list(vals)) == 0:
            raise SweepError(f"grid axis {k!r} has no values")
    keys = list(axes)
    return [{**base, **dict(zip(keys, combo))}
            for combo in itertools.product(*(list(axes[k]) for k in keys))]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def run_name(values: dict[str, Any]) -> str:
    """A readable, filesystem-safe name from grid values: ``peak_lr=0.003,schedule=d2z``."""
    parts = []
    for k, v in values.items():
        short = k.split(".")[-1]
        parts.append(f"{short}={_fmt(v)}")
    name = ",".join(parts) or "run"
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)


@dataclasses.dataclass
class Task:
    name: str
    workdir: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    preset: str = "tiny"
    config_file: str = "configs/btlm.py"  # relative to the repository root, or absolute
    post: str | None = None  # "module:function(workdir, cfg, trainer_result, **post_args)"
    post_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    cost: float = 1.0  # relative run time, for scheduling the longest runs first

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Task":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise SweepError(f"task has unknown field(s) {', '.join(unknown)}")
        if "name" not in d or "workdir" not in d:
            raise SweepError(f"task {d!r} needs at least 'name' and 'workdir'")
        return cls(**d)

    @property
    def result_path(self) -> Path:
        return Path(self.workdir) / RESULT_FILE

    def finished(self) -> bool:
        return self.result_path.exists()


def check_unique(tasks: Sequence[Task]) -> None:
    seen: dict[str, str] = {}
    for t in tasks:
        wd = str(Path(t.workdir).absolute())
        if wd in seen:
            raise SweepError(f"tasks {seen[wd]!r} and {t.name!r} share the workdir {wd}")
        seen[wd] = t.name


# ----------------------------------------------------------------------------------------------
# Configs.


def load_preset(config_file: str, preset: str):
    """``get_config(preset)`` of a config file (path relative to the repository root)."""
    path = Path(config_file)
    if not path.is_absolute():
        path = ROOT / path
    if not path.exists():
        raise SweepError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_sweep_cfg_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(preset)


def apply_overrides(cfg, overrides: dict[str, Any]):
    """Sets dotted keys on a (locked) ConfigDict; an unknown key or a wrong type raises SweepError
    naming the key. Ints are accepted for float keys and lists for tuple keys."""
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if p not in node:
                raise SweepError(f"override {key}: {'.'.join(parts[:i + 1])} is not a config key")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise SweepError(f"override {key}: not a config key (valid here: {', '.join(sorted(node.keys()))})")
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise SweepError(f"override {key}={value!r}: {e}") from None
    return cfg


def parse_value(text: str, like: Any) -> Any:
    """Parses a command-line value to the type of the default ``like``."""
    if isinstance(like, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise SweepError(f"{text!r} is not a boolean")
    try:
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
    except ValueError:
        raise SweepError(f"{text!r} is not a {type(like).__name__}") from None
    if isinstance(like, tuple):
        return tuple(x for x in text.split(";") if x)
    return text


# ----------------------------------------------------------------------------------------------
# Running one task (in this process).


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def run_task(task: Task) -> dict:
    """Trains ``task`` (resuming if it was interrupted), runs its post hook, writes result.json.

    Returns the result. A finished task is not rerun: its stored result is returned."""
    if task.finished():
        return json.loads(task.result_path.read_text())
    from btlm_jax.config import parse_phases
    from btlm_jax.train.loop import Trainer

    workdir = Path(task.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_json(workdir / TASK_FILE, task.to_json())
    cfg = apply_overrides(load_preset(task.config_file, task.preset), task.overrides)
    t0 = time.time()
    status, error = "ok", None
    trainer = Trainer(cfg, str(workdir))
    try:
        out = trainer.run()
    except FloatingPointError as e:  # the loop's non-finite-loss error: a diverged run
        status, error, out = "diverged", str(e), {}
    if status == "ok" and not out.get("complete"):
        raise RuntimeError(f"{task.name}: training stopped at step {out.get('step')} "
                           f"(preempted={out.get('preempted')}); rerun to resume")
    metrics = _metrics(workdir)
    evals = [m for m in metrics if "eval_loss" in m]
    phases = parse_phases(trainer.cfg)
    result = {
        "name": task.name, "status": status, "meta": task.meta, "overrides": task.overrides,
        "workdir": str(workdir), "num_params": int(trainer.num_params),
        "steps": int(trainer.total_steps), "tokens": int(sum(s * b * n for s, b, n in phases)),
        "final": {k: v for k, v in (evals[-1] if evals else {}).items()
                  if k == "step" or k == "loss" or k.startswith("eval_loss")},
        "train_loss": [[m["step"], m["loss"]] for m in metrics if "loss" in m],
        "eval_curve": [[m["step"], m["eval_loss"]] for m in evals],
        "train_seconds": time.time() - t0,
    }
    if error:
        result["error"] = error
    if task.post and status == "ok":
        mod_name, _, fn_name = task.post.partition(":")
        fn: Callable = getattr(importlib.import_module(mod_name), fn_name)
        result["post"] = fn(workdir, trainer.cfg, out, **task.post_args)
    result["seconds"] = time.time() - t0
    _write_json(task.result_path, result)
    return result


# ----------------------------------------------------------------------------------------------
# Running many tasks.


def child_env(threads: int) -> dict[str, str]:
    """Environment for a task process: the repository on PYTHONPATH; with ``threads == 1`` XLA's
    CPU backend single-threaded, so N processes share N cores without oversubscription."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if threads == 1:
        flags = env.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1").strip()
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _run_subprocess(task: Task, threads: int) -> tuple[Task, dict | None, str | None, float]:
    workdir = Path(task.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task_file = workdir / TASK_FILE
    _write_json(task_file, task.to_json())
    t0 = time.time()
    with open(workdir / LOG_FILE, "ab") as log_f:
        proc = subprocess.run(
            [sys.executable, "-m", "launch.sweep", "task", "--task-file", str(task_file)],
            cwd=str(ROOT), env=child_env(threads), stdout=log_f, stderr=subprocess.STDOUT)
    dt = time.time() - t0
    if proc.returncode == 0 and task.finished():
        return task, json.loads(task.result_path.read_text()), None, dt
    tail = ""
    try:
        tail = "\n".join((workdir / LOG_FILE).read_text(errors="replace").splitlines()[-15:])
    except OSError:
        pass
    return task, None, (f"exit code {proc.returncode}; log: {workdir / LOG_FILE}\n{tail}"), dt


def _summary(result: dict) -> str:
    f = result.get("final", {})
    if result.get("status") == "diverged":
        return "diverged"
    if "eval_loss" in f:
        return f"eval_loss {f['eval_loss']:.4f}"
    return result.get("status", "?")


def run_local(tasks: Sequence[Task], workers: int = 1, threads: int | None = None,
              log: Callable[[str], None] = print) -> tuple[list[dict], list[tuple[Task, str]]]:
    """Runs the unfinished tasks, ``workers`` processes at a time (longest ``cost`` first).

    ``threads`` per process defaults to cores // workers (1 when several workers share a small
    machine). Returns (results of all finished tasks in task order, [(task, error)])."""
    check_unique(tasks)
    if workers < 0:
        raise SweepError(f"--workers={workers}: must be >= 0 (0: one at a time in this process)")
    if workers == 0:
        return _run_in_process(tasks, log)
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // workers)
    pending = sorted((t for t in tasks if not t.finished()), key=lambda t: -t.cost)
    done = len(tasks) - len(pending)
    if done:
        log(f"[sweep] {done}/{len(tasks)} runs already finished (skipped)")
    failures: list[tuple[Task, str]] = []
    t_start = time.time()
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_subprocess, t, threads) for t in pending]
        for fut in cf.as_completed(futures):
            task, result, err, dt = fut.result()
            done += 1
            if err is None:
                log(f"[sweep] {done}/{len(tasks)} {task.name}: {_summary(result)} ({dt:.0f} s)")
            else:
                failures.append((task, err))
                log(f"[sweep] {done}/{len(tasks)} {task.name}: FAILED ({err.splitlines()[0]})")
    if pending:
        log(f"[sweep] {len(pending)} run(s) in {time.time() - t_start:.0f} s with {workers} "
            f"worker(s)")
    return load_results(tasks), failures


def _run_in_process(tasks: Sequence[Task], log) -> tuple[list[dict], list[tuple[Task, str]]]:
    """Runs the unfinished tasks one after another in this process (tests, debugging)."""
    failures = []
    for i, task in enumerate(tasks, 1):
        if task.finished():
            continue
        t0 = time.time()
        try:
            result = run_task(task)
        except Exception as e:  # noqa: BLE001 - reported, like a failed subprocess
            failures.append((task, f"{type(e).__name__}: {e}"))
            log(f"[sweep] {i}/{len(tasks)} {task.name}: FAILED ({type(e).__name__}: {e})")
            continue
        log(f"[sweep] {i}/{len(tasks)} {task.name}: {_summary(result)} ({time.time() - t0:.0f} s)")
    return load_results(tasks), failures


def load_results(tasks: Sequence[Task]) -> list[dict]:
    return [json.loads(t.result_path.read_text()) for t in tasks if t.finished()]


def gather(tasks: Sequence[Task], path: str | Path) -> list[dict]:
    """Writes the results of the finished tasks (task order) to a JSONL file; returns them."""
    results = load_results(tasks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in results))
    os.replace(tmp, path)
    return results


def write_tasks(tasks: Sequence[Task], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(t.to_json()) + "\n" for t in tasks))
    return path


def read_tasks(path: str | Path) -> list[Task]:
    path = Path(path)
    if not path.exists():
        raise SweepError(f"task list {path} does not exist")
    out = []
    for i, ln in enumerate(path.read_text().splitlines(), 1):
        if ln.strip():
            try:
                out.append(Task.from_json(json.loads(ln)))
            except json.JSONDecodeError as e:
                raise SweepError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return out


def _ranges(indices: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (SLURM's --array syntax)."""
    out, start, prev = [], None, None
    for i in sorted(indices):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
    return ",".join(out)


def write_slurm(tasks: Sequence[Task], out_dir: str | Path, *, job_name: str = "sweep",
                partition: str = "", time_limit: str = "04:00:00", cpus_per_task: int = 8,
                gpus_per_task: int = 0, mem: str = "", max_parallel: int = 0,
                python: str = "", setup: Sequence[str] = ()) -> Path | None:
    """Writes ``OUT/tasks.jsonl`` and ``OUT/sweep.sbatch``: a SLURM job array with one element per
    unfinished task (``sbatch OUT/sweep.sbatch``). Returns the script path (None: all done).

    After the array finishes, rerun the experiment command without ``--slurm``: every run is
    then skipped and the results and figures are gathered."""
    check_unique(tasks)
    out_dir = Path(out_dir).absolute()
    tasks_path = write_tasks(tasks, out_dir / "tasks.jsonl")
    pending = [i for i, t in enumerate(tasks) if not t.finished()]
    if not pending:
        return None
    array = _ranges(pending) + (f"%{max_parallel}" if max_parallel > 0 else "")
    (out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={out_dir / 'slurm'}/%A_%a.out",
        f"#SBATCH --cpus-per-task={cpus_per_task}",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --ntasks=1",
    ]
    if gpus_per_task:
        lines.append(f"#SBATCH --gpus-per-task={gpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if mem:
        lines.append(f"#SBATCH --mem={mem}")
    lines += [
        "# SIGTERM ahead of the time limit: the run saves a checkpoint; resubmit to resume.",
        "#SBATCH --signal=TERM@120",
        "set -euo pipefail",
        *setup,
        f"cd {ROOT}",
        f'export PYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"',
        f"exec {python or sys.executable} -m launch.sweep task --tasks {tasks_path} "
        "--index ${SLURM_ARRAY_TASK_ID}",
        "",
    ]
    script = out_dir / "sweep.sbatch"
    script.write_text("\n".join(lines))
    script.chmod(0o755)
    return script


def add_launch_args(p: argparse.ArgumentParser) -> None:
    """The launch options every experiment command shares."""
    p.add_argument("--workers", type=int, default=2,
                   help="parallel local runs (default 2; 0: one at a time in this process)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads per run (0: cores / workers)")
    g = p.add_argument_group("SLURM (instead of running locally)")
    g.add_argument("--slurm", action="store_true",
                   help="write OUT/sweep.sbatch + OUT/tasks.jsonl instead of running; rerun "
                   "without --slurm after the array finishes to gather results and figures")
    g.add_argument("--partition", default="")
    g.add_argument("--time", default="04:00:00", help="time limit per run")
    g.add_argument("--cpus-per-task", type=int, default=8)
    g.add_argument("--gpus-per-task", type=int, default=0)
    g.add_argument("--max-parallel", type=int, default=0, help="array throttle (%%N)")


def launch(tasks: Sequence[Task], out_dir: Path, args, job_name: str,
           log: Callable[[str], None] = print) -> tuple[list[dict], bool]:
    """Runs ``tasks`` as the shared launch options say. Returns (results gathered into
    ``OUT/results.jsonl``, complete?). With ``--slurm`` it only writes the array script."""
    if getattr(args, "slurm", False):
        script = write_slurm(tasks, out_dir, job_name=job_name, partition=args.partition,
                             time_limit=args.time, cpus_per_task=args.cpus_per_task,
                             gpus_per_task=args.gpus_per_task, max_parallel=args.max_parallel)
        if script is None:
            log("[sweep] every run is finished; gathering results")
        else:
            n = sum(not t.finished() for t in tasks)
            log(f"[sweep] wrote {script} ({n} array task(s)); submit with `sbatch {script}`, then "
                "rerun this command without --slurm to gather results and figures")
            return gather(tasks, out_dir / "results.jsonl"), False
    else:
        _, failures = run_local(tasks, workers=args.workers, threads=args.threads or None, log=log)
        for task, err in failures:
            log(f"[sweep] run {task.name} failed: {err}")
    results = gather(tasks, out_dir / "results.jsonl")
    return results, len(results) == len(tasks)


# ----------------------------------------------------------------------------------------------
# Command line.


def _cli_grid(args) -> int:
    out = Path(args.out)
    cfg = load_preset(args.config, args.preset)

    def typed(key: str, text: str):
        node = cfg
        for p in key.split("."):
            if p not in node:
                raise SweepError(f"--grid/--set {key}: not a config key")
            node = node[p]
        return parse_value(text, node)

    base = {}
    for s in args.set:
        k, eq, v = s.partition("=")
        if not eq:
            raise SweepError(f"--set {s!r}: expected KEY=VALUE")
        base[k] = typed(k, v)
    axes = {}
    for g in args.grid:
        k, eq, v = g.partition("=")
        if not eq or not v:
            raise SweepError(f"--grid {g!r}: expected KEY=V1,V2,...")
        axes[k] = [typed(k, x) for x in v.split(",")]
    points = expand_grid(axes)
    tasks = []
    for p in points:
        name = run_name(p)
        tasks.append(Task(name=name, workdir=str(out / "runs" / name), overrides={**base, **p},
                          meta=p, preset=args.preset, config_file=args.config))
    print(f"[sweep] {len(tasks)} run(s) in {out}")
    results, complete = launch(tasks, out, args, job_name=out.name or "sweep")
    for r in results:
        print(f"  {r['name']}: {_summary(r)}")
    return 0 if complete or args.slurm else 1


def _cli_task(args) -> int:
    if args.task_file:
        task = Task.from_json(json.loads(Path(args.task_file).read_text()))
    else:
        if args.tasks is None or args.index is None:
            raise SweepError("task: give --task-file, or --tasks and --index")
        tasks = read_tasks(args.tasks)
        if not 0 <= args.index < len(tasks):
            raise SweepError(f"--index={args.index}: {args.tasks} has {len(tasks)} tasks")
        task = tasks[args.index]
    if task.finished():
        print(f"[sweep] {task.name}: already finished ({task.result_path})")
        return 0
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    result = run_task(task)
    print(f"[sweep] {task.name}: {_summary(result)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("grid", help="run a grid of overrides of a config preset")
    g.add_argument("--out", required=True, help="sweep directory (runs/, results.jsonl)")
    g.add_argument("--config", default="configs/btlm.py")
    g.add_argument("--preset", default="tiny")
    g.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_launch_args(g)
    t = sub.add_parser("task", help="run one task (what each local process / array element does)")
    t.add_argument("--task-file")
    t.add_argument("--tasks")
    t.add_argument("--index", type=int)
    args = p.parse_args(argv)
    try:
        return _cli_grid(args) if args.cmd == "grid" else _cli_task(args)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
