"""End-to-end training tests: loss falls, exact resume after SIGKILL and SIGTERM, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from btlm_jax import errors
from btlm_jax.config import ConfigError
from btlm_jax.train.loop import train
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def small(cache_dir, **over):
    return helpers.small(cache_dir, **over)


def overrides(cfg_over):
    return [f"--config.{k}={v}" for k, v in cfg_over.items()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_loss_decreases(cache_dir, tmp_path):
    cfg = small(cache_dir, **{"train.steps": 60, "train.log_every_steps": 5, "eval.every_steps": 30})
    out = train(cfg, str(tmp_path / "run"))
    rec = helpers.metrics(tmp_path / "run")
    first, last = rec[0]["loss"], rec[-1]["loss"]
    assert out["complete"] and rec[-1]["step"] == 60
    assert last < first - 1.0, (first, last)
    evals = [r["eval_loss"] for r in rec if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    import math
    assert evals[1] < math.log(512)  # better than uniform over the vocabulary


def _spawn(workdir, cache_dir, over):
    cmd = [sys.executable, "-m", "btlm_jax.main", "--config=configs/btlm.py:tiny",
           f"--workdir={workdir}"] + overrides(over)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, workdir, step, timeout=300):
    path = Path(workdir) / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run exited early:\n{proc.stdout.read()}")
        if path.exists():
            lines = path.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for training progress")


@pytest.mark.slow
def test_resume_after_sigkill_and_sigterm_equals_uninterrupted(cache_dir, tmp_path):
    over = {"train.steps": 30, "train.log_every_steps": 1, "checkpoint.every_steps": 5,
            "eval.every_steps": 100}
    cli = dict(over)
    cli.update({"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2,
                "model.n_heads": 2, "model.d_ff": 128, "model.mup.base_d_model": 64,
                "model.mup.base_d_ff": 128.0, "data.cache_dir": str(cache_dir),
                "train.seq_len": 64, "train.batch_size": 4, "optim.peak_lr": 0.01,
                "optim.warmup_steps": 5, "eval.num_batches": 2, "eval.batch_size": 4,
                "logging.progress_bar": False, "logging.tensorboard": False})
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(small(cache_dir, **over), str(ref_dir))
    ref = {r["step"]: r["loss"] for r in helpers.metrics(ref_dir)}

    p = _spawn(run_dir, cache_dir, cli)
    _wait_for_step(p, run_dir, 13)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = helpers.metrics(run_dir)[-1]["step"]

    p = _spawn(run_dir, cache_dir, cli)
    _wait_for_step(p, run_dir, 22)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    # the launcher convention: a saved, resumable stop is "try again" (EX_TEMPFAIL), not done
    assert p.returncode == errors.EXIT_PREEMPTED == 75, out
    assert "SIGTERM received: saved a checkpoint" in out
    termed_at = helpers.metrics(run_dir)[-1]["step"]
    assert termed_at < 30
    # the last line: where it stopped, the checkpoint it saved and the command that resumes it
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"preempted at step {termed_at} of 30: saved checkpoint "
                           f"{run_dir / 'checkpoints' / str(termed_at)}; resume with: "
                           "python -m btlm_jax.main --config=configs/btlm.py:tiny "
                           f"--workdir={run_dir} "), last
    assert (run_dir / "checkpoints" / str(termed_at)).is_dir()

    p = _spawn(run_dir, cache_dir, cli)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert f"resumed from {run_dir / 'checkpoints'} at step {termed_at}" in out
    got = helpers.metrics(run_dir)
    assert [r["step"] for r in got] == list(range(1, 31))  # one line per step, none lost
    assert killed_at >= 13
    for r in got:
        assert r["loss"] == ref[r["step"]], (r["step"], r["loss"], ref[r["step"]])


def test_unknown_config_key_fails_naming_it(tmp_path):
    cmd = [sys.executable, "-m", "btlm_jax.main", "--config=configs/btlm.py:tiny",
           f"--workdir={tmp_path}", "--config.train.stepz=5"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode != 0
    assert "stepz" in r.stderr


def test_invalid_values_fail_naming_the_key(tmp_path):
    from btlm_jax.config import validate

    c = small(tmp_path)
    c.optim.schedule = "cosinus"
    with pytest.raises(ConfigError, match="optim.schedule"):
        validate(c)
    c = small(tmp_path)
    c.model.n_heads = 3
    with pytest.raises(ConfigError, match="model.n_heads"):
        validate(c)
    c = small(tmp_path)
    c.train.batch_size, c.train.grad_accum_steps = 6, 4
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        validate(c)
    for key, bad in (("rollback_back_steps", -1), ("rollback_skip_batches", -3)):
        c = small(tmp_path)
        c.train[key] = bad
        with pytest.raises(ConfigError, match=rf"train\.{key}={bad}: must be an integer >= 0"):
            validate(c)


def test_missing_data_path_fails_naming_it(tmp_path):
    c = small(tmp_path, **{"data.train": str(tmp_path / "nope" / "*.jsonl.zst")})
    with pytest.raises(Exception, match="data.train") as e:
        train(c, str(tmp_path / "run"))
    assert "nope" in str(e.value)
