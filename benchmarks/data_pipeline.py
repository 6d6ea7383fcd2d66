"""Input pipeline throughput vs what training consumes.

Prints one table, measured in this run:

* the full Grain pipeline (read, shuffle, tokenize, pack, mix, batch): documents/s and tokens/s;
* raw sentencepiece ``encode`` throughput on the same documents (one process);
* the tokens/s a training step consumes on this machine for the ``tiny`` preset (and, with
  ``--big=PRESET``, a 1B-class preset such as ``cerebras_gpt_1p3b``), via ``btlm_jax.train``.

The pipeline must produce tokens faster than the step consumes them.

    python benchmarks/data_pipeline.py                      # sample corpus, tiny
    python benchmarks/data_pipeline.py --data='/data/SlimPajama/train/chunk1/*.jsonl.zst' \
        --workers=4 --big=cerebras_gpt_1p3b
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for configs/


def _cfg(args):
    from configs import btlm as presets

    cfg = presets.get_config("tiny")
    cfg.data.train = args.data
    cfg.data.eval = ""
    cfg.data.num_workers = args.workers
    cfg.data.packing = args.packing
    if args.cache_dir:
        cfg.data.cache_dir = args.cache_dir
    return cfg


def bench_pipeline(cfg, tok, seq_len, batch_size, seconds):
    from btlm_jax.data import pipeline

    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(cfg, tok, seq_len=seq_len, batch_size=batch_size)
    next(it)
    startup = time.perf_counter() - t0
    tokens, batches, eos = 0, 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = next(it)
        tokens += int(b["loss_mask"].sum())
        eos += int(((b["targets"] == tok.eos_id) * b["loss_mask"]).sum())  # one per document
        batches += 1
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return {"startup_s": startup, "tokens_per_s": tokens / dt, "docs_per_s": eos / dt,
            "batches": batches}


def bench_sentencepiece(cfg, tok, seconds):
    from btlm_jax.data import pipeline

    corpus = pipeline.load_corpus(cfg, pipeline.train_spec(cfg), "data.train")
    order = np.random.default_rng(0).permutation(len(corpus))
    texts = [corpus.text(int(i)) for i in order[:2000]]
    tokens, docs = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for k in range(0, len(texts), 32):
            tokens += sum(len(x) for x in tok.encode_batch(texts[k:k + 32]))
            docs += len(texts[k:k + 32])
            if time.perf_counter() - t0 >= seconds:
                break
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "docs_per_s": docs / dt}


def bench_train_step(preset, args, steps=5):
    """Tokens/s of the jitted train step (compile excluded), or a reason string."""
    try:
        from btlm_jax.train.loop import Trainer
        from configs import btlm as presets
    except ImportError as e:
        return f"btlm_jax.train not available ({e})"
    import jax

    cfg = presets.get_config(preset)
    cfg.data.train = args.data
    cfg.data.eval = ""
    if args.cache_dir:
        cfg.data.cache_dir = args.cache_dir
    if preset != "tiny":
        cfg.train.batch_size, cfg.train.seq_len = args.big_batch, args.big_seq_len
        cfg.train.phases = ()
        cfg.optim.warmup_steps = 0
    cfg.logging.tensorboard = False
    cfg.logging.progress_bar = False
    cfg.checkpoint.async_save = False
    try:
        with tempfile.TemporaryDirectory() as wd:
            tr = Trainer(cfg, wd)
            state = tr.init_state()
            it = tr.make_iterator(0)
            batch = tr.to_global(next(it))
            state, m = tr.train_step(state, batch)  # compile
            jax.block_until_ready(m)
            t0 = time.perf_counter()
            toks = 0
            for _ in range(steps):
                local = next(it)
                state, m = tr.train_step(state, tr.to_global(local))
                toks += int(local["loss_mask"].sum())
            jax.block_until_ready(m)
            return toks / (time.perf_counter() - t0)
    except Exception as e:  # report, do not crash the table (e.g. out of memory for big models)
        return f"failed: {type(e).__name__}: {str(e)[:120]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="", help="train glob (default: embedded sample corpus)")
    ap.add_argument("--cache_dir", default="")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--packing", default="concat")
    ap.add_argument("--seq_len", type=int, default=256)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--big", default="", help="also time a 1B-class preset, e.g. cerebras_gpt_1p3b")
    ap.add_argument("--big_batch", type=int, default=1)
    ap.add_argument("--big_seq_len", type=int, default=512)
    ap.add_argument("--no_train", action="store_true", help="skip the train-step columns")
    args = ap.parse_args()

    from btlm_jax.data import tokenizer

    cfg = _cfg(args)
    t0 = time.perf_counter()
    tok = tokenizer.load_or_train(cfg)
    tok_s = time.perf_counter() - t0
    pipe = bench_pipeline(cfg, tok, args.seq_len, args.batch_size, args.seconds)
    sp = bench_sentencepiece(cfg, tok, args.seconds)
    rows = [
        ("tokenizer load/train (s)", f"{tok_s:.2f}"),
        ("pipeline startup to first batch (s)", f"{pipe['startup_s']:.2f}"),
        (f"pipeline docs/s (workers={args.workers}, {args.packing})", f"{pipe['docs_per_s']:,.0f}"),
        ("pipeline tokens/s", f"{pipe['tokens_per_s']:,.0f}"),
        ("raw sentencepiece docs/s (1 process)", f"{sp['docs_per_s']:,.0f}"),
        ("raw sentencepiece tokens/s (1 process)", f"{sp['tokens_per_s']:,.0f}"),
    ]
    if not args.no_train:
        for preset in ["tiny"] + ([args.big] if args.big else []):
            r = bench_train_step(preset, args)
            val = f"{r:,.0f}" if isinstance(r, float) else r
            rows.append((f"train step tokens/s consumed ({preset})", val))
            if isinstance(r, float):
                rows.append((f"  pipeline headroom vs {preset}", f"{pipe['tokens_per_s'] / r:.1f}x"))
    w = max(len(k) for k, _ in rows)
    print(f"{'measure':<{w}}  value")
    print("-" * (w + 16))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


if __name__ == "__main__":
    main()
