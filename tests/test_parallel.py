"""Meshes: the same tiny run gives the same losses on every mesh (the weight-streaming layout
against the standard one, with and without accumulation: ``tests/test_streaming.py``).

The runs need 8 (fake) CPU devices, so they happen in a subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (this file doubles as that worker script:
``python tests/test_parallel.py MODE ...``); one subprocess runs all meshes in sequence so JAX
starts once. The single-device run is the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from tests.helpers import xla_flags  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
# float32 with different reduction orders (sharded matmuls, all-reduces) over a few Adam steps
RTOL = 2e-4


def tiny_overrides(cache_dir, **extra) -> dict:
    """Config overrides (on configs/btlm.py:tiny) shared by the workers and the CLI runs."""
    over = {
        "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.d_ff": 128, "model.mup.base_d_model": 64, "model.mup.base_d_ff": 128.0,
        "data.cache_dir": str(cache_dir), "train.seq_len": 32, "train.batch_size": 8,
        "train.steps": 4, "train.log_every_steps": 1, "optim.peak_lr": 1e-2,
        "optim.warmup_steps": 1, "eval.num_batches": 1, "eval.batch_size": 8,
        "eval.every_steps": 4, "logging.progress_bar": False, "logging.tensorboard": False,
        "checkpoint.async_save": False, "checkpoint.every_steps": 100,
    }
    over.update(extra)
    return over


def make_config(over: dict):
    sys.path.insert(0, str(ROOT))
    from configs.btlm import get_config

    c = get_config("tiny")
    for k, v in over.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = type(node[leaf])(v) if not isinstance(node[leaf], tuple) else v
    return c


def read_losses(workdir) -> dict:
    recs = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {"loss": [r["loss"] for r in recs], "grad_norm": [r["grad_norm"] for r in recs],
            "eval_loss": [r["eval_loss"] for r in recs if "eval_loss" in r],
            "steps": [r["step"] for r in recs], "phase": [r.get("phase") for r in recs]}


def spawn_worker(*args, devices=8, timeout=600):
    from tests.helpers import spawn_script

    return spawn_script(Path(__file__).resolve(), *args, devices=devices, timeout=timeout)


def assert_close(ref, got, what, rtol=RTOL):
    import numpy as np

    for key in ("loss", "grad_norm", "eval_loss"):
        a, b = np.asarray(ref[key]), np.asarray(got[key])
        assert a.shape == b.shape and a.size > 0, (what, key, ref[key], got[key])
        np.testing.assert_allclose(b, a, rtol=rtol, err_msg=f"{what}: {key}")


# ----------------------------------------------------------------------------------------------
# Worker modes (run in the subprocess).


def build(cfg, workdir, devices=None):
    """The program and data feed of a run (run directory written, no training loop)."""
    from btlm_jax.train.feed import TrainFeed
    from btlm_jax.train.program import Program
    from btlm_jax.train.run_dir import RunDir

    run = RunDir.for_training(workdir, cfg)
    program = Program.from_config(run.cfg, devices)
    return program, TrainFeed(run.cfg, run.tokenizer, program.phases, program.phase_of)


def drive(program, feed, steps):
    """Runs ``steps`` train steps and one evaluation with the program's compiled pieces (no
    checkpoint or metrics I/O: the loop itself is covered by the multi-host and phase tests)."""
    import jax

    from btlm_jax.train.loop import eval_metrics

    state = program.init_state()
    out = {"loss": [], "grad_norm": [], "steps": []}
    for i in range(steps):
        state, m = program.train_step(state, program.to_global(feed.next(i)))
        m = jax.device_get(m)
        out["loss"].append(float(m["loss"]))
        out["grad_norm"].append(float(m["grad_norm"]))
        out["steps"].append(i + 1)
    out["eval_loss"] = [eval_metrics(program, feed, state.params, program.phases[0][0])["eval_loss"]]
    return out, state


def _worker_meshes(out_json, cache_dir, root, layout="standard"):
    import jax

    assert len(jax.devices()) == 8, jax.devices()
    res = {}
    for mesh in MESHES:
        d, f, t = mesh
        over = tiny_overrides(cache_dir, **{"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t,
                                            "mesh.layout": layout})
        devices = jax.devices()[: d * f * t]
        wd = Path(root) / f"{layout}_{d}x{f}x{t}"
        with jax.default_device(devices[0]):
            res[str(mesh)], _ = drive(*build(make_config(over), wd, devices), 4)
    Path(out_json).write_text(json.dumps(res))


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"meshes": _worker_meshes}[mode](*rest)


# ----------------------------------------------------------------------------------------------
# Tests.

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.getbasetemp() / "btlm_parallel_cache"
    d.mkdir(exist_ok=True)
    return d


@pytest.mark.slow
def test_same_losses_on_every_mesh(cache_dir, tmp_path):
    out = tmp_path / "meshes.json"
    spawn_worker("meshes", out, cache_dir, tmp_path)
    res = json.loads(out.read_text())
    ref = res[str((1, 1, 1))]
    assert ref["steps"] == [1, 2, 3, 4] and len(ref["eval_loss"]) == 1
    assert ref["loss"][-1] < ref["loss"][0]  # it trains
    for mesh in MESHES[1:]:
        assert_close(ref, res[str(mesh)], f"mesh {mesh} vs 1 device")


def test_sharding_check_names_the_parameter():
    """n_heads not divisible by tensor, and a large replicated parameter, fail by name."""
    code = r"""
import jax, flax.linen as nn, jax.numpy as jnp, ml_collections as mc
from btlm_jax.models.btlm import BTLM
from btlm_jax.parallel import mesh as M
from btlm_jax.parallel.sharding import DEFAULT_RULES, parse_rules
import sys; sys.path.insert(0, '.')
from configs.btlm import get_config
def check(c, mesh, **kw):
    model = BTLM(c.model)
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32)), jax.random.PRNGKey(0))
    logical = nn.get_partition_spec(boxed)['params']
    params = nn.unbox(boxed)['params']
    m = M.make_mesh(mc.ConfigDict(dict(zip(('data', 'fsdp', 'tensor'), mesh))))
    rules = kw.pop('rules', parse_rules(DEFAULT_RULES))
    sh = M.logical_to_sharding(logical, m, rules)
    try:
        M.check_param_shardings(params, logical, sh, m, **kw)
        return 'ok'
    except M.ShardingError as e:
        return str(e)
c = get_config('tiny'); c.model.n_heads = 2
print('HEADS', check(c, (2, 1, 4)).replace(chr(10), ' | '))
c = get_config('tiny'); c.model.d_ff = 688
print('OK', check(c, (1, 2, 4)).replace(chr(10), ' | '))
rules = tuple((k, None if k == 'mlp' else v) for k, v in parse_rules(DEFAULT_RULES))
print('REPL', check(c, (2, 1, 4), rules=rules, min_elements=1 << 16).replace(chr(10), ' | '))
c = get_config('3b_8k'); c.model.pad_multiple = 1
print('VOCAB', check(c, (1, 2, 4)).replace(chr(10), ' | '))
c.model.pad_multiple = 128  # the default: 50257 -> 50304 splits over 4 (and 128) devices
print('PADDED', check(c, (1, 2, 4)).replace(chr(10), ' | '))
"""
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {l.split(" ", 1)[0]: l for l in out.stdout.splitlines() if " " in l}
    assert "layers/attn/query/kernel" in lines["HEADS"]
    assert "model.n_heads" in lines["HEADS"] and "mesh.tensor=4" in lines["HEADS"]
    assert lines["OK"] == "OK ok"
    assert "layers/mlp/wi_0/kernel" in lines["REPL"] and "replicated" in lines["REPL"]
    assert "embed/embedding" in lines["VOCAB"] and "model.vocab_size" in lines["VOCAB"]
    assert lines["PADDED"] == "PADDED ok"
