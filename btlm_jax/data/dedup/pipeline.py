"""The deduplication pipeline: hash -> LSH bands -> components -> write.

Stages and where their data lives (``work_dir``):

1. ``hash`` (one task per input file): parse, NFC, matching form, length filter,
   optional decontamination, MinHash, band keys.  Writes ``hash/F.bin`` (one
   record per document and band: 128-bit band key, line, source) sorted by
   (band, partition) (raw ``hash/F.bin``; the offsets go back to the driver),
   and ``meta/F.npz`` (per-line status, source, bytes).
2. ``lsh`` (one task per band x partition): gathers that slice of every file,
   sorts by (scope, key) and writes candidate edges ``edges/bB_pP.npy``.  Only one
   band partition is in memory per task, so memory is bounded by
   ``24 bytes x documents / partitions``.
3. ``components`` (driver): union-find over the edge files, one at a time.
4. ``write`` (one task per input file): kept documents in the same layout, plus
   that file's part of ``duplicates.jsonl``.

Every task is a plain function of its arguments, so the local engine and the
Ray engine run the same code and produce identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import io as dio
from .components import UnionFind
from .engines import Progress, make_engine
from .minhash import MinHasher, band_keys, optimal_bands_rows
from .normalize import PUNCTUATION_CHOICES, normalize_for_matching

RECORD_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("line", "<u4"), ("src", "<u4")])


@dataclass
class DedupConfig:
    inputs: list[str]
    output: str
    mode: str = "global"  # "global" | "local"
    engine: str = "local"  # "local" | "ray"
    ray_address: str | None = None
    workers: int = 1
    num_perm: int = 128
    ngram: int = 13
    ngram_unit: str = "char"  # "char" | "word"
    bands: int = 9
    rows: int = 13
    threshold: float | None = None  # if set, (bands, rows) are chosen from it
    seed: int = 1
    min_length: int = 200
    punctuation: str = "ascii"
    holdout: list[str] = field(default_factory=list)
    on_bad_input: str = "fail"  # "fail" | "skip"
    partitions: int = 16
    batch_size: int = 1024
    zstd_level: int = 3
    work_dir: str | None = None
    keep_work: bool = False
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> "DedupConfig":
        def bad(flag, msg):
            raise dio.DedupInputError(f"{flag}: {msg}")

        if not self.inputs:
            bad("--input", "give at least one file or glob")
        if not self.output:
            bad("--output", "give an output directory")
        if self.mode not in ("global", "local"):
            bad("--mode", f"must be 'global' or 'local', got {self.mode!r}")
        if self.engine not in ("local", "ray"):
            bad("--engine", f"must be 'local' or 'ray', got {self.engine!r}")
        if self.workers < 1:
            bad("--workers", f"must be >= 1, got {self.workers}")
        if self.num_perm < 1:
            bad("--num-perm", f"must be >= 1, got {self.num_perm}")
        if self.ngram < 1:
            bad("--ngram", f"must be >= 1, got {self.ngram}")
        if self.ngram_unit not in ("char", "word"):
            bad("--ngram-unit", f"must be 'char' or 'word', got {self.ngram_unit!r}")
        if self.threshold is not None:
            if not 0.0 < self.threshold < 1.0:
                bad("--threshold", f"must be strictly between 0 and 1, got {self.threshold}")
            self.bands, self.rows = optimal_bands_rows(self.threshold, self.num_perm)
        if self.bands < 1 or self.rows < 1:
            bad("--bands/--rows", f"must be >= 1, got {self.bands} x {self.rows}")
        if self.bands * self.rows > self.num_perm:
            bad(
                "--bands/--rows",
                f"{self.bands} x {self.rows} = {self.bands * self.rows} needs more than "
                f"--num-perm {self.num_perm} permutations; lower them or raise --num-perm",
            )
        if self.min_length < 0:
            bad("--min-length", f"must be >= 0, got {self.min_length}")
        if self.punctuation not in PUNCTUATION_CHOICES:
            bad("--punctuation", f"must be one of {PUNCTUATION_CHOICES}, got {self.punctuation!r}")
        if self.on_bad_input not in ("fail", "skip"):
            bad("--on-bad-input", f"must be 'fail' or 'skip', got {self.on_bad_input!r}")
        if self.partitions < 1:
            bad("--partitions", f"must be >= 1, got {self.partitions}")
        if self.batch_size < 1:
            bad("--batch-size", f"must be >= 1, got {self.batch_size}")
        return self

    def hash_params(self) -> dict:
        keys = ("mode", "num_perm", "ngram", "ngram_unit", "bands", "rows", "threshold", "seed",
                "min_length", "punctuation", "on_bad_input")
        return {k: getattr(self, k) for k in keys}


def _bad_input_error(path: str, lineno: int, detail: str) -> dio.DedupInputError:
    return dio.DedupInputError(
        f"{path}:{lineno}: {detail}. Fix or remove this line, or rerun with --on-bad-input skip "
        "to count such lines in stats.json and list them in bad_input.jsonl"
    )


# ----------------------------------------------------------------------------- stage 0/1


def hash_holdout_file(path: str, *, cfg: DedupConfig) -> dict:
    """SHA-256 digests of the matching form of every document of a holdout file."""
    digests, bad = [], []
    for lineno, raw in dio.iter_raw_lines(path):
        parsed = dio.parse_line(raw)
        if parsed.status != dio.OK:
            if cfg.on_bad_input == "fail":
                raise _bad_input_error(path, lineno, parsed.detail)
            bad.append((lineno, dio.BAD_REASONS[parsed.status], parsed.detail))
            continue
        norm = normalize_for_matching(parsed.text, cfg.punctuation)
        digests.append(hashlib.sha256(norm.encode("utf-8")).digest())
    return {"digests": digests, "bad": bad, "docs": len(digests)}


def hash_file(file_idx: int, path: str, *, cfg: DedupConfig, work_dir: str, holdout=None) -> dict:
    """Stage 1 for one input file; see the module docstring."""
    t0 = time.perf_counter()
    hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.ngram_unit, cfg.seed)
    status, src, nbytes = [], [], []
    names: dict[str, int] = {}
    bad = []
    pieces = []  # record arrays, one per batch
    batch_texts: list[str] = []
    batch_lines: list[int] = []
    batch_src: list[int] = []

    def flush():
        if not batch_texts:
            return
        sig = hasher.signatures(batch_texts)
        hi, lo = band_keys(sig, cfg.bands, cfg.rows)
        rec = np.empty((cfg.bands, len(batch_texts)), dtype=RECORD_DTYPE)
        rec["hi"], rec["lo"] = hi, lo
        rec["line"] = np.asarray(batch_lines, dtype=np.uint32)[None, :]
        rec["src"] = np.asarray(batch_src, dtype=np.uint32)[None, :]
        pieces.append(rec)
        batch_texts.clear(), batch_lines.clear(), batch_src.clear()

    bytes_in = 0
    for lineno, raw in dio.iter_raw_lines(path):
        parsed = dio.parse_line(raw)
        sid = names.setdefault(parsed.source, len(names))
        src.append(sid)
        nbytes.append(parsed.nbytes)
        bytes_in += parsed.nbytes
        if parsed.status != dio.OK:
            if cfg.on_bad_input == "fail":
                raise _bad_input_error(path, lineno, parsed.detail)
            bad.append((lineno, dio.BAD_REASONS[parsed.status], parsed.detail))
            status.append(parsed.status)
            continue
        norm = normalize_for_matching(parsed.text, cfg.punctuation)
        if len(norm) < cfg.min_length:
            status.append(dio.SHORT)
            continue
        if holdout is not None and hashlib.sha256(norm.encode("utf-8")).digest() in holdout:
            status.append(dio.CONTAMINATED)
            continue
        status.append(dio.OK)
        batch_texts.append(norm)
        batch_lines.append(lineno - 1)
        batch_src.append(sid)
        if len(batch_texts) >= cfg.batch_size:
            flush()
    flush()

    # Records sorted by (band, partition), with offsets per (band, partition).
    P = cfg.partitions
    index = np.zeros((cfg.bands, P + 1), dtype=np.int64)
    if pieces:
        rec = np.concatenate(pieces, axis=1)  # (bands, n_ok)
        part = (rec["hi"] % np.uint64(P)).astype(np.int64)
        order = np.argsort(part, axis=1, kind="stable")
        rec = np.take_along_axis(rec, order, axis=1)
        counts = np.stack([np.bincount(p, minlength=P) for p in part])
        index[:, 1:] = np.cumsum(counts, axis=1)
        index += (np.arange(cfg.bands, dtype=np.int64) * rec.shape[1])[:, None]
        rec = rec.reshape(-1)
    else:
        rec = np.empty(0, dtype=RECORD_DTYPE)
    stem = f"{file_idx:06d}"
    rec.tofile(os.path.join(work_dir, "hash", stem + ".bin"))
    np.savez(
        os.path.join(work_dir, "meta", stem + ".npz"),
        status=np.asarray(status, dtype=np.uint8),
        src=np.asarray(src, dtype=np.uint32),
        nbytes=np.asarray(nbytes, dtype=np.int64),
    )
    n_ok = int(sum(1 for s in status if s == dio.OK))
    return {
        "lines": len(status),
        "ok": n_ok,
        "bytes": bytes_in,
        "sources": list(names),
        "index": index,
        "bad": bad,
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- stage 2


def lsh_partition(band: int, part: int, ranges: np.ndarray, *, work_dir: str, files: list[int],
                  offsets: np.ndarray, src_maps: list[np.ndarray] | None) -> dict:
    """Candidate pairs of one band partition: documents with equal (scope, band key).

    ``ranges[k]`` is the (start, end) record range of this band partition in the
    hash file of ``files[k]``.  Each group of documents with the same key becomes
    a star of edges from its smallest document index.  ``src_maps`` (local mode)
    maps each file's source ids to global ones so that only documents of the same
    source are grouped.
    """
    keys_hi, keys_lo, docs, scopes = [], [], [], []
    size = RECORD_DTYPE.itemsize
    for f, (start, end) in zip(files, ranges.tolist()):
        if end == start:
            continue
        path = os.path.join(work_dir, "hash", f"{f:06d}.bin")
        rec = np.fromfile(path, dtype=RECORD_DTYPE, count=end - start, offset=start * size)
        keys_hi.append(rec["hi"])
        keys_lo.append(rec["lo"])
        docs.append(rec["line"].astype(np.int64) + offsets[f])
        if src_maps is not None:
            scopes.append(src_maps[f][rec["src"]])
    edges = np.empty((0, 2), dtype=np.int64)
    n = 0
    if docs:
        hi = np.concatenate(keys_hi)
        lo = np.concatenate(keys_lo)
        doc = np.concatenate(docs)
        scope = np.concatenate(scopes) if scopes else np.zeros(doc.size, dtype=np.int64)
        n = doc.size
        order = np.lexsort((doc, lo, hi, scope))
        hi, lo, doc, scope = hi[order], lo[order], doc[order], scope[order]
        same = np.zeros(n, dtype=bool)
        same[1:] = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1]) & (scope[1:] == scope[:-1])
        start = np.where(same, 0, np.arange(n))
        np.maximum.accumulate(start, out=start)
        members = np.flatnonzero(same)
        edges = np.stack([doc[start[members]], doc[members]], axis=1)
    np.save(os.path.join(work_dir, "edges", f"b{band:03d}_p{part:04d}.npy"), edges)
    return {"records": int(n), "edges": int(edges.shape[0])}


# ----------------------------------------------------------------------------- stage 4


def write_file(file_idx: int, path: str, out_path: str, roots: np.ndarray, doc_src: np.ndarray,
               root_src: np.ndarray, cluster_size: np.ndarray, *, cfg: DedupConfig, work_dir: str,
               offsets: np.ndarray, relpaths: list[str], source_names: list[str]) -> dict:
    """Writes the kept documents of one file (NFC text, other fields unchanged) and its
    part of duplicates.jsonl.  ``roots`` etc. are per line of this file."""
    t0 = time.perf_counter()
    meta = np.load(os.path.join(work_dir, "meta", f"{file_idx:06d}.npz"))
    status = meta["status"]
    first = offsets[file_idx]
    writer = dio.ShardWriter(out_path, cfg.zstd_level)
    kept = dups = 0
    dup_lines = []
    rel = relpaths[file_idx]
    n_lines = 0
    for lineno, raw in dio.iter_raw_lines(path):
        i = lineno - 1
        n_lines += 1
        if i >= status.size:
            raise dio.DedupInputError(f"{path} changed while deduplication was running (line {lineno})")
        if status[i] != dio.OK:
            continue
        root = roots[i]
        if root == first + i:
            parsed = dio.parse_line(raw)
            if parsed.status != dio.OK:
                raise dio.DedupInputError(f"{path}:{lineno} changed while deduplication was running")
            record = dict(parsed.record)
            record["text"] = parsed.text
            writer.write_record(record)
            kept += 1
        else:
            rf = int(np.searchsorted(offsets, root, side="right") - 1)
            dup_lines.append(json.dumps({
                "id": f"{rel}:{lineno}",
                "source": source_names[doc_src[i]],
                "duplicate_of": f"{relpaths[rf]}:{int(root - offsets[rf]) + 1}",
                "duplicate_of_source": source_names[root_src[i]],
                "cluster_size": int(cluster_size[i]),
            }, ensure_ascii=False))
            dups += 1
    if n_lines != status.size:
        raise dio.DedupInputError(f"{path} changed while deduplication was running (line count)")
    writer.close()
    with open(os.path.join(work_dir, "dups", f"{file_idx:06d}.jsonl"), "w", encoding="utf-8") as fh:
        for line in dup_lines:
            fh.write(line + "\n")
    return {"kept": kept, "duplicates": dups, "lines": n_lines, "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- driver


def _prepare_output(cfg: DedupConfig, files: list[str]) -> tuple[str, str]:
    out = os.path.abspath(cfg.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise dio.DedupInputError(f"--output {cfg.output}: exists and is not a directory")
    inputs = set(files)
    base = dio.common_base(cfg.inputs, files)
    if out == base or any(os.path.join(out, os.path.relpath(f, base)) in inputs for f in files):
        raise dio.DedupInputError(
            f"--output {cfg.output}: would overwrite the input files; choose a different directory"
        )
    if os.path.isdir(out) and os.listdir(out) and not cfg.overwrite:
        raise dio.DedupInputError(
            f"--output {cfg.output}: directory is not empty; choose a new one or pass --overwrite"
        )
    os.makedirs(out, exist_ok=True)
    work = os.path.abspath(cfg.work_dir) if cfg.work_dir else os.path.join(out, ".dedup_work")
    if os.path.exists(work):
        shutil.rmtree(work)
    for sub in ("hash", "meta", "edges", "dups"):
        os.makedirs(os.path.join(work, sub))
    return out, work


def _category_stats(mask, src, nbytes, n_sources):
    docs = np.bincount(src[mask], minlength=n_sources)
    byts = np.bincount(src[mask], weights=nbytes[mask], minlength=n_sources).astype(np.int64)
    return docs, byts


def run_dedup(cfg: DedupConfig) -> dict:
    """Runs the whole pipeline; returns the contents of stats.json."""
    cfg.validate()
    t_start = time.perf_counter()
    files = dio.expand_inputs(cfg.inputs)
    holdout_files = dio.expand_inputs(cfg.holdout) if cfg.holdout else []
    overlap = set(files) & set(holdout_files)
    if overlap:
        raise dio.DedupInputError(
            f"--holdout: {sorted(overlap)[0]} is also an --input file; holdout and training must differ"
        )
    out, work = _prepare_output(cfg, files)
    base = dio.common_base(cfg.inputs, files)
    relpaths = [os.path.relpath(f, base) for f in files]
    engine = make_engine(cfg.engine, cfg.workers, cfg.ray_address)
    stages = {}
    try:
        # Stage 0: holdout digests for exact decontamination.
        holdout = None
        holdout_bad = []
        if holdout_files:
            prog = Progress("0/4 holdout", len(holdout_files), "file", cfg.progress)
            digests = set()
            for i, res in engine.map(hash_holdout_file, [(p,) for p in holdout_files], {"cfg": cfg}):
                digests.update(res["digests"])
                holdout_bad += [(holdout_files[i],) + b for b in res["bad"]]
                prog.update(1, docs=res["docs"])
            holdout = frozenset(digests)
            stages["holdout"] = prog.close()

        # Stage 1: parse, filter, MinHash, band keys.
        prog = Progress("1/4 hash", len(files), "file", cfg.progress)
        summaries = [None] * len(files)
        tasks = [(i, p) for i, p in enumerate(files)]
        for i, res in engine.map(hash_file, tasks, {"cfg": cfg, "work_dir": work, "holdout": holdout}):
            summaries[i] = res
            prog.update(1, docs=res["lines"], nbytes=res["bytes"])
        stages["hash"] = prog.close()

        counts = np.array([s["lines"] for s in summaries], dtype=np.int64)
        offsets = np.zeros(len(files) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        n_docs = int(offsets[-1])
        source_names = sorted({name for s in summaries for name in s["sources"]})
        gid = {name: j for j, name in enumerate(source_names)}
        src_maps = [np.array([gid[n] for n in s["sources"]], dtype=np.int64) for s in summaries]

        # Stage 2: LSH, band by band and partition by partition.
        with_docs = [i for i, s in enumerate(summaries) if s["ok"]]
        index = np.stack([summaries[i]["index"] for i in with_docs]) if with_docs else None
        tasks = [(b, p, index[:, b, p:p + 2] if with_docs else np.zeros((0, 2), np.int64))
                 for b in range(cfg.bands) for p in range(cfg.partitions)]
        prog = Progress("2/4 lsh", len(tasks), "part", cfg.progress)
        candidate_pairs = 0
        common = {"work_dir": work, "files": with_docs, "offsets": offsets,
                  "src_maps": src_maps if cfg.mode == "local" else None}
        for _, res in engine.map(lsh_partition, tasks, common):
            candidate_pairs += res["edges"]
            prog.update(1, docs=res["records"])
        stages["lsh"] = prog.close()

        # Stage 3: connected components over all candidate pairs.
        prog = Progress("3/4 components", len(tasks), "part", cfg.progress)
        uf = UnionFind(n_docs)
        for b, p, _ in tasks:
            edges = np.load(os.path.join(work, "edges", f"b{b:03d}_p{p:04d}.npy"))
            uf.union_edges(edges)
            prog.update(1)
        roots = uf.roots()
        status = np.empty(n_docs, dtype=np.uint8)
        src = np.empty(n_docs, dtype=np.int64)
        nbytes = np.empty(n_docs, dtype=np.int64)
        for f in range(len(files)):
            meta = np.load(os.path.join(work, "meta", f"{f:06d}.npz"))
            sl = slice(offsets[f], offsets[f + 1])
            status[sl], src[sl], nbytes[sl] = meta["status"], src_maps[f][meta["src"]], meta["nbytes"]
        ok = status == dio.OK
        sizes = np.bincount(roots[ok], minlength=n_docs)
        is_dup = ok & (roots != np.arange(n_docs))
        stages["components"] = prog.close()

        # Stage 4: write kept documents and duplicates.
        prog = Progress("4/4 write", len(files), "file", cfg.progress)
        tasks = []
        for f, path in enumerate(files):
            sl = slice(offsets[f], offsets[f + 1])
            r = roots[sl]
            tasks.append((f, path, os.path.join(out, relpaths[f])))
            tasks[-1] += (r, src[sl], src[r], sizes[r])
        common = {"cfg": cfg, "work_dir": work, "offsets": offsets, "relpaths": relpaths,
                  "source_names": source_names}
        written = [None] * len(files)
        for i, res in engine.map(write_file, tasks, common):
            written[i] = res
            prog.update(1, docs=res["lines"])
        stages["write"] = prog.close()
    finally:
        engine.shutdown()

    n_kept = sum(w["kept"] for w in written)
    n_dups = sum(w["duplicates"] for w in written)
    if n_kept != int((ok & ~is_dup).sum()) or n_dups != int(is_dup.sum()):
        raise RuntimeError("internal error: written document counts disagree with the components")

    with open(os.path.join(out, "duplicates.jsonl"), "w", encoding="utf-8") as fh:
        for f in range(len(files)):
            with open(os.path.join(work, "dups", f"{f:06d}.jsonl"), encoding="utf-8") as part:
                shutil.copyfileobj(part, fh)
    bad_records = [(files[i],) + b for i, s in enumerate(summaries) for b in s["bad"]] + holdout_bad
    if bad_records:
        with open(os.path.join(out, "bad_input.jsonl"), "w", encoding="utf-8") as fh:
            for path, lineno, reason, detail in bad_records:
                fh.write(json.dumps({"file": path, "line": lineno, "reason": reason, "detail": detail},
                                    ensure_ascii=False) + "\n")

    stats = _build_stats(cfg, files, source_names, status, src, nbytes, is_dup, roots, ok, sizes,
                         candidate_pairs, holdout_files, holdout, holdout_bad)
    stats["run"] = {"engine": cfg.engine, "workers": cfg.workers,
                    "seconds": round(time.perf_counter() - t_start, 4), "stages": stages}
    with open(os.path.join(out, "stats.json"), "w", encoding="utf-8") as fh:
        json.dump(stats, fh, indent=2)
        fh.write("\n")
    if not cfg.keep_work:
        shutil.rmtree(work)
    return stats


def _build_stats(cfg, files, source_names, status, src, nbytes, is_dup, roots, ok, sizes,
                 candidate_pairs, holdout_files, holdout, holdout_bad) -> dict:
    S = len(source_names)
    everything = np.ones(status.size, dtype=bool)
    cats = {
        "input": everything,
        "short": status == dio.SHORT,
        "contaminated": status == dio.CONTAMINATED,
        "bad_input": status >= dio.BAD_JSON,
        "duplicates": is_dup,
        "kept": ok & ~is_dup,
    }
    per_cat = {name: _category_stats(mask, src, nbytes, S) for name, mask in cats.items()}
    reasons = {label: _category_stats(status == code, src, nbytes, S)[0]
               for code, label in dio.BAD_REASONS.items()}

    def block(j=None):
        pick = (lambda a: int(a.sum())) if j is None else (lambda a: int(a[j]))
        b = {name: {"documents": pick(d), "bytes": pick(by)} for name, (d, by) in per_cat.items()}
        b["bad_input"]["by_reason"] = {label: pick(d) for label, d in reasons.items()}
        return b

    cluster_sizes = sizes[sizes >= 2]
    hist_sizes, hist_counts = np.unique(cluster_sizes, return_counts=True)
    dup_by_source = {}
    if is_dup.any():
        # For each removed document: its source and the source of the document kept for it.
        pair = src[is_dup] * S + src[roots[is_dup]]
        for code, c in zip(*np.unique(pair, return_counts=True)):
            dup_by_source.setdefault(source_names[code // S], {})[source_names[code % S]] = int(c)
    return {
        "config": cfg.hash_params(),
        "files": len(files),
        "total": block(),
        "per_source": {name: block(j) for j, name in enumerate(source_names)},
        "clusters": {
            "count": int(cluster_sizes.size),
            "documents": int(cluster_sizes.sum()),
            "max_size": int(cluster_sizes.max()) if cluster_sizes.size else 0,
            "mean_size": float(cluster_sizes.mean()) if cluster_sizes.size else 0.0,
            "size_histogram": {str(int(k)): int(v) for k, v in zip(hist_sizes, hist_counts)},
        },
        "duplicates_by_source": dup_by_source,
        "lsh": {"bands": cfg.bands, "rows": cfg.rows, "candidate_pairs": int(candidate_pairs)},
        "holdout": {"files": len(holdout_files), "unique_digests": len(holdout) if holdout else 0,
                    "bad_input": len(holdout_bad)},
    }
