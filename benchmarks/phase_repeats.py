"""Does a run with several sequence-length phases read each token once? (issue 28)

Reads every global batch of a run's schedule from the training pipeline
(:class:`btlm_jax.data.pipeline.StepData`, the code the training loop reads through) and finds
where each row lies in its source's token stream by its content alone (every window of the
packed stream at the phase's length is indexed by its tokens), so the figures do not depend on how
the pipeline computes its rows. Prints one table: per phase, the tokens read, the share of them
that earlier phases already read (the same stream positions), the share read twice within the
phase, and the share of the corpus never read.

The default is BTLM's recipe shape over the embedded sample corpus: one pass worth of tokens,
75% of them at seq 2048 and 25% at seq 8192, the same tokens per step (4 x 2048, then 1 x 8192):

    python benchmarks/phase_repeats.py
    python benchmarks/phase_repeats.py --phases=2048:4:100,8192:1:40 --vocab=2048
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(args):
    from btlm_jax.config import default_config
    from btlm_jax.data import sample

    cfg = default_config()
    cfg.model.vocab_size = args.vocab
    if args.cache_dir:
        cfg.data.cache_dir = args.cache_dir
    paths = sample.build_sample_corpus(cfg.data.cache_dir or None)
    cfg.data.train = args.data or paths["train"]
    cfg.data.eval = ""
    cfg.data.prefetch = 0
    cfg.seed = args.seed
    return cfg


def _streams(cfg, tok):
    """Each source's packed token stream (the concat store), read directly from its file."""
    from btlm_jax.data import pipeline

    st = pipeline.open_store(cfg, tok, pipeline.train_spec(cfg), "data.train", 1)
    out = {}
    for i, s in enumerate(st.meta["sources"]):
        path = os.path.join(st.path, f"src{i}.tokens.bin")
        out[s["name"]] = np.asarray(np.memmap(path, np.dtype(st.meta["token_dtype"]), "r",
                                              shape=(int(s["tokens"]),)), np.int64)
    return out


def _recipe(total_tokens: int, epochs: float) -> tuple[str, ...]:
    per_step = 4 * 2048
    steps = max(2, round(epochs * total_tokens / per_step))
    s1 = round(0.75 * steps)
    return (f"2048:4:{s1}", f"8192:1:{steps - s1}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="", help="seq:batch:steps,... (default: the BTLM shape)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes worth of tokens (recipe)")
    p.add_argument("--vocab", type=int, default=2048, help="sentencepiece vocabulary")
    p.add_argument("--data", default="", help="training glob (default: the sample corpus)")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from btlm_jax.data import pipeline
    from btlm_jax.data.tokenizer import load_or_train

    cfg = _config(args)
    tok = load_or_train(cfg)
    streams = _streams(cfg, tok)
    total = sum(len(v) - 1 for v in streams.values())  # target positions
    phases = tuple(args.phases.split(",")) if args.phases else _recipe(total, args.epochs)
    cfg.train.phases = phases
    cfg.train.steps = sum(int(x.split(":")[2]) for x in phases)
    cfg.optim.warmup_steps = 0
    data = pipeline.StepData(cfg, tok)
    names = data.source_names
    seen = {s: np.zeros(len(v), np.int8) for s, v in streams.items()}  # last phase + 1 read it
    index: dict[int, dict] = {}
    rows_total, step = [], 0
    print(f"corpus: {total:,} tokens in {len(streams)} sources; phases {', '.join(phases)}; "
          f"mixture {', '.join(f'{s}={w:.3f}' for s, w in data.weights.items())}")
    print(f"{'phase':>5} {'seq':>6} {'tokens read':>12} {'read by an earlier phase':>25} "
          f"{'read twice in the phase':>24}")
    for ph, spec in enumerate(phases):
        L, B, n = (int(x) for x in spec.split(":"))
        if L not in index:  # every window of the stream at this length, by content
            index[L] = {}
            for s, v in streams.items():
                for off in range(0, len(v) - L, L):
                    index[L].setdefault(v[off:off + L + 1].tobytes(), (s, off))
        earlier = twice = read = missing = 0
        for _ in range(n):
            b = data.global_batch(step)
            step += 1
            for r in range(B):
                key = np.concatenate([b["inputs"][r], b["targets"][r, -1:]]).astype(np.int64)
                hit = index[L].get(key.tobytes())
                if hit is None:
                    missing += 1
                    continue
                s, off = hit
                mark = seen[s][off + 1:off + L + 1]  # the row's target positions
                earlier += int(np.count_nonzero((mark > 0) & (mark <= ph)))
                twice += int(np.count_nonzero(mark == ph + 1))
                read += L
                mark[:] = ph + 1
        rows_total.append(read)
        if missing:
            print(f"      ({missing} rows not found in the stream index)")
        print(f"{ph:>5} {L:>6} {read:>12,} {100 * earlier / max(read, 1):>24.1f}% "
              f"{100 * twice / max(read, 1):>23.2f}%")
    never = sum(int(np.count_nonzero(v[1:] == 0)) for v in seen.values())
    print(f"never read: {100 * never / total:.1f}% of the corpus "
          f"({sum(rows_total):,} tokens read for {total:,} in the corpus)")


if __name__ == "__main__":
    main()
