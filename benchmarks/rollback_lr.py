"""After a rollback, is the learning rate the one the schedule says? (issue 28)

A tiny 40-step D2Z run (peak 6e-3, warmup 5, a checkpoint every 5 steps) with
``train.on_divergence=rollback``, in which the loss of update 12 is made NaN once (the weights are
left alone). A wrapper around the train step reads the optimizer's update count before every
update, so the *applied* lr (``schedule(count)``) is known independently of what the run logs.
Prints, for the last steps, the logged lr, the applied lr and the D2Z value, and what
``metrics.jsonl`` holds around the rollback. Runs on code with or without
``train.rollback_back_steps`` (set to 0 here: restore the newest good checkpoint).

    python benchmarks/rollback_lr.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS, WARMUP, PEAK, BAD = 40, 5, 6e-3, 12


def main():
    import jax
    import jax.numpy as jnp

    from btlm_jax.train import program as program_mod
    from btlm_jax.train.loop import train
    from tests import helpers

    orig = program_mod.Program.counting_train_step
    applied: dict[int, float] = {}
    state_box = {"done": False}

    def wrapped(self, *a, **k):
        fn = orig(self, *a, **k)
        schedule = self.lr_schedule

        def step(state, batch):
            counts = [int(jax.device_get(v)) for p, v in jax.tree_util.tree_leaves_with_path(
                state.opt_state) if "count" in jax.tree_util.keystr(p)]
            s = int(jax.device_get(state.step))
            state, m = fn(state, batch)
            applied[s + 1] = float(schedule(counts[0]))
            if s + 1 == BAD and not state_box["done"]:
                state_box["done"] = True
                m = dict(m, loss=m["loss"] * jnp.nan)
            return state, m
        return step

    program_mod.Program.counting_train_step = wrapped
    with tempfile.TemporaryDirectory() as d:
        cache = os.environ.get("BTLM_JAX_CACHE") or str(Path(d) / "cache")
        over = {"train.steps": STEPS, "checkpoint.every_steps": 5, "optim.schedule": "d2z",
                "optim.peak_lr": PEAK, "optim.warmup_steps": WARMUP, "train.log_every_steps": 1,
                "train.on_divergence": "rollback", "eval.every_steps": 1000,
                "logging.measure_peak": False}
        cfg = helpers.small(cache, d_model=32, n_layers=1, d_ff=64, seq_len=32, **over)
        if "rollback_back_steps" in cfg.train:
            cfg.train.rollback_back_steps, cfg.train.rollback_skip_batches = 0, 0
        wd = Path(d) / "run"
        train(cfg, str(wd))
        rec = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    final = {r["step"]: r for r in rec if "diverged" not in r}

    def d2z(s):
        return PEAK * s / WARMUP if s < WARMUP else PEAK * (STEPS - s) / (STEPS - WARMUP)

    print(f"{'step':>5} {'logged lr':>11} {'applied lr':>11} {'D2Z lr':>11}")
    for s in (BAD + 2, 20, 30, 39, 40):
        print(f"{s:>5} {final[s]['lr']:>11.3g} {applied[s]:>11.3g} {d2z(s - 1):>11.3g}")
    steps = [(r["step"], "rollback" if "rollback" in r else
              "diverged" if "diverged" in r else "step") for r in rec]
    around = [x for x in steps if BAD - 3 <= x[0] <= BAD + 3]
    print("metrics.jsonl around the bad step, in file order:", around)
    dup = sorted({s for s, k in steps if k == "step" and [t for t, kk in steps
                                                          if kk == "step"].count(s) > 1})
    regular = sum(k == "step" for _, k in steps)
    print(f"steps logged twice: {dup or 'none'}; regular records {regular} for {STEPS} steps")


if __name__ == "__main__":
    main()
