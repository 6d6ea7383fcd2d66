"""Data pipeline throughput: the Grain chain beside the previous read path, vs what a step consumes.

Prints tables, measured in this run:

* store build: tokenize + pack the whole training corpus into a fresh store (tokens/s), with
  ``--workers`` Grain worker processes (0 = in process);
* read: the global batch of a step read by one process (page cache warm, no prefetch), for
  (a) the ``bench`` preset's step (1 x 512), (b) the ``tiny`` preset's (8 x 256) and (c) a
  1B-class step (``cerebras_gpt_1p3b``: 528 x 2048), tokens/s, two ways side by side:
  ``grain``, this tree's chain of ``grain.MapDataset``s (``StepData.dataset()[i]``), and
  ``before``, the read path of ``--baseline`` (default ``80d20b4``, the commit before the Grain
  chain: ``StepData.local_batch``), extracted with ``git archive`` into a temporary directory and
  run in a subprocess on the same store; the two alternate for ``--rounds`` rounds and the best
  round of each is shown (the machine is shared); ``--same_batches`` also compares every batch
  of 12 runs (both packings, phases, rollbacks, 1 and 2 processes) under both trees;
* the Grain reader (``StepData.reader``: ``data.prefetch`` threads, ``data.num_workers``
  processes) over the 1B-class steps, as the training feed reads them;
* what a step consumes: the ``bench`` preset's jitted train step on this machine, measured
  (``--no_train`` skips it), and a 1B-class step on one accelerator, computed from model FLOPs:
  ``tokens/s = MFU x peak / train_flops_per_token`` at ``--mfu`` (default 0.4) of ``--peak_tflops``
  (default 989, an H100's dense bf16 peak);
* the epoch order: Grain's ``index_shuffle`` per entry against a NumPy permutation per unit (the
  reason ``UnitOrder`` uses NumPy up to 4M units);
* the mixture: how far ``grain.MapDataset.mix`` and our interleave stray from the weights (the
  reason the chain mixes with ``select_from_datasets`` and our selection map).

    python benchmarks/data_pipeline.py                           # embedded sample corpus
    python benchmarks/data_pipeline.py --data='/data/SlimPajama/train/chunk1/*.jsonl.zst' \\
        --workers=8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for configs/

STEPS = {"bench": (1, 512), "tiny": (8, 256), "1B-class": (528, 2048)}


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


def _read_cfg(cfg, seq_len, batch):
    cfg.train.phases = ()
    cfg.train.seq_len, cfg.train.batch_size, cfg.train.steps = seq_len, batch, 10**6
    cfg.data.prefetch = 0  # time the read itself, not the overlap
    return cfg


def _time(read, seconds):
    """tokens/s and ms/step of ``read(i)`` for steps 1000, 1001, ... over ``seconds``."""
    read(0)  # opens the store, warms the page cache
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 3:
        tokens += read(1000 + steps)["inputs"].size
        steps += 1
    dt = time.perf_counter() - t0
    return {"tokens_per_s": tokens / dt, "step_ms": 1e3 * dt / steps}


def before_script(baseline_dir: str) -> str:
    """The previous read path, timed like :func:`_time`, run from the baseline tree."""
    return f"""
import json, sys, time
sys.path.insert(0, {baseline_dir!r})
from configs import btlm as presets
from btlm_jax.data import pipeline, tokenizer
a = json.loads(sys.argv[1])
cfg = presets.get_config("tiny")
for k, v in a["data"].items():
    cfg.data[k] = v
cfg.train.phases = ()
cfg.train.seq_len, cfg.train.batch_size, cfg.train.steps = a["seq_len"], a["batch"], 10**6
cfg.data.prefetch = 0
tok = tokenizer.load_or_train(cfg)
data = pipeline.StepData(cfg, tok)
import hashlib
digest = hashlib.sha256(b"".join(data.local_batch(i)[k].tobytes() for i in (0, 1, 7)
                                 for k in sorted(pipeline.FIELDS))).hexdigest()
tokens, steps = 0, 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < a["seconds"] or steps < 3:
    tokens += data.local_batch(1000 + steps)["inputs"].size
    steps += 1
dt = time.perf_counter() - t0
print(json.dumps({{"tokens_per_s": tokens / dt, "step_ms": 1e3 * dt / steps,
                  "digest": digest}}))
"""


# Every local batch of 80-step runs, hashed: concat and document packing, two phases with two
# rollbacks and one phase, 1 and 2 processes (both halves). Run under both trees (--same_batches).
SAME_BATCHES = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
from configs import btlm as presets
from btlm_jax.data import pipeline, tokenizer
from btlm_jax.data.positions import Rollback
out = {}
for packing in ("concat", "document"):
    for phases, rbs in ((("256:8:40", "1024:2:40"), [(50, 30, 5), (60, 55, 0)]), ((), [])):
        cfg = presets.get_config("tiny")
        cfg.data.train = cfg.data.eval = ""
        cfg.data.cache_dir = sys.argv[2]
        cfg.data.packing, cfg.data.prefetch = packing, 0
        cfg.train.phases, cfg.train.steps = phases, 80 if phases else 50
        cfg.data.mixture = "PydocTopics=0.2,PythonDocstrings=0.3,PythonStdlibCode=0.5"
        tok = tokenizer.load_or_train(cfg)
        for P in (1, 2):
            for p in range(P):
                d = pipeline.StepData(cfg, tok, p, P, rollbacks=[Rollback(*r) for r in rbs])
                h = hashlib.sha256()
                for i in range(cfg.train.steps):
                    b = d.local_batch(i)
                    for k in sorted(pipeline.FIELDS):
                        h.update(b[k].tobytes())
                out[f"{packing}, phases {phases or 'one'}, process {p} of {P}"] = h.hexdigest()
print(json.dumps(out))
"""


def same_batches(tree: str, cache_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SAME_BATCHES, tree, cache_dir],
                         capture_output=True, text=True, env=env, cwd=tree)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def extract_baseline(rev: str, into: str) -> str:
    """``git archive REV btlm_jax configs`` unpacked into ``into``; returns the directory."""
    tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "btlm_jax", "configs"],
                         capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=tar, check=True)
    return into


def bench_before(baseline_dir, cfg, seq_len, batch, seconds):
    a = {"data": {k: cfg.data[k] for k in ("train", "eval", "num_workers", "packing", "tokenizer",
                                           "cache_dir")},
         "seq_len": seq_len, "batch": batch, "seconds": seconds}
    env = dict(os.environ, PYTHONPATH=baseline_dir, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", before_script(baseline_dir), json.dumps(a)],
                         capture_output=True, text=True, env=env, cwd=baseline_dir)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_grain(cfg, tok, seq_len, batch, seconds):
    from btlm_jax.data import pipeline

    ds = pipeline.StepData(_read_cfg(cfg, seq_len, batch), tok).dataset()
    digest = hashlib.sha256(b"".join(ds[i][k].tobytes() for i in (0, 1, 7)
                                     for k in sorted(pipeline.FIELDS))).hexdigest()
    return dict(_time(lambda i: ds[i], seconds), digest=digest)


def bench_reader(cfg, tok, seq_len, batch, seconds, prefetch, workers):
    """The training feed's way: Grain's iterator from step 1000, warm (first batch excluded)."""
    from btlm_jax.data import pipeline

    data = pipeline.StepData(_read_cfg(cfg, seq_len, batch), tok)
    it = data.reader(1000, prefetch=prefetch, workers=workers)
    next(it)
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds or steps < 3:
        tokens += next(it)["inputs"].size
        steps += 1
    dt = time.perf_counter() - t0
    it.close()
    return {"tokens_per_s": tokens / dt, "step_ms": 1e3 * dt / steps}


def bench_build(cfg, tok, seq_len, workers):
    """Builds the store into a fresh cache directory; returns the build statistics."""
    from btlm_jax.data import pipeline, store

    corpus = pipeline.load_corpus(cfg, pipeline.train_spec(cfg), "data.train")
    with tempfile.TemporaryDirectory() as d:
        return store.build(corpus, tok, os.path.join(d, "s"), seq_len=seq_len,
                           packing=cfg.data.packing, num_workers=workers)


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


def mixture_deviation(weights, rows: int = 20000) -> tuple[float, float, float]:
    """Max |rows of a source among the first h - w_s h| over h < ``rows``: Grain's
    ``MapDataset.mix`` selection, our interleave; and Grain's gap at ``rows``."""
    from grain._src.python.dataset.transformations import mix

    from btlm_jax.data.mixtures import Interleave

    share = np.asarray(weights, float) / sum(weights)
    props = tuple(mix._float_to_int_proportions(list(weights)))
    count, worst = np.zeros(len(weights)), 0.0
    for h in range(rows):
        s, _ = mix._dataset_and_key_of_next_element(h, props)
        count[s] += 1
        worst = max(worst, float(np.abs(count - share * (h + 1)).max()))
    gap = float(np.abs(count - share * rows).max())
    il = Interleave(weights)
    ours = max(float(np.abs(np.asarray(il.counts_before(h)) - share * h).max())
               for h in range(0, rows + 1, 7))
    return worst, ours, gap


def shuffle_costs() -> list[list[str]]:
    """Microseconds per unit of an epoch order: Grain's index_shuffle entry by entry, and a whole
    NumPy permutation divided by its length (why UnitOrder uses NumPy up to 4M units)."""
    from grain.experimental import index_shuffle

    rows = []
    for n in (10, 1000, 10**6):
        m = min(n, 2000)
        t0 = time.perf_counter()
        for k in range(m):
            index_shuffle(k, max_index=n - 1, seed=3, rounds=4)
        grain_us = 1e6 * (time.perf_counter() - t0) / m
        t0 = time.perf_counter()
        np.random.default_rng((3, 0)).permutation(n)
        numpy_us = 1e6 * (time.perf_counter() - t0) / n
        rows.append([f"{n:,}", f"{grain_us:,.1f}", f"{numpy_us:,.3f}"])
    return rows


def table(title, header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(f"{h:<{w}}" for h, w in zip(header, widths)))
    print("-" * (sum(widths) + 2 * len(widths)))
    for r in rows:
        print("  ".join(f"{str(c):<{w}}" for c, w in zip(r, widths)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="", help="train glob (default: embedded sample corpus)")
    ap.add_argument("--tokenizer", default="", help="data.tokenizer (default: the tiny preset's "
                    "trained sentencepiece model, vocab 4096)")
    ap.add_argument("--cache_dir", default="")
    ap.add_argument("--workers", type=int, default=0, help="Grain worker processes (build and "
                    "the reader row)")
    ap.add_argument("--packing", default="concat")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds before/grain")
    ap.add_argument("--baseline", default="80d20b4", help="git revision of the previous read "
                    "path ('' skips it)")
    ap.add_argument("--no_train", action="store_true", help="skip timing the bench train step")
    ap.add_argument("--same_batches", action="store_true", help="also hash every batch of 12 "
                    "runs (packings, phases, rollbacks, process counts) under both trees")
    ap.add_argument("--train_steps", type=int, default=3)
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--peak_tflops", type=float, default=989.0)
    args = ap.parse_args()

    from btlm_jax.data import tokenizer
    from btlm_jax.train import flops
    from configs import btlm as presets

    cfg = _cfg(args)
    tok = tokenizer.load_or_train(cfg)
    print(f"tokenizer {tok.kind}, vocab {tok.vocab_size}; packing {args.packing}; "
          f"baseline {args.baseline or '-'}; {args.rounds} rounds x {args.seconds:g} s")
    build = bench_build(cfg, tok, 2048, args.workers)

    best: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = extract_baseline(args.baseline, tmp) if args.baseline else None
        for _ in range(args.rounds):
            for name, (b, L) in STEPS.items():
                runs = [("grain", lambda: bench_grain(_cfg(args), tok, L, b, args.seconds))]
                if base:
                    runs.insert(0, ("before", lambda: bench_before(base, _cfg(args), L, b,
                                                                   args.seconds)))
                for how, fn in runs:
                    r = fn()
                    key = (name, how)
                    if key not in best or r["tokens_per_s"] > best[key]["tokens_per_s"]:
                        best[key] = r
        same = None
        if base and args.same_batches:
            from btlm_jax.data import pipeline

            cdir = pipeline.cache_dir(_cfg(args))
            old, new = same_batches(base, cdir), same_batches(ROOT, cdir)
            same = [[k, "yes" if new[k] == v else "NO"] for k, v in old.items()]
    rows = []
    for name, (b, L) in STEPS.items():
        g = best[(name, "grain")]
        row = [f"{name} {b} x {L}", f"{g['tokens_per_s']:,.0f} ({g['step_ms']:.1f} ms)"]
        if base:
            o = best[(name, "before")]
            row += [f"{o['tokens_per_s']:,.0f} ({o['step_ms']:.1f} ms)",
                    f"{g['tokens_per_s'] / o['tokens_per_s']:.2f}x",
                    "yes" if g["digest"] == o["digest"] else "NO"]
        rows.append(row)
    table("read: global batch of one step, one process, no prefetch (tokens/s, best round)",
          ["step", "grain chain", "before"][:3 if base else 2] +
          (["grain/before", "same batches"] if base else []),
          rows)
    if same:
        table(f"every batch of 12 runs, grain chain vs {args.baseline}", ["run", "same batches"],
              same)

    b, L = STEPS["1B-class"]
    reader = []
    for prefetch, workers in ((0, 0), (2, 0), (2, max(args.workers, 2))):
        r = bench_reader(_cfg(args), tok, L, b, args.seconds, prefetch, workers)
        reader.append([f"prefetch={prefetch} num_workers={workers}",
                       f"{r['tokens_per_s']:,.0f} ({r['step_ms']:.1f} ms)"])
    table(f"Grain reader over the 1B-class steps ({b} x {L}), as the feed reads them",
          ["data.*", "tokens/s"], reader)

    rows = [[f"store build, {args.packing}, workers={args.workers}",
             f"{build['tokens'] / build['seconds']:,.0f} tokens/s ({build['tokens']:,} tokens "
             f"in {build['seconds']:.1f} s)"]]
    g_bench = best[("bench", "grain")]["tokens_per_s"]
    if not args.no_train:
        t = bench_train_step(args)
        rows.append(["bench train step consumes here (measured)", f"{t:,.1f} tokens/s"])
        rows.append(["  grain read vs bench step (bench 1 x 512 read)", f"{g_bench / t:,.0f}x"])
    big = presets.get_config("cerebras_gpt_1p3b").model
    need = args.mfu * args.peak_tflops * 1e12 / flops.train_flops_per_token(big, 2048)
    rows.append([f"1B-class step per accelerator ({args.mfu:.0%} MFU of {args.peak_tflops:g} "
                 "TFLOP/s, computed)", f"{need:,.0f} tokens/s"])
    g_big = best[("1B-class", "grain")]["tokens_per_s"]
    rows.append(["  grain read vs one accelerator", f"{g_big / need:,.1f}x"])
    rows.append(["  build vs one accelerator",
                 f"{build['tokens'] / build['seconds'] / need:,.2f}x"])
    table("build and consumption", ["measure", "value"], rows)

    table("epoch order: microseconds per unit", ["units", "grain index_shuffle (per entry)",
                                                  "numpy permutation (whole epoch / n)"],
          shuffle_costs())

    mixes = {"SlimPajama's 7 sources": [52.2, 26.7, 5.2, 4.2, 4.6, 3.8, 3.3],
             "1 : 1.999": [1, 1.999], "0.5 : 0.3 : 0.2": [0.5, 0.3, 0.2]}
    rows = []
    for name, w in mixes.items():
        worst, ours, gap = mixture_deviation(w)
        rows.append([name, f"{worst:.2f}", f"{gap:.1f}", f"{ours:.2f}"])
    table("mixture: most rows a source strays from its weight over 20,000 rows",
          ["weights", "MapDataset.mix, max", "mix, at 20,000", "ours (select_from_datasets)"],
          rows)


if __name__ == "__main__":
    main()
