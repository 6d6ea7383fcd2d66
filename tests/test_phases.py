"""Variable sequence length (``train.phases``): a phase change mid-run, and resumes across it.

One uninterrupted run with two phases (seq 32 x batch 8, then seq 64 x batch 4: the same tokens
per step) is the reference. Copies of its run directory are cut back to an earlier checkpoint
(exactly at the boundary, and inside the second phase) and resumed; the resumed losses must equal the
reference's, step for step.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_parallel import make_config, tiny_overrides  # noqa: E402

PHASES = ("32:8:3", "64:4:3")


def _cfg(cache_dir):
    return make_config(tiny_overrides(cache_dir, **{
        "train.phases": PHASES, "train.steps": 6, "eval.every_steps": 3,
        "checkpoint.every_steps": 1, "checkpoint.keep": 10, "eval.batch_size": 4}))


def _records(workdir):
    return [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _cut_to(src: Path, dst: Path, step: int):
    """A copy of the run directory as if the run had died right after checkpoint ``step``."""
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > step:
            shutil.rmtree(d)
    lines = [l for l in (dst / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["step"] <= step]
    (dst / "metrics.jsonl").write_text("".join(l + "\n" for l in lines))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "btlm_parallel_cache"
    d.mkdir(exist_ok=True)
    return d


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    from btlm_jax.train.loop import train
    from btlm_jax.train.program import Program

    wd = tmp_path_factory.mktemp("phases") / "ref"
    out = train(_cfg(cache_dir), str(wd))
    assert out["complete"] and out["step"] == 6
    schedule = Program.from_config(_cfg(cache_dir)).lr_schedule
    lrs = [float(schedule(i)) for i in range(6)]
    return wd, lrs


@pytest.mark.slow
def test_phase_change_mid_run(reference):
    wd, lrs = reference
    rec = _records(wd)
    assert [r["step"] for r in rec] == [1, 2, 3, 4, 5, 6]
    assert [r["phase"] for r in rec] == [0, 0, 0, 1, 1, 1]
    # concat packing fills every row: 8 x 32 and 4 x 64 tokens per step, counted per source in
    # the train step
    assert all(r["num_tokens"] == 256 for r in rec), [r["num_tokens"] for r in rec]
    assert [sum(v for k, v in r.items() if k.startswith("tokens/")) for r in rec] == \
        [256 * s for s in range(1, 7)]
    # one LR schedule and one step counter across the phases
    np.testing.assert_allclose([r["lr"] for r in rec], lrs, rtol=1e-6)
    assert all(np.isfinite(r["loss"]) for r in rec)
    evals = [r for r in rec if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    ckpts = sorted(int(d.name) for d in (wd / "checkpoints").iterdir() if d.name.isdigit())
    assert ckpts == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("cut", [3, 5])  # exactly at the boundary, inside the second phase
def test_resume_across_phase_boundary(reference, cache_dir, tmp_path, cut):
    from btlm_jax.train.loop import train

    wd, _ = reference
    resumed = tmp_path / f"cut{cut}"
    _cut_to(wd, resumed, cut)
    out = train(_cfg(cache_dir), str(resumed))
    assert out["complete"]
    ref, got = _records(wd), _records(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr", "phase"):
        np.testing.assert_allclose([r[key] for r in got], [r[key] for r in ref], rtol=1e-6,
                                   err_msg=f"{key} after resuming from step {cut}")
    np.testing.assert_allclose([r["eval_loss"] for r in got if "eval_loss" in r],
                               [r["eval_loss"] for r in ref if "eval_loss" in r], rtol=1e-6)
