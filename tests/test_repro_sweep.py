"""launch/sweep.py: grid expansion, names, overrides, skipping finished runs, SLURM emission."""

import json
import subprocess
import sys

import pytest

from launch import sweep


def test_expand_grid_is_the_cartesian_product_in_key_order():
    pts = sweep.expand_grid({"optim.schedule": ["d2z", "constant"], "optim.peak_lr": [1e-3, 1e-2]},
                            base={"train.steps": 5})
    assert pts == [
        {"train.steps": 5, "optim.schedule": "d2z", "optim.peak_lr": 1e-3},
        {"train.steps": 5, "optim.schedule": "d2z", "optim.peak_lr": 1e-2},
        {"train.steps": 5, "optim.schedule": "constant", "optim.peak_lr": 1e-3},
        {"train.steps": 5, "optim.schedule": "constant", "optim.peak_lr": 1e-2},
    ]
    with pytest.raises(sweep.SweepError, match="optim.peak_lr"):
        sweep.expand_grid({"optim.peak_lr": []})
    with pytest.raises(sweep.SweepError, match="list of values"):
        sweep.expand_grid({"optim.schedule": "d2z"})


def test_run_names_are_readable_unique_and_filesystem_safe():
    pts = sweep.expand_grid({"optim.schedule": ["d2z", "wsd"], "optim.peak_lr": [0.003, 0.0125]})
    names = [sweep.run_name(p) for p in pts]
    assert names[0] == "schedule=d2z,peak_lr=0.003"
    assert len(set(names)) == 4 and all("/" not in n and " " not in n for n in names)
    assert sweep.run_name({"data.train": "a/b c"}) == "train=a_b_c"


def test_overrides_set_typed_values_and_name_bad_keys():
    cfg = sweep.load_preset("configs/btlm.py", "tiny")
    sweep.apply_overrides(cfg, {"optim.peak_lr": 1, "train.steps": 7, "model.mup.enabled": False})
    assert cfg.optim.peak_lr == 1.0 and isinstance(cfg.optim.peak_lr, float)
    assert cfg.train.steps == 7 and cfg.model.mup.enabled is False
    with pytest.raises(sweep.SweepError, match="optim.peak_rl"):
        sweep.apply_overrides(cfg, {"optim.peak_rl": 1e-3})
    with pytest.raises(sweep.SweepError, match="optimx"):
        sweep.apply_overrides(cfg, {"optimx.peak_lr": 1e-3})
    with pytest.raises(sweep.SweepError, match="train.steps"):
        sweep.apply_overrides(cfg, {"train.steps": "many"})
    assert sweep.parse_value("3e-3", 1.0) == 3e-3 and sweep.parse_value("off", True) is False


def _tasks(tmp_path, n=3):
    return [sweep.Task(name=f"r{i}", workdir=str(tmp_path / "runs" / f"r{i}"),
                       overrides={"optim.peak_lr": 10.0 ** -i}, meta={"i": i}, cost=float(i))
            for i in range(n)]


def test_finished_runs_are_skipped_and_gathered_in_task_order(tmp_path):
    tasks = _tasks(tmp_path)
    for t in tasks:  # pretend every run finished earlier: nothing may be launched
        t.result_path.parent.mkdir(parents=True)
        t.result_path.write_text(json.dumps({"name": t.name, "status": "ok", "meta": t.meta,
                                             "final": {"eval_loss": 1.0 + t.meta["i"]}}))
    logs = []
    results, failures = sweep.run_local(tasks, workers=2, log=logs.append)
    assert failures == [] and [r["name"] for r in results] == ["r0", "r1", "r2"]
    assert "3/3 runs already finished" in logs[0] and len(logs) == 1
    out = sweep.gather(tasks, tmp_path / "results.jsonl")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(ln)["name"] for ln in lines] == ["r0", "r1", "r2"] == [r["name"] for r in out]


def test_shared_workdirs_are_refused(tmp_path):
    a, b = _tasks(tmp_path, 2)
    b.workdir = a.workdir
    with pytest.raises(sweep.SweepError, match="share the workdir"):
        sweep.run_local([a, b], workers=1)


def test_failed_run_is_reported_with_its_log_and_leaves_no_result(tmp_path):
    task = sweep.Task(name="bad", workdir=str(tmp_path / "bad"),
                      overrides={"optim.no_such_key": 1.0})
    results, failures = sweep.run_local([task], workers=1, log=lambda m: None)
    assert results == [] and len(failures) == 1 and not task.finished()
    assert "run.log" in failures[0][1] and "optim.no_such_key" in failures[0][1]


def test_slurm_array_covers_only_unfinished_tasks(tmp_path):
    tasks = _tasks(tmp_path, 6)
    for i in (1, 3):
        tasks[i].result_path.parent.mkdir(parents=True)
        tasks[i].result_path.write_text("{}")
    script = sweep.write_slurm(tasks, tmp_path, job_name="lrsweep", partition="gpu",
                               gpus_per_task=1, max_parallel=2, time_limit="01:00:00")
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --job-name=lrsweep", "#SBATCH --array=0,2,4-5%2",
                 "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --time=01:00:00", "--index ${SLURM_ARRAY_TASK_ID}", "-m launch.sweep task"):
        assert line in text, line
    listed = sweep.read_tasks(tmp_path / "tasks.jsonl")
    assert [t.name for t in listed] == [t.name for t in tasks]  # array index = line number
    assert listed[4].overrides == tasks[4].overrides
    for t in tasks:
        if not t.finished():
            t.result_path.parent.mkdir(parents=True, exist_ok=True)
            t.result_path.write_text("{}")
    assert sweep.write_slurm(tasks, tmp_path) is None  # nothing left to submit
    assert sweep._ranges([7]) == "7" and sweep._ranges([]) == ""


def test_cli_grid_slurm_and_bad_key(tmp_path):
    root = sweep.ROOT
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "grid", "--out", str(tmp_path / "s"),
         "--grid", "optim.peak_lr=1e-3,1e-2", "--grid", "optim.schedule=d2z,wsd",
         "--set", "train.steps=5", "--slurm"],
        cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    tasks = sweep.read_tasks(tmp_path / "s" / "tasks.jsonl")
    assert len(tasks) == 4 and tasks[0].overrides == {
        "train.steps": 5, "optim.peak_lr": 1e-3, "optim.schedule": "d2z"}
    assert "--array=0-3" in (tmp_path / "s" / "sweep.sbatch").read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "grid", "--out", str(tmp_path / "t"),
         "--grid", "optim.peak_lrx=1e-3", "--slurm"], cwd=root, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 2 and "optim.peak_lrx" in proc.stderr
