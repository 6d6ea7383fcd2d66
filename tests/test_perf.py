"""MFU accounting (btlm_jax.train.perf), FLOPs per token (btlm_jax.train.flops) and the train-step benchmark.

References are independent of the code under test: MFU by hand, FLOPs by walking the parameter
tree and by counting every ``dot_general`` in the forward pass's jaxpr.
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from btlm_jax.train import perf
from btlm_jax.config import default_config
from btlm_jax.train.flops import train_flops_per_token
from btlm_jax.models.btlm import BTLM

ROOT = Path(__file__).resolve().parents[1]


def small_model(**kw):
    m = default_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 96, 32, 3, 4, 88
    # model FLOPs count the logical model; the brute-force counts below count executed matmuls,
    # so the model is unpadded here (tests/test_padding.py: padding leaves model FLOPs alone)
    m.pad_multiple = 1
    for k, v in kw.items():
        m[k] = v
    return m


# ----- MFU arithmetic ----------------------------------------------------------------------------
def test_mfu_by_hand():
    m = small_model()
    seq = 16
    # by hand: per layer 4 d^2 (q, k, v, out) + 3 d ff (SwiGLU); tied output V d; 6x that,
    # plus causal attention 6 * layers * seq * d.
    n_mm = 3 * (4 * 32 * 32 + 3 * 32 * 88) + 96 * 32
    per_token = 6 * n_mm + 6 * 3 * 16 * 32
    assert per_token == 6 * 40704 + 9216 == 253440
    out = perf.mfu_metrics(2.5e6, m, seq, measured_peak=2.0, num_devices=4, nominal_peak=10.0)
    tflops = 2.5e6 * 253440 / 1e12
    assert out["model_tflops"] == pytest.approx(tflops, rel=1e-12)
    assert out["mfu_measured"] == pytest.approx(tflops / 8.0, rel=1e-12)
    assert out["mfu_nominal"] == pytest.approx(tflops / 40.0, rel=1e-12)


def test_mfu_keys_only_when_peaks_known():
    m = small_model()
    out = perf.mfu_metrics(1000.0, m, 16, measured_peak=None, num_devices=1, nominal_peak=None)
    assert set(out) == {"model_tflops"}
    # On this (CPU) machine the nominal peak is unknown, so only the measured one appears.
    out = perf.mfu_metrics(1000.0, m, 16, measured_peak=1.0)
    assert set(out) == ({"model_tflops", "mfu_measured"} if jax.default_backend() == "cpu"
                        else {"model_tflops", "mfu_measured", "mfu_nominal"})


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0), ("TPU v6 lite", 918.0),
    ("Some Future Chip", None),
])
def test_nominal_peak_table(kind, peak):
    dev = SimpleNamespace(platform="gpu" if "NVIDIA" in kind else "tpu", device_kind=kind)
    assert perf.nominal_peak_tflops(dev) == peak


def test_nominal_peak_cpu_is_unknown():
    assert perf.nominal_peak_tflops(jax.devices("cpu")[0]) is None


def test_matmul_probe_counts_flops():
    probe = perf.MatmulProbe("float32", n=64, chain=3)
    assert probe.flops == 2 * 64 ** 3 * 3
    assert probe.once() > 0
    assert perf.measure_matmul_peak("float32", n=64, repeats=3) > 0


# ----- FLOPs per token vs brute force ------------------------------------------------------------
def _param_tree_matmul_params(params) -> int:
    """Weights that multiply activations, read off the parameter tree: every kernel (stacked
    layers counted once per layer), plus the embedding table, which the tied output projection
    multiplies with."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] == "kernel" or (names[-1] == "embedding" and names[-2] == "embed"):
            total += int(np.prod(leaf.shape))
    return total


def _dot_flops(jaxpr) -> int:
    """2 x (output elements) x (contracted size) summed over every dot_general, scans expanded."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            contracted = math.prod(lhs[i] for i in lc)
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
        for name, sub in eqn.params.items():
            subs = sub if isinstance(sub, (list, tuple)) else [sub]
            for s in subs:
                inner = getattr(s, "jaxpr", s)
                if hasattr(inner, "eqns"):
                    mult = eqn.params["length"] if eqn.primitive.name == "scan" else 1
                    total += mult * _dot_flops(inner)
    return total


@pytest.mark.parametrize("scan_layers", [True, False])
def test_flops_per_token_vs_brute_force(scan_layers):
    m = small_model(scan_layers=scan_layers)
    batch, seq = 2, 16
    model = BTLM(m)
    tokens = jnp.zeros((batch, seq), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    n_mm = _param_tree_matmul_params(params)
    # Forward FLOPs from the jaxpr: every matmul, attention over the full L x L square.
    jaxpr = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(params, tokens).jaxpr
    fwd = _dot_flops(jaxpr)
    full_attention = fwd - 2 * n_mm * batch * seq
    assert full_attention == m.n_layers * batch * 4 * seq * seq * m.d_model
    # Training = 3 x forward, with causal attention counted at half.
    expected = (3 * (fwd - full_attention // 2)) / (batch * seq)
    assert train_flops_per_token(m, seq) == expected


def test_flops_per_token_gelu_untied_learned():
    m = small_model(activation="gelu", position="learned", tie_embeddings=False)
    model = BTLM(m)
    tokens = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"])
    # Untied: the lm_head kernel is the output matmul; the embedding table is a lookup only.
    n_mm = sum(int(np.prod(l.shape)) for p, l in jax.tree_util.tree_flatten_with_path(params)[0]
               if str(getattr(p[-1], "key", "")) == "kernel")
    assert train_flops_per_token(m, 8) == 6 * n_mm + 6 * m.n_layers * 8 * m.d_model


# ----- the benchmark script ----------------------------------------------------------------------
@pytest.mark.slow
def test_benchmark_json(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--json", "--steps=2",
           "--warmup=1", "--peak_n=128",
           "--config.model.d_model=64", "--config.model.n_layers=2", "--config.model.n_heads=2",
           "--config.model.d_ff=170", "--config.model.vocab_size=256",
           "--config.train.seq_len=32", "--config.train.batch_size=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("tokens_per_sec", "mfu_measured_peak", "step_time_s", "compile_time_s",
                "model_tflops", "measured_peak_tflops", "peak_memory_bytes"):
        assert key in r and r[key] is not None and r[key] > 0, key
    assert r["tokens_per_step"] == 64 and len(r["step_times_s"]) == 2
    assert r["tokens_per_sec"] == pytest.approx(64 / r["step_time_s"])
    assert r["flops_per_token"] == 6 * (2 * (4 * 64 * 64 + 3 * 64 * 170) + 256 * 64) \
        + 6 * 2 * 32 * 64
    assert math.isfinite(r["last_loss"])
