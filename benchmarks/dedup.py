"""Dedup throughput: ours vs datasketch, and Ray scaling over 1 and 2 workers.

    python benchmarks/dedup.py [--docs 2000] [--chars 2000] [--files 8]

On one synthetic SlimPajama-like corpus (random Zipfian words, 25% near-duplicates,
written as .jsonl.zst shards) with the SlimPajama parameters (character 13-grams,
128 permutations, 9 bands x 13 rows), prints documents/s for:
  * ours, single process, MinHash + LSH + components on the normalised texts;
  * datasketch, single process, MinHash.update_batch + MinHashLSH insert + query on
    the same normalised texts and shingles (its fastest documented path, with the
    permutations generated once and shared by all documents);
  * the ratio of the two (target: >= 10x);
  * the full tool (read, NFC, filter, MinHash, LSH, components, write) with the
    local engine and with Ray on 1 and 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np
import zstandard

from btlm_jax.data.dedup import (
    DedupConfig,
    MinHasher,
    band_keys,
    connected_components,
    nfc,
    normalize_for_matching,
    run_dedup,
)

NUM_PERM, NGRAM, BANDS, ROWS = 128, 13, 9, 13


def make_corpus(root, n_docs, n_chars, n_files, seed=0):
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(20000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    cum = np.cumsum(weights / weights.sum())
    nprng = np.random.default_rng(seed)
    texts = []
    while len(texts) < n_docs:
        if texts and rng.random() < 0.25:  # near-duplicate of an earlier document
            t = rng.choice(texts)
            k = rng.randrange(len(t) - 40)
            t = t[:k] + " Edited, slightly. " + t[k + 30:]
        else:
            words = []
            n = 0
            while n < n_chars:
                idx = np.searchsorted(cum, nprng.random(64))
                for i in idx:
                    w = vocab[i]
                    words.append(w.capitalize() + "." if rng.random() < 0.05 else w)
                    n += len(w) + 1
            t = " ".join(words)
        texts.append(t)
    sources = ["RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub"]
    per = -(-n_docs // n_files)
    for f in range(n_files):
        lines = [json.dumps({"text": t, "meta": {"redpajama_set_name": sources[i % 3]}})
                 for i, t in enumerate(texts[f * per:(f + 1) * per])]
        path = os.path.join(root, f"chunk1/example_train_{f}.jsonl.zst")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    return texts


def ours_core(norm):
    """MinHash + LSH (band keys, grouping) + components on normalised texts."""
    hasher = MinHasher(NUM_PERM, NGRAM, "char", seed=1)
    sig = np.concatenate([hasher.signatures(norm[i:i + 1024]) for i in range(0, len(norm), 1024)])
    hi, lo = band_keys(sig, BANDS, ROWS)
    doc = np.arange(len(norm))
    edges = []
    for b in range(BANDS):
        order = np.lexsort((doc, lo[b], hi[b]))
        h, l, d = hi[b][order], lo[b][order], doc[order]
        same = np.zeros(len(d), bool)
        same[1:] = (h[1:] == h[:-1]) & (l[1:] == l[:-1])
        start = np.maximum.accumulate(np.where(same, 0, np.arange(len(d))))
        m = np.flatnonzero(same)
        edges.append(np.stack([d[start[m]], d[m]], 1))
    roots = connected_components(len(norm), np.concatenate(edges))
    return int((roots != doc).sum())


def datasketch_core(norm):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(num_perm=NUM_PERM, params=(BANDS, ROWS))
    template = MinHash(num_perm=NUM_PERM, seed=1)  # permutations generated once and reused
    edges = []
    for i, t in enumerate(norm):
        m = MinHash(num_perm=NUM_PERM, permutations=template.permutations, scheme=template.scheme)
        m.update_batch([s.encode("utf-8") for s in {t[j:j + NGRAM] for j in range(len(t) - NGRAM + 1)}])
        edges += [(int(k), i) for k in lsh.query(m)]
        lsh.insert(str(i), m)
    roots = connected_components(len(norm), np.array(edges, dtype=np.int64).reshape(-1, 2))
    return int((roots != np.arange(len(norm))).sum())


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--chars", type=int, default=2000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="dedup_bench_")
    texts = make_corpus(os.path.join(tmp, "in"), args.docs, args.chars, args.files)
    norm = [normalize_for_matching(nfc(t)) for t in texts]
    ours_core(norm[:50])  # compile / load the Numba kernels outside the timing
    rows = []
    t_ours, d_ours = timed(ours_core, norm)
    t_ds, d_ds = timed(datasketch_core, norm)
    rows.append(("ours: MinHash+LSH+components, 1 process", len(norm) / t_ours, d_ours))
    rows.append(("datasketch: MinHash.update_batch+MinHashLSH", len(norm) / t_ds, d_ds))

    def tool(name, **kw):
        cfg = DedupConfig(inputs=[os.path.join(tmp, "in/**/*.jsonl.zst")],
                          output=os.path.join(tmp, name), progress=False, partitions=2, **kw)
        t, stats = timed(run_dedup, cfg)
        rows.append((f"full tool: {name}", len(texts) / t, stats["total"]["duplicates"]["documents"]))

    tool("local engine, 1 process")
    if not args.skip_ray:
        import ray

        for w in (1, 2):
            ray.init(num_cpus=w, include_dashboard=False, log_to_driver=False)
            try:
                # Warm the workers (process start, imports) outside the timing.
                tool(f"ray warm-up {w}", engine="ray")
                rows.pop()
                tool(f"ray, {w} worker{'s' * (w > 1)}", engine="ray")
            finally:
                ray.shutdown()

    print(f"\n{len(texts)} documents x ~{args.chars} chars, char {NGRAM}-grams, {NUM_PERM} perms, "
          f"{BANDS}x{ROWS} bands, {os.cpu_count()} CPUs\n")
    print(f"| {'what':<48} | {'docs/s':>10} | {'dups removed':>12} |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 14}|")
    for name, rate, dups in rows:
        print(f"| {name:<48} | {rate:>10,.0f} | {dups:>12,} |")
    print(f"\nspeed-up over datasketch: {t_ds / t_ours:.1f}x (target >= 10x)")
    ray_rows = [r for r in rows if r[0].startswith("full tool: ray")]
    if len(ray_rows) == 2:
        print(f"Ray scaling 1 -> 2 workers: {ray_rows[1][1] / ray_rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
