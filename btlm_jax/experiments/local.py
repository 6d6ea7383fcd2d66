"""Running tasks: one in this process (:func:`run_task`), many in local processes
(:func:`run_local`).

Finishing a task writes ``WORKDIR/result.json``; a task whose result exists is skipped, so
rerunning a sweep resumes it (an interrupted run resumes from its checkpoint). A diverged run
(non-finite loss) is a result with ``status: "diverged"``; any other error leaves no result (the
task is retried next time) and is reported with the path of the task's log.

``python -m btlm_jax.experiments.local TASK.json`` runs one task (what each local process does).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from btlm_jax.experiments.grid import LOG_FILE, TASK_FILE, Task, check_unique
from btlm_jax.cli.overrides import ROOT, SweepError, load_config


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _train(task: Task, cfg) -> tuple[str, str | None, dict]:
    from btlm_jax.train.loop import train

    try:
        out = train(cfg, task.workdir)
    except FloatingPointError as e:  # the loop's non-finite-loss error: a diverged run
        return "diverged", str(e), {}
    if not out.get("complete"):
        raise RuntimeError(f"{task.name}: training stopped at step {out.get('step')} "
                           f"(preempted={out.get('preempted')}); rerun to resume")
    return "ok", None, out


def _result(task: Task, cfg, status: str) -> dict:
    from btlm_jax.config import parse_phases
    from btlm_jax.describe import describe

    metrics = _metrics(Path(task.workdir))
    evals = [m for m in metrics if "eval_loss" in m]
    phases = parse_phases(cfg)
    return {
        "name": task.name, "status": status, "meta": task.meta, "config": task.config,
        "overrides": task.overrides, "workdir": str(task.workdir),
        "num_params": int(describe(cfg)["num_params"]), "steps": int(sum(p[2] for p in phases)),
        "tokens": int(sum(s * b * n for s, b, n in phases)),
        "final": {k: v for k, v in (evals[-1] if evals else {}).items()
                  if k == "step" or k == "loss" or k.startswith("eval_loss")},
        "train_loss": [[m["step"], m["loss"]] for m in metrics if "loss" in m],
        "eval_curve": [[m["step"], m["eval_loss"]] for m in evals],
    }


def _post(task: Task, cfg, out: dict) -> Any:
    if str(ROOT) not in sys.path:  # hooks may live in the repository's experiments/
        sys.path.insert(0, str(ROOT))
    mod_name, _, fn_name = task.post.partition(":")
    fn: Callable = getattr(importlib.import_module(mod_name), fn_name)
    return fn(Path(task.workdir), cfg, out, **task.post_args)


def run_task(task: Task) -> dict:
    """Trains ``task`` as ``python -m btlm_jax.main`` would (same config parsing; resuming if it
    was interrupted), runs its post hook, writes result.json and returns the result. A finished
    task is not rerun: its stored result is returned."""
    if task.finished():
        return json.loads(task.result_path.read_text())
    workdir = Path(task.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / TASK_FILE, task.to_json())
    cfg = load_config(task.config, task.overrides)
    t0 = time.time()
    status, error, out = _train(task, cfg)
    result = _result(task, cfg, status)
    result["train_seconds"] = time.time() - t0
    if error:
        result["error"] = error
    if task.post and status == "ok":
        result["post"] = _post(task, cfg, out)
    result["seconds"] = time.time() - t0
    write_json(task.result_path, result)
    return result


def child_env(threads: int) -> dict[str, str]:
    """Environment for a task process: the repository on PYTHONPATH; with ``threads == 1`` XLA's
    CPU backend single-threaded, so N processes share N cores without oversubscription."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if threads == 1:
        flags = env.get("XLA_FLAGS", "")
        if "intra_op_parallelism_threads" not in flags:
            env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1").strip()
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Runs of one shape that differ only in values passed at run time (the seed) compile the
    # same programs: JAX's persistent compilation cache lets later runs skip the compile.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(_compile_cache()))
    return env


def _compile_cache() -> Path:
    from btlm_jax.data import sample

    return Path(sample.default_cache_dir(None)) / "jax_compile_cache"


def _run_subprocess(task: Task, threads: int) -> tuple[Task, dict | None, str | None, float]:
    workdir = Path(task.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    task_file = workdir / TASK_FILE
    write_json(task_file, task.to_json())
    t0 = time.time()
    with open(workdir / LOG_FILE, "ab") as log_f:
        proc = subprocess.run([sys.executable, "-m", "btlm_jax.experiments.local", str(task_file)],
                              cwd=str(ROOT), env=child_env(threads), stdout=log_f,
                              stderr=subprocess.STDOUT)
    dt = time.time() - t0
    if proc.returncode == 0 and task.finished():
        return task, json.loads(task.result_path.read_text()), None, dt
    try:
        tail = "\n".join((workdir / LOG_FILE).read_text(errors="replace").splitlines()[-15:])
    except OSError:
        tail = ""
    return task, None, f"exit code {proc.returncode}; log: {workdir / LOG_FILE}\n{tail}", dt


def summary_line(result: dict) -> str:
    f = result.get("final", {})
    if result.get("status") == "diverged":
        return "diverged"
    if "eval_loss" in f:
        return f"eval_loss {f['eval_loss']:.4f}"
    return result.get("status", "?")


def _run_one_in_process(task: Task) -> tuple[Task, dict | None, str | None, float]:
    t0 = time.time()
    try:
        return task, run_task(task), None, time.time() - t0
    except Exception as e:  # noqa: BLE001 - reported, like a failed subprocess
        return task, None, f"{type(e).__name__}: {e}", time.time() - t0


def _outcomes(pending: Sequence[Task], workers: int, threads: int):
    """(task, result, error, seconds) as the tasks finish: in this process's main thread one
    after another (``workers == 0``; the loop's signal handlers need the main thread), else in
    ``workers`` subprocesses."""
    if workers == 0:
        yield from (_run_one_in_process(t) for t in pending)
        return
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_run_subprocess, t, threads) for t in pending]
        yield from (f.result() for f in cf.as_completed(futures))


def run_local(tasks: Sequence[Task], workers: int = 1, threads: int | None = None,
              log: Callable[[str], None] = print) -> tuple[list[dict], list[tuple[Task, str]]]:
    """Runs the unfinished tasks, ``workers`` processes at a time (longest ``cost`` first; 0: one
    at a time in this process). ``threads`` per process defaults to cores // workers. Returns
    (results of all finished tasks in task order, [(task, error)])."""
    check_unique(tasks)
    if workers < 0:
        raise SweepError(f"--workers={workers}: must be >= 0 (0: one at a time in this process)")
    pending = sorted((t for t in tasks if not t.finished()), key=lambda t: -t.cost)
    done = len(tasks) - len(pending)
    if done:
        log(f"[sweep] {done}/{len(tasks)} runs already finished (skipped)")
    threads = threads or max(1, (os.cpu_count() or 1) // max(workers, 1))
    failures: list[tuple[Task, str]] = []
    t_start = time.time()
    for task, result, err, dt in _outcomes(pending, workers, threads):
        done += 1
        if err is None:
            log(f"[sweep] {done}/{len(tasks)} {task.name}: {summary_line(result)} ({dt:.0f} s)")
        else:
            failures.append((task, err))
            log(f"[sweep] {done}/{len(tasks)} {task.name}: FAILED ({err.splitlines()[0]})")
    if pending:
        log(f"[sweep] {len(pending)} run(s) in {time.time() - t_start:.0f} s with "
            f"{workers} worker(s)")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print("usage: python -m btlm_jax.experiments.local TASK.json", file=sys.stderr)
        return 2
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        task = Task.from_json(json.loads(Path(argv[0]).read_text()))
        result = run_task(task)
    except (SweepError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[sweep] {task.name}: {summary_line(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
