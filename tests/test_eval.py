"""Evaluation: position-interpolation slope scaling against the closed form, bucketed per-position
loss against NumPy, and `python -m btlm_jax.evaluate --json` end to end on a run directory built in
tmp_path (its loss checked against a direct forward pass)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from btlm_jax.config import default_config
from btlm_jax.eval.perplexity import bucket_edges, bucket_losses, pi_scale, train_length
from btlm_jax.models.alibi import alibi_bias
from btlm_jax.models.btlm import BTLM

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("length,train_len,on,want", [
    (512, 128, True, 4.0), (256, 128, True, 2.0), (200, 128, True, 1.5625),
    (128, 128, True, 1.0), (64, 128, True, 1.0), (512, 128, False, 1.0)])
def test_pi_scale_formula(length, train_len, on, want):
    assert pi_scale(length, train_len, on) == want


def test_pi_divides_slopes_in_the_attention_bias():
    n, length, train_len = 8, 24, 6
    s = pi_scale(length, train_len, True)
    pos = jnp.arange(length)[None]
    got = np.asarray(alibi_bias(n, pos, pos, s))[0]
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    for h in range(1, n + 1):
        m = 2.0 ** (-8.0 * h / n)  # ALiBi slope of head h, n a power of two
        want = np.where(j <= i, -(m * train_len / length) * (i - j), 0.0)
        np.testing.assert_allclose(got[h - 1], want, rtol=1e-6, atol=1e-6)


def test_train_length_prefers_model_key_then_longest_phase():
    c = default_config()
    c.train.seq_len = 256
    assert train_length(c) == 256
    c.train.phases, c.train.steps = ("128:8:10", "512:2:10"), 20
    assert train_length(c) == 512
    c.model.train_seq_len = 2048
    assert train_length(c) == 2048


def test_bucket_losses_match_numpy():
    rs = np.random.RandomState(0)
    length = 37
    sums, counts = rs.rand(length) * 10, rs.randint(0, 5, length).astype(float)
    edges = bucket_edges(length, 5)
    assert edges[0] == 0 and edges[-1] == length and len(edges) == 6
    got = bucket_losses(sums, counts, 5)
    for b, lo, hi in zip(got, edges[:-1], edges[1:]):
        assert (b["start"], b["end"]) == (lo, hi)
        assert b["loss"] == pytest.approx(sums[lo:hi].sum() / counts[lo:hi].sum())


def _write_corpus(root: Path):
    rs = np.random.RandomState(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    for split in ("train", "eval"):
        d = root / split
        d.mkdir(parents=True)
        with open(d / "part.jsonl", "w") as f:
            for src in ("SrcA", "SrcB"):
                for _ in range(6):
                    text = " ".join(rs.choice(words, 120))
                    f.write(json.dumps({"text": text, "meta": {"redpajama_set_name": src}}) + "\n")
    return str(root / "train" / "*.jsonl"), str(root / "eval" / "*.jsonl")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (config.json + Orbax checkpoint) of a small random model, bytes tokenizer."""
    from btlm_jax.train.program import Program
    from btlm_jax.train.run_dir import RunDir

    root = tmp_path_factory.mktemp("evalrun")
    train_glob, eval_glob = _write_corpus(root / "data")
    c = default_config()
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff = 257, 32, 2, 4, 64
    m.mup.base_d_model, m.mup.base_d_ff = 32, 64.0
    c.data.train, c.data.eval, c.data.tokenizer = train_glob, eval_glob, "bytes"
    c.data.cache_dir = str(root / "cache")
    c.train.seq_len, c.train.batch_size, c.train.steps = 32, 2, 1
    c.optim.warmup_steps = 0
    c.eval.batch_size, c.eval.num_batches = 2, 2
    c.checkpoint.async_save = False
    c.logging.tensorboard = c.logging.progress_bar = False
    wd = root / "run"
    run = RunDir.for_training(wd, c)
    state = Program.from_config(run.cfg).init_state()
    ckpt = run.checkpointer()
    ckpt.save(0, state, {"phase": None, "iterator": None, "tokens_per_source": {}}, force=True)
    ckpt.close()
    return wd, run, jax.device_get(state.params)


def test_evaluate_cli_json_and_plots(run_dir):
    wd, tr, params = run_dir
    out = subprocess.run(
        [sys.executable, "-m", "btlm_jax.evaluate", f"--workdir={wd}", "--lengths=32,64",
         "--position_interpolation=both", "--buckets=4", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])["results"]
    assert [(r["length"], r["position_interpolation"]) for r in res] == [
        (32, False), (32, True), (64, False), (64, True)]
    assert [r["pi_scale"] for r in res] == [1.0, 1.0, 1.0, 2.0]
    for r in res:
        assert set(r["per_source"]) == {"SrcA", "SrcB"}
        assert len(r["position_buckets"]) == 4
        assert Path(r["plot"]).is_file() and Path(r["plot"]).stat().st_size > 1000
    # the loss is the token mean of cross-entropy of a direct forward pass on the same batches
    from btlm_jax.data.pipeline import make_eval_batches

    model = BTLM(tr.cfg.model)
    for r in res:
        num = den = 0.0
        for b in make_eval_batches(tr.cfg, tr.tokenizer, seq_len=r["length"], batch_size=2,
                                   num_batches=2):
            logits = model.apply({"params": params}, jnp.asarray(b["inputs"]),
                                 jnp.asarray(b["segment_ids"]), jnp.asarray(b["positions"]),
                                 r["pi_scale"])
            ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.asarray(b["targets"])), np.float64)
            num += float((ce * b["loss_mask"]).sum())
            den += float(b["loss_mask"].sum())
        assert r["loss"] == pytest.approx(num / den, rel=1e-5)
        assert r["perplexity"] == pytest.approx(np.exp(num / den), rel=1e-5)
    assert res[2]["loss"] != res[3]["loss"]  # PI changes the 64-token evaluation


def test_evaluate_missing_run_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "btlm_jax.evaluate", f"--workdir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "config.json does not exist" in out.stderr
