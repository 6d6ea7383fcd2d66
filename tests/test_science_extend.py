"""The LR-grid auto-extension of the sweeps: a fake loss whose optimum lies beyond the grid's
edge makes the runner rerun with the extra LRs until the optimum is interior."""

import math
from pathlib import Path

from btlm_jax.experiments import grid, runner, stats


def _fake_launch(opt_lr: dict, launched: list):
    """Stands in for the runner's launch: every task "trains" to a loss that is a parabola in
    log2(LR) with its minimum at ``opt_lr[schedule]`` (plus a per-seed offset)."""

    def launch(tasks, out, args, job_name):
        launched.append([t.name for t in tasks])
        res = []
        for t in tasks:
            m = t.meta
            loss = (math.log2(m["peak_lr"]) - math.log2(opt_lr[m["schedule"]])) ** 2 \
                + 0.01 * m["seed"]
            res.append({"name": t.name, "status": "ok", "meta": m,
                        "final": {"eval_loss": 3.0 + loss}})
        return res, True

    return launch


def test_an_optimum_beyond_the_grid_edge_is_reached_by_extension(tmp_path):
    axes = {"schedule": {s: {"optim.schedule": s} for s in ("d2z", "wsd")},
            "peak_lr": grid.axis("optim.peak_lr", [1e-3, 2e-3, 4e-3]),
            "seed": grid.axis("seed", [0, 1])}
    sweep = {"axes": axes, "extend": {"axis": "peak_lr", "key": "optim.peak_lr",
                                      "over": ["seed"], "factor": 2.0, "rounds": 5}}
    base = runner.load_config("configs/btlm.py:tiny")
    tasks = runner.make_tasks("configs/btlm.py:tiny", base, axes, {}, sweep, Path(tmp_path))
    runner._PLANS[id(tasks)] = ("configs/btlm.py:tiny", base, axes, {}, sweep, Path(tmp_path))
    launched = []
    # d2z's optimum is 2 doublings above the grid, wsd's inside it
    opt = {"d2z": 1.6e-2, "wsd": 2e-3}
    all_tasks, results, complete = runner.run_extended(tasks, tmp_path, None, "t",
                                                       launch_fn=_fake_launch(opt, launched))
    assert complete
    lrs = {s: sorted({t.meta["peak_lr"] for t in all_tasks if t.meta["schedule"] == s})
           for s in opt}
    # brute force: extend by doubling until the largest LR is beyond the optimum
    want, top = [1e-3, 2e-3, 4e-3], 4e-3
    while top <= opt["d2z"] * (1 + 1e-9):
        top *= 2
        want.append(top)
    assert lrs["d2z"] == [float(f"{x:.6g}") for x in want]
    assert lrs["wsd"] == [1e-3, 2e-3, 4e-3]
    # every added LR is run for every seed; rounds: the grid, then one per added LR
    assert sum(1 for t in all_tasks if t.meta["schedule"] == "d2z") == 2 * len(want)
    assert len(launched) == 1 + (len(want) - 3)
    best = stats.curve_optimum(
        lrs["d2z"], [min(r["final"]["eval_loss"] for r in results
                         if r["meta"]["schedule"] == "d2z" and r["meta"]["peak_lr"] == lr
                         and r["meta"]["seed"] == 0) for lr in lrs["d2z"]])
    assert best["at_edge"] is None and abs(best["log2_fit"] - math.log2(1.6e-2)) < 1e-6


def test_a_low_edge_optimum_extends_downward_a_diverged_top_not_upward():
    curves = {("d2z",): {1e-3: 1.0, 2e-3: 2.0}, ("wsd",): {1e-3: 2.0, 2e-3: 1.0, 4e-3: 3.0},
              ("cos",): {1e-3: 3.0, 2e-3: float("inf")}}
    # cos: its only finite point is the low edge (the higher LR diverged)
    assert stats.edge_extensions(curves) == {("d2z",): [5e-4], ("cos",): [5e-4]}
    # a diverged top LR is not extended upward
    assert stats.edge_extensions({("x",): {1e-3: 3.0, 2e-3: 2.0, 4e-3: float("inf")}}) == {}
    assert stats.edge_extensions({("x",): {1e-3: 3.0, 2e-3: 2.0}}) == {("x",): [4e-3]}
