"""Weight streaming (``mesh.layout=weight_streaming``): memory flat in depth, one host copy of the
state sharded over the devices, the streamed optimizer update equal to optax's, and the same
losses and evaluation as the standard layout.

Multi-device checks run in a subprocess with fake CPU devices (this file doubles as the worker:
``python tests/test_streaming.py MODE OUT_JSON ...``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(preset="tiny", **over):
    from tests.helpers import preset as build

    return build(preset, **over)


def _tiny_run(cache_dir, **extra):
    """test_parallel's tiny run, 10 steps on 4 devices with clipping active every step."""
    from tests.test_parallel import tiny_overrides

    over = {"train.steps": 10, "optim.grad_clip": 0.05, "eval.every_steps": 10,
            "checkpoint.every_steps": 10, "mesh.data": 4, **extra}
    return _config("tiny", **tiny_overrides(cache_dir, **over))


# ----------------------------------------------------------------------------------------------
# Worker modes (run in the subprocess).


def _worker_memory(out_json):
    """AOT memory of the train step at 4 and 16 layers in both layouts (8 fake devices), at the
    ``bench`` preset's width (d_model 1024), where the stacks that grow with depth are large
    enough to show (at ``tiny`` width fixed costs hide them)."""
    import jax

    from btlm_jax.train import aot

    assert len(jax.devices()) == 8
    res = {}
    for layout in ("weight_streaming", "standard"):
        for layers in (4, 16):
            c = _config("bench", **{"model.n_layers": layers, "mesh.layout": layout,
                                   "train.seq_len": 512, "train.batch_size": 8})
            info = aot.train_step_memory(c, (8, 1, 1), seq_len=512, batch_size=8)
            info["state_bytes_total"] = _state_bytes(c)
            res[f"{layout}_{layers}"] = info
    Path(out_json).write_text(json.dumps(res))


def _state_bytes(cfg) -> int:
    """Bytes of one full replica of parameters + optimizer state (from shapes alone)."""
    import jax

    from btlm_jax.train.program import Program

    import ml_collections
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.mesh.layout, c.mesh.data = "standard", 1
    prog = Program.from_config(c, jax.devices()[:1])
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(prog.abstract_state))


def _worker_runs(out_json, cache_dir, root):
    """10-step tiny runs (4 devices), clipping active: standard, and weight streaming with
    grad_accum 1 and 2 (the standard layout's accumulation equality is tested in
    test_parallel.py); then ``evaluate``'s path (load_run -> Evaluator), greedy generation and
    export on the grad_accum 1 run directories."""
    import jax

    from btlm_jax.convert.workdir import export_checkpoint
    from btlm_jax.eval.perplexity import Evaluator
    from btlm_jax.eval.sampling import Generator, SamplingConfig
    from btlm_jax.eval.session import load_run
    from btlm_jax.train.loop import train

    assert len(jax.devices()) == 4
    res = {}
    for layout, accum in (("standard", 1), ("weight_streaming", 1), ("weight_streaming", 2)):
        wd = Path(root) / f"{layout}_{accum}"
        train(_tiny_run(cache_dir, **{"mesh.layout": layout,
                                      "train.grad_accum_steps": accum}), str(wd))
        recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
        out = {"loss": [r["loss"] for r in recs if "loss" in r],
               "grad_norm": [r["grad_norm"] for r in recs if "grad_norm" in r]}
        if accum == 1:
            run = load_run(str(wd))
            out["memory_kinds"] = sorted({str(x.sharding.memory_kind)
                                          for x in jax.tree_util.tree_leaves(run.params)})
            ev = Evaluator(run)
            tot = ev.evaluate(32, 1.0)
            out["evaluate_loss"] = float(tot["loss_sum"] / tot["count"])
            gen = Generator(run.model, run.params)
            out["generated"] = gen.generate([[1, 2, 3, 4], [5, 6]],
                                            SamplingConfig(max_new_tokens=4, temperature=0))
            exported = export_checkpoint(str(wd), str(Path(root) / f"export_{layout}"))
            out["exported"] = sorted(p.name for p in Path(exported).iterdir())
        res[f"{layout}_{accum}"] = out
    Path(out_json).write_text(json.dumps(res))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"memory": _worker_memory, "runs": _worker_runs}[mode](*rest)


# ----------------------------------------------------------------------------------------------
# Tests.


def _spawn(*args, devices, timeout=900):
    from tests.helpers import spawn_script

    return spawn_script(Path(__file__).resolve(), *args, devices=devices, timeout=timeout)


@pytest.mark.parametrize("name", ["adamw", "adamw_ema"])
def test_streamed_update_equals_optax(name):
    """The layer-by-layer update (clip factor from the global norm, then the configured tx per
    layer slice) equals optax's one-shot chain(clip_by_global_norm, adamw) over two steps, with
    clipping active and muP groups; the norms equal a float64 NumPy computation."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from btlm_jax import optim
    from btlm_jax.models.btlm import BTLM
    from btlm_jax.optim.streamed import streamed_update

    c = _config("tiny", **{"model.n_layers": 3, "model.d_model": 64, "model.d_ff": 96,
                           "model.vocab_size": 128, "model.mup.base_d_model": 32,
                           "optim.grad_clip": 0.05, "optim.name": name})
    tx, _ = optim.build(c, 100)
    params = nn.unbox(BTLM(c.model).init(jax.random.PRNGKey(0),
                                         jnp.zeros((1, 8), jnp.int32))["params"])
    state = tx.init(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(1), 100))
    grads = jax.tree_util.tree_map(lambda p: 3.0 * jax.random.normal(next(keys), p.shape), params)
    count = jnp.float32(7.0)
    update = jax.jit(streamed_update(tx, c.optim.grad_clip, load=lambda x: x, store=lambda x: x))

    @jax.jit
    def reference(p, s):
        u, s = tx.update(jax.tree_util.tree_map(lambda x: x / count, grads), s, p)
        return optax.apply_updates(p, u), s

    p_ref, s_ref, p_got, s_got = params, state, params, state
    for _ in range(2):
        p_ref, s_ref = reference(p_ref, s_ref)
        p_got, s_got, g_norm, p_norm = update(p_got, s_got, grads, count)
        g64 = [np.asarray(x, np.float64) / 7.0 for x in jax.tree_util.tree_leaves(grads)]
        np.testing.assert_allclose(float(g_norm), np.sqrt(sum((x ** 2).sum() for x in g64)),
                                   rtol=1e-5)
        np.testing.assert_allclose(float(p_norm), np.sqrt(sum(
            (np.asarray(x, np.float64) ** 2).sum() for x in jax.tree_util.tree_leaves(p_ref))),
            rtol=1e-5)
    assert float(g_norm) > 10 * c.optim.grad_clip  # clipping is active
    assert jax.tree_util.tree_structure(s_got) == jax.tree_util.tree_structure(s_ref)
    for a, b in zip(jax.tree_util.tree_leaves((p_ref, s_ref)),
                    jax.tree_util.tree_leaves((p_got, s_got))):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(p_ref), jax.tree_util.tree_leaves(params)))
    assert moved > 1e-4  # the parameters did change


@pytest.mark.slow
def test_streamed_memory_flat_in_depth_and_host_state_sharded(tmp_path):
    """AOT on 8 CPU devices, ``bench`` preset, seq 512, default remat (none): the streamed step's
    device memory grows at most 1.5x from 4 to 16 layers while the standard layout's grows ~linearly;
    each device holds 1/8 of the state in host memory. (Before the per-layer move was fenced off
    from the stack, XLA:CPU relaid out each whole parameter stack for the all-gather: 1.66x.)"""
    out = tmp_path / "memory.json"
    _spawn("memory", out, devices=8)
    res = json.loads(out.read_text())
    ws4, ws16 = res["weight_streaming_4"], res["weight_streaming_16"]
    st4, st16 = res["standard_4"], res["standard_16"]
    ws_ratio = ws16["device_total_bytes"] / ws4["device_total_bytes"]
    st_ratio = st16["device_total_bytes"] / st4["device_total_bytes"]
    assert ws_ratio <= 1.5, (ws_ratio, ws4["device_total_bytes"], ws16["device_total_bytes"])
    assert st_ratio >= 2.5, st_ratio  # 4x the layers: the standard layout grows ~linearly
    for info in (ws4, ws16):
        assert info["state_bytes_per_device_on_device"] == 4  # the step counter
        host = info["state_bytes_per_device_in_host_memory"]
        assert host <= info["state_bytes_total"] / 5, (host, info["state_bytes_total"])
        # one copy over the 8 devices (only a few small leaves stay replicated)
        assert host <= info["state_bytes_total"] / 8 * 1.05


@pytest.mark.slow
def test_streamed_runs_equal_standard_and_evaluate(tmp_path_factory, tmp_path):
    """4 devices, 10 steps, clipping active: weight streaming's losses and grad norms equal the
    standard layout's with and without gradient accumulation; evaluate's path on the streamed
    run directory gives the standard run's loss; generate and export work on it."""
    cache = tmp_path_factory.getbasetemp() / "btlm_streaming_cache"
    cache.mkdir(exist_ok=True)
    out = tmp_path / "runs.json"
    _spawn("runs", out, cache, tmp_path, devices=4)
    res = json.loads(out.read_text())
    ref = res["standard_1"]
    assert len(ref["loss"]) == 10 and ref["loss"][-1] < ref["loss"][0]
    assert min(ref["grad_norm"]) > 0.05  # optim.grad_clip=0.05 clips every step
    for accum in (1, 2):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(res[f"weight_streaming_{accum}"][key], ref[key],
                                       rtol=2e-4, err_msg=f"grad_accum_steps={accum}: {key}")
    ws = res["weight_streaming_1"]
    assert ws["memory_kinds"] == ["pinned_host"] and ref["memory_kinds"] == ["device"]
    np.testing.assert_allclose(ws["evaluate_loss"], ref["evaluate_loss"], rtol=2e-4)
    assert ws["generated"] == ref["generated"] and len(ref["generated"][0]) == 4
    assert ws["exported"] == ref["exported"] and "config.json" in ws["exported"]
