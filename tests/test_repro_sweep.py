"""The sweep library (btlm_jax.experiments): grids, names, main's override parser, skipping finished
runs, failures, a cell as a plain `python -m btlm_jax.main` command, SLURM through submitit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from btlm_jax.cli import overrides
from btlm_jax.experiments import grid, local, runner
from btlm_jax.experiments.grid import Task
from btlm_jax.cli.overrides import SweepError

ROOT = Path(__file__).resolve().parents[1]


def test_expand_grid_is_the_cartesian_product_in_key_order():
    pts = grid.expand_grid({"optim.schedule": ["d2z", "constant"], "optim.peak_lr": [1e-3, 1e-2]},
                           base={"train.steps": 5})
    assert pts == [
        {"train.steps": 5, "optim.schedule": "d2z", "optim.peak_lr": 1e-3},
        {"train.steps": 5, "optim.schedule": "d2z", "optim.peak_lr": 1e-2},
        {"train.steps": 5, "optim.schedule": "constant", "optim.peak_lr": 1e-3},
        {"train.steps": 5, "optim.schedule": "constant", "optim.peak_lr": 1e-2},
    ]
    with pytest.raises(SweepError, match="optim.peak_lr"):
        grid.expand_grid({"optim.peak_lr": []})
    with pytest.raises(SweepError, match="list of values"):
        grid.expand_grid({"optim.schedule": "d2z"})


def test_labelled_axes_set_several_keys_and_label_the_runs():
    axes = {"param": {"mup": {"model.mup.enabled": True},
                      "sp": {"model.mup.enabled": False, "model.init_std": 0.02}},
            "peak_lr": grid.axis("optim.peak_lr", [1e-3, 1e-2])}
    pts = grid.expand_axes(axes)
    assert [labels for labels, _ in pts] == [
        {"param": p, "peak_lr": lr} for p in ("mup", "sp") for lr in (1e-3, 1e-2)]
    assert pts[3][1] == {"model.mup.enabled": False, "model.init_std": 0.02, "optim.peak_lr": 1e-2}
    with pytest.raises(SweepError, match="'param'"):
        grid.expand_axes({"param": {}})


def test_run_names_are_readable_unique_and_filesystem_safe():
    pts = grid.expand_grid({"optim.schedule": ["d2z", "wsd"], "optim.peak_lr": [0.003, 0.0125]})
    names = [grid.run_name(p) for p in pts]
    assert names[0] == "schedule=d2z,peak_lr=0.003"
    assert len(set(names)) == 4 and all("/" not in n and " " not in n for n in names)
    assert grid.run_name({"data.train": "a/b c"}) == "train=a_b_c"


def test_overrides_are_typed_by_the_config_and_bad_keys_are_named():
    ov = {"optim.peak_lr": 1, "train.steps": 7, "model.mup.enabled": False,
          "train.phases": ["16:4:3", "32:4:4"], "data.train": "a.jsonl,b.jsonl", "model.init_std": 0.1}
    cfg = overrides.load_config("configs/btlm.py:tiny", ov)
    assert cfg.optim.peak_lr == 1.0 and isinstance(cfg.optim.peak_lr, float)
    assert cfg.train.steps == 7 and cfg.model.mup.enabled is False
    assert cfg.train.phases == ("16:4:3", "32:4:4") and cfg.data.train == "a.jsonl,b.jsonl"
    assert cfg.model.init_std == 0.1  # repr round trip: exactly the float given
    for bad, culprit in [({"optim.peak_rl": 1e-3}, "optim.peak_rl"),
                         ({"optimx.peak_lr": 1e-3}, "optimx.peak_lr"),
                         ({"train.steps": "many"}, "train.steps")]:
        with pytest.raises(SweepError, match=culprit) as e:
            overrides.load_config("configs/btlm.py:tiny", bad)
        assert "\n" not in str(e.value)
    with pytest.raises(SweepError, match="does not exist"):
        overrides.load_config("configs/nope.py:tiny")


def test_the_override_parser_is_mains(tmp_path):
    """The same argv through `btlm_jax.main`'s own flags (in a fresh process) and load_config."""
    args = ["--config=configs/btlm.py:tiny", "--config.optim.peak_lr=0.0125",
            "--config.model.mup.enabled=false", "--config.train.phases=16:4:3",
            "--config.data.train=x.jsonl,y.jsonl", "--config.train.steps=3"]
    script = ("import sys, json\nsys.argv = json.loads(sys.argv[1])\nfrom absl import flags\n"
              "import btlm_jax.cli.train as m\nflags.FLAGS(sys.argv)\nprint(m._CONFIG.value.to_json())")
    proc = subprocess.run([sys.executable, "-c", script,
                           json.dumps(["main", *args, f"--workdir={tmp_path}"])],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    mine = overrides.load_config(args[0].split("=", 1)[1], args[1:])
    assert json.loads(proc.stdout) == json.loads(mine.to_json())


def _tasks(tmp_path, n=3):
    return [Task(name=f"r{i}", workdir=str(tmp_path / "runs" / f"r{i}"),
                 overrides={"optim.peak_lr": 10.0 ** -i}, meta={"i": i}, cost=float(i))
            for i in range(n)]


def test_finished_runs_are_skipped_and_gathered_in_task_order(tmp_path):
    tasks = _tasks(tmp_path)
    for t in tasks:  # pretend every run finished earlier: nothing may be launched
        t.result_path.parent.mkdir(parents=True)
        t.result_path.write_text(json.dumps({"name": t.name, "status": "ok", "meta": t.meta,
                                             "final": {"eval_loss": 1.0 + t.meta["i"]}}))
    logs = []
    results, failures = local.run_local(tasks, workers=2, log=logs.append)
    assert failures == [] and [r["name"] for r in results] == ["r0", "r1", "r2"]
    assert "3/3 runs already finished" in logs[0] and len(logs) == 1
    out = local.gather(tasks, tmp_path / "results.jsonl")
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [json.loads(ln)["name"] for ln in lines] == ["r0", "r1", "r2"] == [r["name"] for r in out]


def test_shared_workdirs_are_refused(tmp_path):
    a, b = _tasks(tmp_path, 2)
    b.workdir = a.workdir
    with pytest.raises(SweepError, match="share the workdir"):
        local.run_local([a, b], workers=1)


def test_failed_run_is_reported_with_its_log_and_leaves_no_result(tmp_path):
    task = Task(name="bad", workdir=str(tmp_path / "bad"), overrides={"optim.no_such_key": 1.0})
    results, failures = local.run_local([task], workers=1, log=lambda m: None)
    assert results == [] and len(failures) == 1 and not task.finished()
    assert "run.log" in failures[0][1] and "optim.no_such_key" in failures[0][1]


def test_task_files_round_trip_with_their_command(tmp_path):
    t = _tasks(tmp_path, 1)[0]
    listed = grid.read_tasks(grid.write_tasks([t], tmp_path / "tasks.jsonl"))
    assert listed == [t]
    cmd = t.to_json()["command"]
    assert cmd[1:3] == ["-m", "btlm_jax.main"] and cmd[-1] == f"--workdir={t.workdir}"
    assert cmd[3] == f"--config={ROOT / 'btlm_jax' / 'presets.py'}:tiny"  # the default preset
    assert "--config.optim.peak_lr=1.0" in cmd
    with pytest.raises(SweepError, match="unknown field"):
        Task.from_json({"name": "x", "workdir": "y", "preset": "tiny"})


def _cell(tmp_path, name):
    return Task(name=name, workdir=str(tmp_path / name), config="configs/experiments/d2z.py:smoke",
                overrides={"train.steps": 3, "eval.every_steps": 3, "checkpoint.every_steps": 3,
                           "train.log_every_steps": 1})


def _capture_sbatch(monkeypatch) -> list[str]:
    """Replaces the `sbatch` call of submitit with a capture of the submission file."""
    from submitit.core import utils
    from submitit.slurm.slurm import SlurmExecutor

    scripts = []

    def fake_call(self, *args, **kwargs):
        scripts.append(Path(self.command[-1]).read_text())
        return "Submitted batch job 4242"

    monkeypatch.setattr(utils.CommandFunction, "__call__", fake_call)
    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))  # "srun is here"
    return scripts


def test_slurm_array_covers_only_unfinished_tasks(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    from btlm_jax.experiments import slurm

    scripts = _capture_sbatch(monkeypatch)
    tasks = _tasks(tmp_path, 6)
    for i in (1, 3):
        tasks[i].result_path.parent.mkdir(parents=True)
        tasks[i].result_path.write_text("{}")
    ex = slurm.executor(tmp_path, cluster="slurm", job_name="lrsweep", partition="gpu",
                        gpus_per_task=1, max_parallel=2, time_limit="01:00:00")
    jobs = slurm.submit(tasks, tmp_path, ex)
    assert [j.job_id for j in jobs] == [f"4242_{i}" for i in range(4)]
    (text,) = scripts
    for line in ("#SBATCH --job-name=lrsweep", "#SBATCH --array=0-3%2", "#SBATCH --partition=gpu",
                 "#SBATCH --gpus-per-node=1", "#SBATCH --time=60", "#SBATCH --signal=USR2@120"):
        assert line in text, line
    assert [t.name for t in grid.read_tasks(tmp_path / "tasks.jsonl")] == [t.name for t in tasks]
    # each element is a checkpointable job of one unfinished task; a timeout requeues it as is
    pickled = sorted((tmp_path / "slurm").glob("*/*_submitted.pkl"))
    import cloudpickle

    calls = [cloudpickle.loads(p.read_bytes()) for p in pickled]
    assert sorted(c.function.task.name for c in calls) == ["r0", "r2", "r4", "r5"]
    again = calls[0].function.checkpoint()
    assert again.function is calls[0].function
    for t in tasks:
        t.result_path.parent.mkdir(parents=True, exist_ok=True)
        t.result_path.write_text("{}")
    assert slurm.submit(tasks, tmp_path, ex) == [] and len(scripts) == 1  # nothing left
    with pytest.raises(SweepError, match="--time"):
        slurm.minutes("4 hours")
    assert slurm.minutes("1-02:30:00") == 1590 and slurm.minutes("90") == 90


@pytest.mark.slow
def test_submitit_debug_executor_runs_a_sweep_whose_cell_is_a_main_command(tmp_path):
    """The --slurm path end to end on submitit's in-process executor (train, gather, skip when
    finished); the cell's plain `python -m btlm_jax.main` command trains the same run."""
    pytest.importorskip("submitit")
    import argparse

    p = argparse.ArgumentParser()
    runner.add_launch_args(p)
    args = p.parse_args(["--slurm", "--cluster", "debug", "--time", "10"])
    task, twin = _cell(tmp_path, "cell"), _cell(tmp_path, "main")
    logs = []
    results, complete = runner.launch([task], tmp_path, args, job_name="t", log=logs.append)
    assert complete and results[0]["status"] == "ok" and results[0]["steps"] == 3
    assert results[0]["config"] == task.config
    assert json.loads((tmp_path / "results.jsonl").read_text())["name"] == "cell"
    results, complete = runner.launch([task], tmp_path, args, job_name="t", log=logs.append)
    assert complete and "every run is finished" in logs[-1]
    proc = subprocess.run(twin.command(), cwd=tmp_path, env=local.child_env(threads=0),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    main_losses = [[m["step"], m["loss"]] for m in local._metrics(Path(twin.workdir)) if "loss" in m]
    assert [s for s, _ in main_losses] == [1, 2, 3]
    assert [s for s, _ in results[0]["train_loss"]] == [1, 2, 3]
    assert [v for _, v in results[0]["train_loss"]] == pytest.approx([v for _, v in main_losses],
                                                                      rel=1e-5)


def test_cli_grid_plans_typed_tasks_and_names_a_bad_key(tmp_path):
    sys.path.insert(0, str(ROOT))
    from btlm_jax.cli import sweep as cli

    import argparse

    args = argparse.Namespace(out=str(tmp_path / "s"), config="configs/btlm.py:tiny",
                              grid=["optim.peak_lr=1e-3,1e-2", "optim.schedule=d2z,wsd"])
    # (every cell must pass the run's start checks: tiny's 20 warmup steps exceed 5)
    tasks = cli._grid_tasks(args, ["--config.train.steps=5", "--config.optim.warmup_steps=1"])
    assert len(tasks) == 4 and tasks[0].overrides == {
        "train.steps": 5, "optim.warmup_steps": 1, "optim.peak_lr": 1e-3,
        "optim.schedule": "d2z"}
    assert tasks[1].name == "peak_lr=0.001,schedule=wsd"
    proc = subprocess.run(
        [sys.executable, "-m", "launch.sweep", "grid", "--out", str(tmp_path / "t"),
         "--grid", "optim.peak_lrx=1e-3"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and "optim.peak_lrx" in proc.stderr
    assert len(Path(ROOT / "launch" / "sweep.py").read_text().splitlines()) <= 120
