"""The README's quick-start and CLI figures, measured in one run (rerun when they change).

    python benchmarks/readme_figures.py [--out DIR] [--json FILE] [--skip quickstart,smoke]

1. Quick start: the README's first command, ``python -m btlm_jax.main
   --config=configs/btlm.py:tiny --workdir=runs/tiny``, with an empty HOME (so the embedded
   corpus and the tokenizer are built as on a fresh machine; the pip install is not timed): wall
   time, evaluation loss at each evaluation step.
2. Weight-only quantisation on that run: ``python -m btlm_jax.evaluate --quantize=none|int8|int4``
   at the training length, and the loss each format adds.
3. ``--smoke`` grid sizes: the number of runs each ``python -m experiments.NAME --smoke`` plans.

The test suite's time is not measured here (run ``pytest -q``). Prints a table and writes the
numbers with the commit and date to ``--json`` (default ``benchmarks/readme_figures.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ("d2z", "alibi_pi", "mup", "dedup")


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]


def quickstart(tmp: Path) -> dict:
    """The README's first command on a fresh cache; wall time and eval losses."""
    home, run = tmp / "home", tmp / "runs" / "tiny"
    home.mkdir(parents=True)
    cmd = [sys.executable, "-m", "btlm_jax.main", "--config=configs/btlm.py:tiny",
           f"--workdir={run}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(HOME=str(home)), capture_output=True,
                          text=True)
    seconds = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"quick start failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    evals = {r["step"]: r["eval_loss"] for r in _metrics(run) if "eval_loss" in r}
    return {"command": " ".join(cmd[1:]), "seconds": round(seconds, 1), "run": str(run),
            "eval_loss": evals, "last_line": proc.stdout.strip().splitlines()[-1]}


def quantization(run: str) -> dict:
    """Evaluation loss at the training length per weight format, and the increase."""
    out = {}
    for q in ("none", "int8", "int4"):
        cmd = [sys.executable, "-m", "btlm_jax.evaluate", f"--workdir={run}", "--lengths=256",
               "--position_interpolation=off", f"--quantize={q}", "--plots=false", "--json"]
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"evaluate --quantize={q} failed:\n{proc.stderr[-3000:]}")
        out[q] = json.loads(proc.stdout.strip().splitlines()[-1])["results"][0]["loss"]
    return {"loss": out, "increase": {q: out[q] - out["none"] for q in ("int8", "int4")},
            "tokens": "eval.num_batches x eval.batch_size sequences of 256 (tiny: 4 x 8)"}


def smoke_grids(tmp: Path) -> dict:
    """Runs planned by ``python -m experiments.NAME --smoke`` (the runner's own plan)."""
    sys.path.insert(0, str(ROOT))
    from btlm_jax.experiments import runner

    counts = {}
    for name in EXPERIMENTS:
        spec = runner.load_spec(name)
        p = runner.parser(name, name)
        if hasattr(spec, "add_options"):
            spec.add_options(p)
        args = p.parse_args(["--smoke", "--out", str(tmp / "smoke" / name)])
        tasks, _ = runner.plan(spec, args)
        counts[name] = len(tasks)
    return counts


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def table(res: dict) -> str:
    rows = ["| figure | value |", "|---|---|"]
    q = res.get("quickstart")
    if q:
        ev = q["eval_loss"]
        steps = sorted(ev, key=int)
        rows.append(f"| quick start: wall time (fresh cache, no install) | {q['seconds'] / 60:.1f}"
                    " min |")
        rows.append("| quick start: eval loss by step | " + ", ".join(
            f"{s}: {ev[s]:.2f}" for s in steps) + " |")
    z = res.get("quantization")
    if z:
        rows.append("| tiny eval loss: none / int8 / int4 | " + " / ".join(
            f"{z['loss'][k]:.4f}" for k in ("none", "int8", "int4")) + " |")
        rows.append(f"| loss added: int8, int4 | {z['increase']['int8']:+.4f}, "
                    f"{z['increase']['int4']:+.4f} |")
    s = res.get("smoke")
    if s:
        rows.append("| --smoke runs | " + ", ".join(f"{k} {v}" for k, v in s.items()) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "readme_figures.json"))
    p.add_argument("--skip", default="", help="comma-separated: quickstart, smoke")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    tmp = Path(args.out or tempfile.mkdtemp(prefix="readme_figures_"))
    res = {"commit": _commit(), "date": datetime.date.today().isoformat(),
           "cpus": os.cpu_count(), "command": "python benchmarks/readme_figures.py"}
    if "quickstart" not in skip:
        res["quickstart"] = quickstart(tmp)
        res["quantization"] = quantization(res["quickstart"]["run"])
    if "smoke" not in skip:
        res["smoke"] = smoke_grids(tmp)
    print(table(res))
    print(f"commit {res['commit']}, {res['date']}, {res['cpus']} CPUs")
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
