"""Data pipeline throughput (the packed store) vs what training consumes.

Prints one table, measured in this run:

* store build: tokenize + pack the whole training corpus into a fresh store (tokens/s), with
  ``--workers`` tokenizer processes (0 = in process);
* store read: :class:`btlm_jax.data.pipeline.StepData` ``local_batch`` for one process reading
  the whole global batch of (a) the ``bench`` preset's step (1 x 512), (b) the ``tiny`` preset's
  (8 x 256) and (c) a 1B-class step (``cerebras_gpt_1p3b``: 528 x 2048), tokens/s, from a warm
  page cache (the store is memory-mapped);
* what a step consumes: the ``bench`` preset's jitted train step on this machine, measured
  (``--no_train`` skips it), and a 1B-class step on one accelerator, computed from model FLOPs:
  ``tokens/s = MFU x peak / train_flops_per_token`` at ``--mfu`` (default 0.4) of ``--peak_tflops``
  (default 989, an H100's dense bf16 peak).

    python benchmarks/data_pipeline.py                           # embedded sample corpus
    python benchmarks/data_pipeline.py --data='/data/SlimPajama/train/chunk1/*.jsonl.zst' --workers=8
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/


def _cfg(args, preset="tiny"):
    from configs import btlm as presets

    cfg = presets.get_config(preset)
    cfg.data.train = args.data
    cfg.data.eval = ""
    cfg.data.num_workers = args.workers
    cfg.data.packing = args.packing
    cfg.data.tokenizer = args.tokenizer
    if args.cache_dir:
        cfg.data.cache_dir = args.cache_dir
    return cfg


def bench_build(cfg, tok, seq_len, workers):
    """Builds the store into a fresh cache directory; returns the build statistics."""
    from btlm_jax.data import pipeline, store

    corpus = pipeline.load_corpus(cfg, pipeline.train_spec(cfg), "data.train")
    with tempfile.TemporaryDirectory() as d:
        return store.build(corpus, tok, os.path.join(d, "s"), seq_len=seq_len,
                           packing=cfg.data.packing, num_workers=workers)


def bench_read(cfg, tok, seq_len, batch, seconds):
    from btlm_jax.data import pipeline

    cfg.train.phases = ()
    cfg.train.seq_len, cfg.train.batch_size, cfg.train.steps = seq_len, batch, 10**9
    cfg.data.prefetch = 0  # time the read itself, not the overlap
    data = pipeline.StepData(cfg, tok)
    data.local_batch(0)  # opens (builds) the store, warms the page cache
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 3:
        b = data.local_batch(1000 + steps)
        tokens += b["inputs"].size
        steps += 1
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "step_ms": 1e3 * dt / steps}


def bench_train_step(args):
    """Tokens/s of the ``bench`` preset's jitted train step here (compile excluded)."""
    import functools

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from btlm_jax import optim
    from btlm_jax.models.btlm import BTLM
    from btlm_jax.train.step import TrainState, train_step
    from configs import btlm as presets

    cfg = presets.get_config("bench")
    model = BTLM(cfg.model)
    tx, sched = optim.build(cfg, cfg.train.steps)
    b, L = cfg.train.batch_size, cfg.train.seq_len
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, cfg.model.vocab_size, (b, L)).astype(np.int32),
             "targets": rng.integers(0, cfg.model.vocab_size, (b, L)).astype(np.int32),
             "loss_mask": np.ones((b, L), np.float32), "segment_ids": np.ones((b, L), np.int32),
             "positions": np.tile(np.arange(L, dtype=np.int32), (b, 1))}
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, lr_schedule=sched),
                   donate_argnums=(0,))
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(args.train_steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    return args.train_steps * b * L / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="", help="train glob (default: embedded sample corpus)")
    ap.add_argument("--tokenizer", default="", help="data.tokenizer (default: the tiny preset's "
                    "trained sentencepiece model, vocab 4096)")
    ap.add_argument("--cache_dir", default="")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--packing", default="concat")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--no_train", action="store_true", help="skip timing the bench train step")
    ap.add_argument("--train_steps", type=int, default=3)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    args = ap.parse_args()

    from btlm_jax.train import flops
    from btlm_jax.data import tokenizer
    from configs import btlm as presets

    cfg = _cfg(args)
    tok = tokenizer.load_or_train(cfg)
    rows = [("tokenizer", f"{tok.kind}, vocab {tok.vocab_size}")]
    build = bench_build(cfg, tok, 2048, args.workers)
    rows.append((f"store build, {args.packing}, workers={args.workers} (tokens/s)",
                 f"{build['tokens'] / build['seconds']:,.0f}  ({build['tokens']:,} tokens "
                 f"in {build['seconds']:.1f} s)"))
    reads = {}
    for name, (b, L) in {"bench": (1, 512), "tiny": (8, 256), "1B-class": (528, 2048)}.items():
        r = reads[name] = bench_read(_cfg(args), tok, L, b, args.seconds)
        rows.append((f"store read, {name} step {b} x {L} (tokens/s)",
                     f"{r['tokens_per_s']:,.0f}  ({r['step_ms']:.1f} ms/step)"))
    if not args.no_train:
        t = bench_train_step(args)
        rows.append(("bench train step consumes here (tokens/s, measured)", f"{t:,.1f}"))
        rows.append(("  read headroom vs bench step", f"{reads['bench']['tokens_per_s'] / t:,.0f}x"))
    big = presets.get_config("cerebras_gpt_1p3b").model
    need = args.mfu * args.peak_tflops * 1e12 / flops.train_flops_per_token(big, 2048)
    rows.append((f"1B-class step consumes per accelerator (tokens/s, {args.mfu:.0%} MFU of "
                 f"{args.peak_tflops:g} TFLOP/s, computed)", f"{need:,.0f}"))
    rows.append(("  read headroom vs one accelerator",
                 f"{reads['1B-class']['tokens_per_s'] / need:,.1f}x"))
    rows.append(("  build headroom vs one accelerator", f"{build['tokens'] / build['seconds'] / need:,.2f}x"))
    w = max(len(k) for k, _ in rows)
    print(f"{'measure':<{w}}  value")
    print("-" * (w + 30))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
