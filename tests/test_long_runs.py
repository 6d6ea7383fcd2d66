"""Long runs that recover and see each token once (issue 28): good checkpoints, rollback as PaLM
does it, one data position across phases and rollbacks, the batch inspector.

The reference is one tiny run (d_model 32, two phases: 32 x 4 for 10 steps, then 64 x 2 for 10)
with ``train.on_divergence=rollback`` in which update 13 is made to produce NaN weights and a NaN
loss; a test hook records the batch every update really trained on. Against it: the step counter,
the schedule, the optimizer's counts and the logged lr agree with a float64 D2Z formula at every
logged step; metrics.jsonl holds each step once and one record of the rollback; the token
counters equal the recorded batches' tokens; the final trajectory never trains on a row the
discarded one trained on; the inspector (``btlm-batches``) writes exactly the recorded batches;
a resume from a checkpoint after the rollback reproduces the losses.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("32:4:10", "64:2:10")
STEPS, WARMUP, PEAK = 20, 2, 1e-2
POISON = 13  # the update whose loss and weights are made NaN (once)
BACK, SKIP, EVERY = 4, 3, 2


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "btlm_parallel_cache"  # shared with test_phases etc.
    d.mkdir(exist_ok=True)
    return d


def small(cache_dir, **over):
    base = {"train.log_every_steps": 1, "optim.warmup_steps": WARMUP, "eval.num_batches": 1,
            "eval.every_steps": 1000, "logging.measure_peak": False}
    return helpers.small(cache_dir, d_model=32, n_layers=1, d_ff=64, seq_len=32,
                         **{**base, **over})


def restore_raw(workdir, step):
    """(params leaves, optimizer counts, step) of checkpoint ``step``, read with Orbax alone."""
    import jax
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints",
                                item_handlers={"state": ocp.StandardCheckpointHandler()},
                                options=ocp.CheckpointManagerOptions(read_only=True))
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    counts = [int(np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(
        state["opt_state"]) if "count" in jax.tree_util.keystr(p)]
    return ([np.asarray(x) for x in jax.tree_util.tree_leaves(state["params"])], counts,
            int(np.asarray(state["step"])))


def d2z(s: int) -> float:
    """The lr of the update from s to s + 1 steps (float64): warmup, then linear to 0."""
    if s < WARMUP:
        return PEAK * s / WARMUP
    return PEAK * min(max((STEPS - s) / (STEPS - WARMUP), 0.0), 1.0)


class Recorder:
    """Wraps Program.counting_train_step: records (step before, inputs, source_ids) of every
    update, and poisons update ``POISON`` once (NaN weights and loss)."""

    def __init__(self, monkeypatch, poison=POISON):
        from btlm_jax.train import program as program_mod

        self.seen: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.poisoned = False
        orig = program_mod.Program.counting_train_step
        rec = self

        def wrapped(prog, *a, **k):
            fn = orig(prog, *a, **k)

            def step(state, batch):
                import jax
                import jax.numpy as jnp

                s = int(jax.device_get(state.step))
                rec.seen.append((s, np.asarray(batch["inputs"]), np.asarray(batch["source_ids"])))
                state, m = fn(state, batch)
                if s + 1 == poison and not rec.poisoned:
                    rec.poisoned = True
                    state = state.replace(params=jax.tree_util.tree_map(lambda x: x * jnp.nan,
                                                                        state.params))
                    m = dict(m, loss=m["loss"] * jnp.nan)
                return state, m
            return step

        monkeypatch.setattr(program_mod.Program, "counting_train_step", wrapped)

    def final(self) -> dict[int, tuple]:
        """Per update (metrics numbering), the batch of the last time it was trained."""
        return {s + 1: (x, src) for s, x, src in self.seen}


def rollback_cfg(cache_dir, **over):
    return small(cache_dir, **{
        "train.phases": PHASES, "train.steps": STEPS, "optim.peak_lr": PEAK,
        "optim.schedule": "d2z", "checkpoint.every_steps": EVERY, "checkpoint.keep": 1,
        "train.on_divergence": "rollback", "train.rollback_back_steps": BACK,
        "train.rollback_skip_batches": SKIP, **over})


@pytest.fixture(scope="module")
def rolled(cache_dir, tmp_path_factory):
    from btlm_jax.train.loop import train

    mp = pytest.MonkeyPatch()
    try:
        rec = Recorder(mp)
        wd = tmp_path_factory.mktemp("rollback") / "run"
        out = train(rollback_cfg(cache_dir), str(wd))
    finally:
        mp.undo()
    assert rec.poisoned and out["complete"] and math.isfinite(out["loss"])
    return wd, rec


# ----------------------------------------------------------------------------------------------
# Rollback


@pytest.mark.slow
def test_rollback_rewinds_step_schedule_and_optimizer(rolled):
    wd, _ = rolled
    rec = helpers.metrics(wd)
    regular = [r for r in rec if "rollback" not in r]
    rolls = [r for r in rec if "rollback" in r]
    # one record per step of the trained trajectory, and one of the rollback
    assert [r["step"] for r in regular] == list(range(1, STEPS + 1)), [r["step"] for r in rec]
    assert len(rolls) == 1 and "diverged" not in json.dumps(regular)
    rb = rolls[0]
    # newest good checkpoint at least BACK before the bad step 13: 8 (kept despite keep=1)
    assert (rb["step"], rb["rollback"], rb["restored_step"]) == (POISON, 1, 8), rb
    assert not math.isfinite(rb["loss"] if rb["loss"] is not None else float("nan"))
    # the logged lr, the optimizer's own lr (from its update count) and the schedule agree
    for r in regular:
        want = d2z(r["step"] - 1)
        assert r["lr"] == pytest.approx(want, rel=1e-5, abs=1e-9), r["step"]
        opt = [v for k, v in r.items() if k.startswith("opt/") and k.endswith("/lr")]
        assert opt and all(v == pytest.approx(want, rel=1e-5, abs=1e-9) for v in opt), r
    assert regular[-1]["lr"] == 0.0 or regular[-1]["lr"] == pytest.approx(d2z(STEPS - 1))
    # no checkpoint holds the bad weights; each one's optimizer counts equal its step
    kept = helpers.checkpoint_steps(wd)
    assert kept[-1] == STEPS and not (wd / "checkpoints.diverged").exists()
    for s in kept:
        leaves, counts, step = restore_raw(wd, s)
        assert step == s and counts and set(counts) == {s}, (s, counts)
        assert all(np.isfinite(a).all() for a in leaves), s
    rollbacks = json.loads((wd / "rollbacks.json").read_text())["rollbacks"]
    assert rollbacks == [{"diverged": POISON, "restored": 8, "skip": SKIP}]


@pytest.mark.slow
def test_rollback_skips_the_data_and_counts_trained_tokens(rolled):
    wd, rec = rolled
    final = rec.final()
    assert sorted(final) == list(range(1, STEPS + 1))
    # the updates trained and then discarded: 9 .. 13 (first time), and 14 (dispatched before
    # the one-step-late check saw step 13)
    discarded = {(s + 1): x for s, x, _ in rec.seen[:14] if s + 1 > 8}
    assert sorted(discarded) == list(range(9, 15))
    kept_rows = {r.tobytes() for s, (x, _) in final.items() for r in x}
    assert len(kept_rows) == sum(len(x) for x, _ in final.values())  # no row twice
    for s in range(9, 14):  # nothing the discarded steps up to the spike trained on
        assert not {r.tobytes() for r in discarded[s]} & kept_rows, s
    # token counters: the tokens of the trained trajectory only, per source
    last = [r for r in helpers.metrics(wd) if r["step"] == STEPS and "rollback" not in r][-1]
    names = sorted(k[len("tokens/"):] for k in last if k.startswith("tokens/"))
    counted = {n: 0 for n in names}
    for _, src in final.values():
        for i, n in enumerate(names):
            counted[n] += int((src == i).sum())
    assert {n: last[f"tokens/{n}"] for n in names} == counted
    assert sum(counted.values()) == 10 * 4 * 32 + 10 * 2 * 64


def _inspector(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "btlm_jax.cli.batches", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_inspector_writes_the_batches_training_read(rolled, tmp_path):
    wd, rec = rolled
    final = rec.final()
    out = tmp_path / "b.npz"
    r = _inspector(f"--workdir={wd}", f"--steps=1:{STEPS + 1}", f"--out={out}")
    assert r.returncode == 0, r.stdout + r.stderr
    got = np.load(out)
    names = list(got["source_names"])
    for s in range(1, STEPS + 1):
        x, src = final[s]
        assert got[f"tokens_{s}"].dtype == np.int32
        np.testing.assert_array_equal(got[f"tokens_{s}"], x, err_msg=f"step {s}")
        np.testing.assert_array_equal(got[f"sources_{s}"], src, err_msg=f"step {s}")
    assert got["tokens_1"].shape == (4, 32) and got[f"tokens_{STEPS}"].shape == (2, 64)
    assert names == sorted(names) and len(names) == 3
    # the run's Grain chain, as a library user reads it: element s - 1 is what update s trained on
    import grain

    from btlm_jax.data import train_dataset

    ds = train_dataset(wd)
    assert isinstance(ds, grain.MapDataset) and len(ds) == STEPS
    for s in (1, POISON, STEPS):
        np.testing.assert_array_equal(ds[s - 1]["inputs"], final[s][0], err_msg=f"step {s}")
    half = train_dataset(wd, process_index=1, process_count=2)
    np.testing.assert_array_equal(half[POISON - 1]["inputs"], final[POISON][0][1:])
    # before the rollback: the batch the diverged step 13 really saw (its first training)
    first13 = next(x for s, x, _ in rec.seen if s + 1 == POISON)
    r = _inspector(f"--workdir={wd}", f"--steps={POISON}:{POISON + 1}", "--rollbacks=0",
                   f"--out={out}", "--decode")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(out)[f"tokens_{POISON}"], first13)
    from btlm_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(wd / "tokenizer")
    assert tok.decode([int(t) for t in first13[0]]) in r.stdout
    assert f"--- step {POISON} row 1 " in r.stdout
    # user errors: one line, exit 2
    r = _inspector(f"--workdir={wd}", "--steps=0:3", f"--out={out}")
    assert r.returncode == 2 and r.stderr.startswith("error: --steps='0:3'"), r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    from btlm_jax import batches

    for bad, what in ((f"1:{STEPS + 2}", "the run has steps 1 .. 20"), ("3:3", "1 <= A < B"),
                      ("x", "give A:B")):
        with pytest.raises(ValueError, match=what):
            batches.parse_steps(bad, STEPS)
    with pytest.raises(ValueError, match=r"--rollbacks=2: the run's log .* has 1 rollback"):
        batches.batches(str(wd), "1:2", rollbacks=2)


@pytest.mark.slow
def test_resume_after_a_rollback_reproduces_the_run(rolled, cache_dir, tmp_path):
    """A copy cut back to checkpoint 16 (after the rollback, in phase 2) resumes with the log in
    the checkpoint's data state: the same losses, no second rollback."""
    from btlm_jax.train.loop import train

    src, _ = rolled
    wd = tmp_path / "run"
    shutil.copytree(src, wd)
    assert 16 in helpers.checkpoint_steps(wd)
    for d in (wd / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > 16:
            shutil.rmtree(d)
    (wd / "rollbacks.json").unlink()  # the checkpoint's own log is enough
    out = train(rollback_cfg(cache_dir), str(wd))
    assert out["complete"]
    ref, got = helpers.metrics(src), helpers.metrics(wd)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert [r.get("rollback") for r in got] == [r.get("rollback") for r in ref]
    for a, b in zip(ref, got):
        if "rollback" not in a and a["step"] > 16:
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), a["step"]
    assert json.loads((wd / "rollbacks.json").read_text()) == \
        json.loads((src / "rollbacks.json").read_text())


# ----------------------------------------------------------------------------------------------
# Good checkpoints, stop mode, giving up


def _evaluate_loss(workdir, step) -> float:
    from btlm_jax.eval.perplexity import Evaluator
    from btlm_jax.eval.session import load_run

    run = load_run(str(workdir), step)
    (res,) = Evaluator(run).results([32], [False], 2)
    return res["loss"]


@pytest.mark.slow
def test_stop_names_a_checkpoint_evaluate_scores_finite(cache_dir, tmp_path):
    """peak_lr 1e3, a checkpoint every step, keep 1: the error names a checkpoint whose eval loss
    is finite (the newest one, whose weights gave the NaN, is moved aside, and keep-N kept the
    good one); metrics.jsonl holds one record of the bad step; the rerun resumes from the named
    checkpoint and stops the same way."""
    from btlm_jax.train.guard import DivergenceError
    from btlm_jax.train.loop import train

    run = tmp_path / "run"
    cfg = small(cache_dir, **{"train.steps": 20, "optim.peak_lr": 1e3, "checkpoint.every_steps": 1,
                              "checkpoint.keep": 1, "optim.warmup_steps": 1})
    with pytest.raises(DivergenceError) as e:
        train(cfg, str(run))
    msg = str(e.value)
    bad = [r for r in helpers.metrics(run) if "diverged" in r]
    assert len(bad) == 1
    step = bad[0]["step"]
    assert [r["step"] for r in helpers.metrics(run)].count(step) == 1
    assert f"diverged at step {step}" in msg and "on_divergence=rollback" in msg
    named = int(msg.split("newest good checkpoint is step ")[1].split()[0])
    assert helpers.checkpoint_steps(run) == [named] and named < step - 1
    assert math.isfinite(_evaluate_loss(run, named))
    assert (run / "checkpoints.diverged" / str(step - 1)).is_dir()  # kept for inspection
    with pytest.raises(DivergenceError) as e2:
        train(cfg, str(run))
    assert f"diverged at step {step}" in str(e2.value)
    assert f"newest good checkpoint is step {named} " in str(e2.value)
    assert helpers.checkpoint_steps(run) == [named]


@pytest.mark.slow
def test_rollback_gives_up_without_looping_on_bad_weights(cache_dir, tmp_path):
    """A run that diverges whatever the data (peak_lr 1e3) with rollback: it rolls back to a
    good checkpoint at most MAX_ROLLBACKS times in a row, never saves the diverged weights, then
    stops with advice that does not suggest the mode it is in."""
    from btlm_jax.train.guard import MAX_ROLLBACKS, DivergenceError
    from btlm_jax.train.loop import train

    run = tmp_path / "run"
    cfg = small(cache_dir, **{"train.steps": 40, "optim.peak_lr": 1e3, "checkpoint.every_steps": 1,
                              "checkpoint.keep": 3, "optim.warmup_steps": 1,
                              "train.on_divergence": "rollback", "train.rollback_back_steps": 0,
                              "train.rollback_skip_batches": 0})
    with pytest.raises(DivergenceError) as e:
        train(cfg, str(run))
    msg = str(e.value)
    assert "on_divergence" not in msg and f"{MAX_ROLLBACKS} rollbacks in a row" in msg, msg
    rec = helpers.metrics(run)
    rolls = [r for r in rec if "rollback" in r]
    assert [r["rollback"] for r in rolls] == list(range(1, MAX_ROLLBACKS + 1))
    assert len({r["restored_step"] for r in rolls}) == 1
    named = int(msg.split("newest good checkpoint is step ")[1].split()[0])
    assert named == rolls[0]["restored_step"] == max(helpers.checkpoint_steps(run))
    for s in helpers.checkpoint_steps(run):
        leaves, counts, step = restore_raw(run, s)
        assert set(counts) == {s} and all(np.isfinite(a).all() for a in leaves)


def test_resume_continues_a_rollback_logged_after_the_checkpoint(tmp_path):
    """RUN/rollbacks.json vs the resumed checkpoint's log: a rollback that restored exactly the
    resumed checkpoint (the run stopped before its next save) is kept, so the resumed run trains
    what the stopped one did; anything else not in the checkpoint's log is lost work, dropped.
    metrics.jsonl is rewound to match."""
    from btlm_jax.data.positions import Rollback
    from btlm_jax.train.hooks import JsonlSink
    from btlm_jax.train.run_dir import read_rollbacks, resumed_rollbacks, write_rollbacks

    a, b = Rollback(30, 20, 5), Rollback(50, 40, 5)
    write_rollbacks(tmp_path, [a, b])
    assert read_rollbacks(tmp_path) == [a, b]
    assert resumed_rollbacks(tmp_path, 40, [a.to_json()]) == [a, b]  # b restored 40: kept
    assert resumed_rollbacks(tmp_path, 45, [a.to_json()]) == [a]  # b is not this checkpoint's
    assert resumed_rollbacks(tmp_path, 40, []) == []  # the logs disagree: the checkpoint wins
    (tmp_path / "rollbacks.json").unlink()
    assert resumed_rollbacks(tmp_path, 40, [a.to_json()]) == [a]
    lines = [{"step": 19}, {"step": 20}, {"step": 21}, {"step": 30, "rollback": 1},
             {"step": 21}, {"step": 41}, {"step": 50, "rollback": 2}, {"step": 41}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    JsonlSink(path, 40, rollbacks=1)
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == \
        [{"step": 19}, {"step": 20}, {"step": 21}, {"step": 30, "rollback": 1}, {"step": 21}]


def test_wandb_sink_sends_no_step_wandb_would_ignore(tmp_path, monkeypatch):
    """W&B ignores (with a warning each) a record below the newest step it holds: after a
    rollback from 6 to 2, and on a resumed W&B run, the sink leaves those out itself."""
    import types

    from btlm_jax.config import default_config
    from btlm_jax.train.hooks import WandbSink

    class Run:
        def __init__(self, starting_step):
            self.starting_step, self.steps = starting_step, []

        def log(self, data, step):
            self.steps.append(step)

    runs = [Run(0), Run(9)]  # a new W&B run, then the same run resumed (its history: 1 .. 8)
    made = iter(runs)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **k: next(made)))
    cfg = default_config()
    cfg.logging.wandb_mode = "offline"
    sink = WandbSink(cfg, tmp_path)
    for s in range(1, 7):
        sink.write({"step": s, "loss": 1.0})
    sink.rewind(2, 0)
    sink.write({"step": 6, "loss": float("nan"), "rollback": 1, "restored_step": 2})
    for s in range(3, 9):
        sink.write({"step": s, "loss": 2.0})
    assert runs[0].steps == [1, 2, 3, 4, 5, 6, 6, 6, 7, 8]
    resumed = WandbSink(cfg, tmp_path)
    for s in range(5, 11):
        resumed.write({"step": s, "loss": 2.0})
    assert runs[1].steps == [9, 10]
