"""No work lost, no silent wrong result (issue 21): divergence, corrupt checkpoints, a busy workdir,
a full disk, a changed data.train, user errors as one line, read-only runs, export refusals.

Each case reproduces a failure a careless or unlucky user meets on a tiny run (d_model 32-64,
seq 32, a few steps) and checks what the run leaves behind.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from btlm_jax import errors
from btlm_jax.train.loop import train
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def small(cache_dir, **over):
    base = {"train.log_every_steps": 1, "optim.warmup_steps": 2, "eval.num_batches": 1,
            "eval.every_steps": 1000, "logging.measure_peak": False}
    return helpers.small(cache_dir, d_model=32, n_layers=1, d_ff=64, seq_len=32,
                         **{**base, **over})


def cli_overrides(cache_dir, **over) -> list[str]:
    base = {"model.vocab_size": 512, "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
            "model.d_ff": 64, "model.mup.base_d_model": 32, "model.mup.base_d_ff": 64.0,
            "data.cache_dir": str(cache_dir), "train.seq_len": 32, "train.batch_size": 4,
            "train.log_every_steps": 1, "optim.peak_lr": 1e-2, "optim.warmup_steps": 2,
            "eval.num_batches": 1, "eval.batch_size": 4, "eval.every_steps": 1000,
            "logging.progress_bar": False, "logging.tensorboard": False,
            "logging.measure_peak": False}
    base.update(over)
    return [f"--config.{k}={v}" for k, v in base.items()]


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in helpers.metrics(workdir) if "diverged" not in r}


def module(name, *args, env=None, timeout=300):
    e = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    e.pop(errors.VERBOSE_ENV, None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", name, *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
    """A finished 4-step run (read by several tests; never written to)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    train(small(cache_dir, **{"train.steps": 4, "checkpoint.every_steps": 2}), str(run))
    return run


# ----------------------------------------------------------------------------------------------
# 1. divergence (stop and rollback end to end: tests/test_long_runs.py)


def test_loss_spike_detected(cache_dir, tmp_path):
    """train.max_loss_spike: a loss above r x the mean of the last good losses stops the run;
    a smaller rise does not; the step is checked one step late, and always before a save."""
    from btlm_jax.train.guard import DivergenceGuard

    class Ckpt:
        def all_steps(self):
            return [3]

        def protect(self, fn):
            pass

        def check(self):
            pass

        def wait(self):
            pass

    class Cfg:
        class train:
            max_loss_spike, on_divergence = 2.0, "stop"
            rollback_back_steps, rollback_skip_batches = 0, 0

    class Run:
        checkpoint_dir, path = "CK", "RUN"

    class Feed:
        rollbacks = []

    class Sink:
        def __init__(self):
            self.rows = []

        def write(self, r):
            self.rows.append(r)

        def rewind(self, step, rollbacks):
            self.rows = [r for r in self.rows if r["step"] <= step]

    class Ctx:
        restarted = False

    sink = Sink()
    g = DivergenceGuard(Cfg, Run, Ckpt(), None, Feed, [sink], print)
    ctx = Ctx()
    seq = [3.0] * 12 + [3.5, 7.0]  # mean 3.04 after 13 good steps; 7.0 > 2 x mean
    with pytest.raises(errors.UserError, match=r"diverged at step 14: loss 7 is more than "
                       r"train.max_loss_spike=2.*newest good checkpoint is step 3 in CK"):
        for i, loss in enumerate(seq, 1):
            ctx.step, ctx.metrics = i, {"loss": np.float32(loss), "grad_norm": np.float32(1.0),
                                        "param_norm": np.float32(1.0)}
            g.check(ctx)
        g.verify(ctx)
    assert sink.rows[-1]["step"] == 14 and "max_loss_spike" in sink.rows[-1]["diverged"]


@pytest.mark.slow
def test_export_refuses_nan_weights_and_a_nonempty_out(trained, tmp_path):
    """convert export: NaN weights are refused (exit 2, one line); an existing folder is kept
    unless --overwrite."""
    import jax
    import jax.numpy as jnp

    from btlm_jax.train.checkpoint import Checkpointer

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    out = tmp_path / "other_model"
    out.mkdir()
    (out / "config.json").write_text('{"model": "someone else\'s"}')
    r = module("btlm_jax.convert", "export", f"--workdir={run}", f"--out={out}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "not empty" in r.stderr and "--overwrite" in r.stderr
    assert (out / "config.json").read_text() == '{"model": "someone else\'s"}'

    # a NaN checkpoint (as a diverged run without the guard wrote them)
    ck = Checkpointer(str(run / "checkpoints"), async_save=False)
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(run / "checkpoints", options=ocp.CheckpointManagerOptions(
        read_only=True), item_handlers={"state": ocp.StandardCheckpointHandler(),
                                        "data": ocp.JsonCheckpointHandler()})
    restored = mgr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                       data=ocp.args.JsonRestore()))
    mgr.close()
    state = restored["state"]
    state["params"] = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan),
                                             state["params"])
    ck.save(5, state, restored["data"], force=True)
    ck.close()
    r = module("btlm_jax.convert", "export", f"--workdir={run}", f"--out={tmp_path / 'new'}")
    assert r.returncode == 2 and "non-finite weights" in r.stderr and "--step" in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "new" / "model.safetensors").exists()
    from btlm_jax.convert.workdir import export_checkpoint

    export_checkpoint(str(run), str(out), step=4, overwrite=True)  # --step=4 --overwrite
    assert (out / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# 2. corrupt checkpoints


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_one_step(cache_dir, tmp_path, capsys):
    """A truncated array file in the latest checkpoint: the rerun says which step it skipped and
    why, resumes from the one before and reproduces the uninterrupted losses."""
    run = tmp_path / "run"
    cfg = small(cache_dir, **{"train.steps": 9, "checkpoint.every_steps": 3})
    train(cfg, str(run))
    ref = losses(run)
    assert helpers.checkpoint_steps(run) == [3, 6, 9]
    files = [f for f in glob.glob(str(run / "checkpoints/9/state/**/d/*"), recursive=True)]
    big = max(files, key=os.path.getsize)
    os.truncate(big, os.path.getsize(big) // 2)
    capsys.readouterr()
    out = train(cfg, str(run))
    said = capsys.readouterr().out
    assert "skipping checkpoint step 9" in said and "truncated" in said, said
    assert "resumed" in said and "at step 6" in said
    assert out["complete"] and out["step"] == 9
    again = losses(run)
    assert sorted(again) == sorted(ref)
    for s in (7, 8, 9):
        assert again[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, again[s], ref[s])


@pytest.mark.slow
def test_corrupt_and_different_model_are_told_apart(trained, cache_dir, tmp_path, capsys):
    """An empty latest step directory is skipped as incomplete; a checkpoint of another model
    (different d_ff) is refused as a different config, not skipped."""
    from btlm_jax.train.checkpoint import Checkpointer, CheckpointMismatchError
    from btlm_jax.train.program import Program

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "checkpoints/4")
    (run / "checkpoints/4").mkdir()
    cfg = small(cache_dir, **{"train.steps": 4, "checkpoint.every_steps": 2})
    ck = Checkpointer(str(run / "checkpoints"), async_save=False)
    program = Program.from_config(cfg)
    step, _, _ = ck.restore_latest(program.abstract_state)
    assert step == 2
    assert "skipping checkpoint step 4" in capsys.readouterr().out
    # d_ff 192 is 256 wide physically under model.pad_multiple=128 (96 would pad to the same
    # 128 as the trained 128: equal shapes, told apart by the run's config.json instead)
    other = small(cache_dir, **{"model.d_ff": 192})
    with pytest.raises(CheckpointMismatchError, match="different model.*shapes differ"):
        ck.restore_latest(Program.from_config(other).abstract_state)
    ck.close()


# ----------------------------------------------------------------------------------------------
# 3. one run per workdir


def test_lock_is_exclusive_and_stale_locks_are_recovered(tmp_path):
    from btlm_jax.train.lock import WorkdirBusyError, WorkdirLock

    a = WorkdirLock(tmp_path / "w").acquire()
    with pytest.raises(WorkdirBusyError, match=rf"in use by process {os.getpid()} on host"):
        WorkdirLock(tmp_path / "w").acquire()
    a.release()
    assert not (tmp_path / "w/.lock").exists()
    # a lock left by a process that is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "w/.lock").write_text(json.dumps(
        {"host": a.owner["host"], "pid": dead.pid, "started": "1"}))
    with WorkdirLock(tmp_path / "w") as b:
        assert json.loads((tmp_path / "w/.lock").read_text())["pid"] == os.getpid()
        assert b.held
    # a lock held from another host is never taken over
    (tmp_path / "w/.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(WorkdirBusyError, match="host elsewhere.*delete"):
        WorkdirLock(tmp_path / "w").acquire()


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_exits_at_once(cache_dir, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "btlm_jax.main", f"--workdir={run}"]
        + cli_overrides(cache_dir, **{"train.steps": 30, "checkpoint.every_steps": 10}),
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.time()
    while not (run / ".lock").exists():
        assert first.poll() is None and time.time() - t0 < 120, first.stdout.read()
        time.sleep(0.1)
    r = module("btlm_jax.main", f"--workdir={run}",
               *cli_overrides(cache_dir, **{"train.steps": 30, "optim.peak_lr": 3e-3}))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by process {first.pid}" in lines[0], r.stderr
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    steps = [r["step"] for r in helpers.metrics(run)]
    assert steps == list(range(1, 31)), steps  # one line per step: nothing interleaved
    assert not (run / ".lock").exists()


# ----------------------------------------------------------------------------------------------
# 4. disk full


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


def test_jsonl_line_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write cut short by a full disk leaves no torn line; a torn last line from a crash is
    dropped on resume."""
    from btlm_jax.train.hooks import JsonlSink

    p = tmp_path / "metrics.jsonl"
    sink = JsonlSink(p, 0)
    sink.write({"step": 1, "loss": 1.0})
    real = os.write

    def short(fd, data):
        real(fd, data[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError) as e:
        sink.write({"step": 2, "loss": 2.0})
    monkeypatch.setattr(os, "write", real)
    assert e.value.filename == str(p)
    assert errors.message(e.value).startswith("no space left on ")
    assert f"while writing {p}; free space and rerun" in errors.message(e.value)
    assert p.read_text() == '{"step": 1, "loss": 1.0}\n'
    with open(p, "a") as f:
        f.write('{"step": 2, "lo')  # a crash mid-line
    JsonlSink(p, 5)
    assert p.read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.slow
def test_full_disk_stops_with_one_line_and_the_copy_resumes_exactly(cache_dir, tmp_path):
    """A run on a 3 MB tmpfs: it stops with one short error about space (exit 2) and leaves no
    partial checkpoint; the same run directory copied to a roomy disk resumes and reproduces the
    losses of an uninterrupted run."""
    tfs = tmp_path / "tfs"
    if os.geteuid() != 0 or not _mount_tmpfs(tfs, "3m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        over = {"train.steps": 12, "checkpoint.every_steps": 1, "checkpoint.keep": 3,
                "checkpoint.async_save": True, "model.d_model": 64, "model.d_ff": 128,
                "model.mup.base_d_model": 64, "model.mup.base_d_ff": 128.0,
                "model.n_layers": 2}
        r = module("btlm_jax.main", f"--workdir={tfs / 'run'}", *cli_overrides(cache_dir, **over))
        assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(err) <= 3, r.stderr
        assert err[-1].startswith("error: no space left on ") and "free space and rerun" in err[-1]
        assert "Traceback" not in r.stderr
        assert not list((tfs / "run/checkpoints").glob("*tmp*"))
        for ln in (tfs / "run/metrics.jsonl").read_text().splitlines():
            json.loads(ln)  # whole lines only
        copy = tmp_path / "copy"
        shutil.copytree(tfs / "run", copy)
    finally:
        subprocess.run(["umount", str(tfs)])
    r = module("btlm_jax.main", f"--workdir={copy}", *cli_overrides(cache_dir, **over))
    assert r.returncode == 0, r.stderr[-3000:]
    ref = tmp_path / "ref"
    cfg = small(cache_dir, **over)
    train(cfg, str(ref))
    want, got = losses(ref), losses(copy)
    assert sorted(got) == list(range(1, 13))
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s], want[s])


# ----------------------------------------------------------------------------------------------
# 5. the tokenizer is pinned


@pytest.mark.slow
def test_changed_data_train_keeps_the_tokenizer(trained, cache_dir, tmp_path, monkeypatch,
                                                capsys):
    from btlm_jax.data import tokenizer as tok_mod

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()}
    data = tmp_path / "other"
    data.mkdir()
    rng = np.random.default_rng(0)
    words = ["zebra", "quark", "lumen", "fjord", "crypt", "waltz", "nymph", "glyph"]
    with open(data / "part.jsonl", "w") as f:
        for i in range(200):
            text = " ".join(rng.choice(words, size=60))
            f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": "Other"}}) + "\n")

    def no_training(*a, **k):
        raise AssertionError("a new tokenizer was trained")

    monkeypatch.setattr(tok_mod, "load_or_train", no_training)
    capsys.readouterr()
    out = train(small(cache_dir, **{"train.steps": 6, "checkpoint.every_steps": 2,
                                    "data.train": str(data / "*.jsonl"),
                                    "data.eval": str(data / "*.jsonl")}), str(run))
    said = capsys.readouterr().out
    assert out["step"] == 6
    assert "tokenizer: the run's own copy" in said and "data.train" in said
    assert {p.name: p.read_bytes() for p in (run / "tokenizer").iterdir()} == before


# ----------------------------------------------------------------------------------------------
# 7. user errors


def _one_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[-1], (n, lines[-1])


@pytest.mark.slow
@pytest.mark.parametrize("over,needles", [
    ({"train.stepz": 5}, ["--config.train.stepz", "did you mean 'steps'"]),
    ({"mesh.tensor": 3}, ["mesh", "3"]),
    ({"data.mixture": "nosuchsource=1"}, ["nosuchsource"]),
    ({"data.tokenizer": "/nonexistent/tok.model"}, ["/nonexistent/tok.model"]),
    ({"data.train": "/nonexistent/*.jsonl"}, ["/nonexistent/*.jsonl"]),
])
def test_user_errors_are_one_line(cache_dir, tmp_path, over, needles):
    r = module("btlm_jax.main", f"--workdir={tmp_path / 'run'}", *cli_overrides(cache_dir, **over))
    _one_error(r, *needles)
    # --verbose (or BTLM_VERBOSE=1) adds the traceback
    if over == {"mesh.tensor": 3}:
        r = module("btlm_jax.main", f"--workdir={tmp_path / 'run'}",
                   *cli_overrides(cache_dir, **over), env={errors.VERBOSE_ENV: "1"})
        assert r.returncode == 2 and "Traceback" in r.stderr


@pytest.mark.slow
def test_batch_not_divisible_by_devices_is_one_line(cache_dir, tmp_path):
    r = module("btlm_jax.main", f"--workdir={tmp_path / 'run'}",
               *cli_overrides(cache_dir, **{"train.batch_size": 6}),
               env={"XLA_FLAGS": helpers.xla_flags(8)})
    _one_error(r, "train.batch_size", "8")


def test_workdir_errors_are_one_line(cache_dir, tmp_path, capsys):
    """In process, through the shared handler: a workdir that is a file, a read-only workdir,
    a truncated shard."""
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(SystemExit) as e, errors.cli():
        train(small(cache_dir), str(f))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and str(f) in err


@pytest.mark.slow
def test_read_only_workdir_and_truncated_shard_are_one_line(trained, cache_dir, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "ro"),
                                            str(ro)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        r = module("btlm_jax.main", f"--workdir={ro / 'run'}", *cli_overrides(cache_dir))
        _one_error(r, str(ro), "read-only")
    finally:
        subprocess.run(["umount", str(ro)])
    import zstandard

    shard = tmp_path / "data/a.jsonl.zst"
    shard.parent.mkdir()
    raw = "".join(json.dumps({"text": f"doc {i} " * 50}) + "\n" for i in range(200)).encode()
    blob = zstandard.ZstdCompressor().compress(raw)
    shard.write_bytes(blob[: len(blob) // 2])
    r = module("btlm_jax.main", f"--workdir={tmp_path / 'run2'}",
               *cli_overrides(cache_dir, **{"data.train": str(shard)}))
    _one_error(r, "a.jsonl.zst")


# ----------------------------------------------------------------------------------------------
# 8. a read-only run directory


@pytest.mark.slow
def test_evaluate_and_generate_on_a_read_only_bind_mount(trained, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(trained),
                                            str(ro)], capture_output=True).returncode:
        pytest.skip("cannot make a read-only bind mount here")
    try:
        before = sorted(str(p.relative_to(trained)) for p in trained.rglob("*"))
        r = module("btlm_jax.evaluate", f"--workdir={ro}", "--lengths=32", "--num_batches=1",
                   "--position_interpolation=off", "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        res = json.loads(r.stdout.strip().splitlines()[-1])["results"]
        assert math.isfinite(res[0]["loss"])
        r = module("btlm_jax.generate", f"--workdir={ro}", "--prompt=the", "--max_new_tokens=40",
                   "--temperature=0")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "warning: prompt + --max_new_tokens" in r.stderr  # 41 > the trained 32
        assert sorted(str(p.relative_to(trained)) for p in trained.rglob("*")) == before
    finally:
        subprocess.run(["umount", str(ro)])
