"""Re-execute the reproduction notebooks in place on the committed results.

    python -m experiments.execute_notebooks [d2z alibi_pi mup dedup] [--results DIR]

Each ``notebooks/repro_<name>.ipynb`` runs with ``BTLM_REPRO_DIR`` set to
``experiments/results/<name>`` (or ``DIR/<name>`` with ``--results``; e.g. ``--results runs/repro``
for fresh local runs), so the saved outputs name the result set they were computed from; the
figures go to ``notebooks/figures/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("d2z", "alibi_pi", "mup", "dedup")


def execute(name: str, results: Path, timeout: int = 600) -> float:
    import nbclient
    import nbformat

    path = ROOT / "notebooks" / f"repro_{name}.ipynb"
    src = results / name
    if not (src / "results.jsonl").exists():
        raise SystemExit(f"error: {src}/results.jsonl not found: run python -m experiments.{name}"
                         " first or point --results at its output's parent")
    os.environ["BTLM_REPRO_DIR"] = str(src)
    nb = nbformat.read(path, as_version=4)
    t0 = time.time()
    nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    nbformat.write(nb, path)
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.execute_notebooks",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", choices=NAMES, default=["d2z", "alibi_pi", "mup"])
    p.add_argument("--results", default=str(ROOT / "experiments" / "results"),
                   help="directory holding one result set per experiment name")
    args = p.parse_args(argv)
    for name in args.names:
        dt = execute(name, Path(args.results).resolve())
        print(f"notebooks/repro_{name}.ipynb executed on {Path(args.results) / name} "
              f"({dt:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
