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

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from . import io as dio
from .components import UnionFind
from .engines import Progress, make_engine
from .minhash import MinHasher, band_keys, optimal_bands_rows
from .normalize import PUNCTUATION_CHOICES, normalize_for_matching

RECORD_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("line", "<u4"), ("src", "<u4")])

# Allowed values and lower bounds of the DedupConfig fields (the flag is --field-name).
_CHOICES = {
    "mode": ("global", "local"),
    "engine": ("local", "ray"),
    "ngram_unit": ("char", "word"),
    "punctuation": PUNCTUATION_CHOICES,
    "on_bad_input": ("fail", "skip"),
}
_MINIMUMS = {"workers": 1, "num_perm": 1, "ngram": 1, "min_length": 0, "partitions": 1,
             "batch_size": 1}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                bad(_flag(name), f"must be {' or '.join(map(repr, choices))}, got {value!r}")
        for name, least in _MINIMUMS.items():
            if getattr(self, name) < least:
                bad(_flag(name), f"must be >= {least}, got {getattr(self, name)}")
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


def _parsed_ok(parsed: dio.ParsedLine, path: str, lineno: int, cfg: DedupConfig, bad: list) -> bool:
    """True for a good line; a bad one raises (``--on-bad-input fail``) or is listed in ``bad``."""
    if parsed.status == dio.OK:
        return True
    if cfg.on_bad_input == "fail":
        raise _bad_input_error(path, lineno, parsed.detail)
    bad.append((lineno, dio.BAD_REASONS[parsed.status], parsed.detail))
    return False


def _digest(norm: str) -> bytes:
    return hashlib.sha256(norm.encode("utf-8")).digest()


def hash_holdout_file(path: str, *, cfg: DedupConfig) -> dict:
    """SHA-256 digests of the matching form of every document of a holdout file."""
    digests, bad = [], []
    for lineno, raw in dio.iter_raw_lines(path):
        parsed = dio.parse_line(raw)
        if _parsed_ok(parsed, path, lineno, cfg, bad):
            digests.append(_digest(normalize_for_matching(parsed.text, cfg.punctuation)))
    return {"digests": digests, "bad": bad, "docs": len(digests)}


class _BandKeyBatcher:
    """MinHash band keys of documents in batches of ``cfg.batch_size``: one record array
    ``(bands, batch)`` of (key, line, source) per batch."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.hasher = MinHasher(cfg.num_perm, cfg.ngram, cfg.ngram_unit, cfg.seed)
        self.pieces: list[np.ndarray] = []
        self.texts: list[str] = []
        self.lines: list[int] = []
        self.srcs: list[int] = []

    def add(self, text: str, line: int, src: int) -> None:
        self.texts.append(text)
        self.lines.append(line)
        self.srcs.append(src)
        if len(self.texts) >= self.cfg.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        sig = self.hasher.signatures(self.texts)
        hi, lo = band_keys(sig, self.cfg.bands, self.cfg.rows)
        rec = np.empty((self.cfg.bands, len(self.texts)), dtype=RECORD_DTYPE)
        rec["hi"], rec["lo"] = hi, lo
        rec["line"] = np.asarray(self.lines, dtype=np.uint32)[None, :]
        rec["src"] = np.asarray(self.srcs, dtype=np.uint32)[None, :]
        self.pieces.append(rec)
        self.texts, self.lines, self.srcs = [], [], []


@dataclass
class _FileScan:
    """Per line of one input file: status, source id and bytes; the source names and bad lines."""

    status: list = field(default_factory=list)
    src: list = field(default_factory=list)
    nbytes: list = field(default_factory=list)
    names: dict = field(default_factory=dict)
    bad: list = field(default_factory=list)


def _scan_file(path: str, cfg: DedupConfig, holdout, batcher: _BandKeyBatcher) -> _FileScan:
    """Parses, filters and classifies every line; good documents go to ``batcher``."""
    scan = _FileScan()
    for lineno, raw in dio.iter_raw_lines(path):
        parsed = dio.parse_line(raw)
        sid = scan.names.setdefault(parsed.source, len(scan.names))
        scan.src.append(sid)
        scan.nbytes.append(parsed.nbytes)
        if not _parsed_ok(parsed, path, lineno, cfg, scan.bad):
            scan.status.append(parsed.status)
            continue
        norm = normalize_for_matching(parsed.text, cfg.punctuation)
        if len(norm) < cfg.min_length:
            scan.status.append(dio.SHORT)
        elif holdout is not None and _digest(norm) in holdout:
            scan.status.append(dio.CONTAMINATED)
        else:
            scan.status.append(dio.OK)
            batcher.add(norm, lineno - 1, sid)
    batcher.flush()
    return scan


def _partition_records(pieces: list[np.ndarray], bands: int, P: int) -> tuple[np.ndarray, np.ndarray]:
    """The records sorted by (band, partition) and flattened, with the ``(bands, P + 1)``
    offsets of each band partition."""
    index = np.zeros((bands, P + 1), dtype=np.int64)
    if not pieces:
        return np.empty(0, dtype=RECORD_DTYPE), index
    rec = np.concatenate(pieces, axis=1)  # (bands, n_ok)
    part = (rec["hi"] % np.uint64(P)).astype(np.int64)
    order = np.argsort(part, axis=1, kind="stable")
    rec = np.take_along_axis(rec, order, axis=1)
    counts = np.stack([np.bincount(p, minlength=P) for p in part])
    index[:, 1:] = np.cumsum(counts, axis=1)
    index += (np.arange(bands, dtype=np.int64) * rec.shape[1])[:, None]
    return rec.reshape(-1), index


def hash_file(file_idx: int, path: str, *, cfg: DedupConfig, work_dir: str, holdout=None) -> dict:
    """Stage 1 for one input file; see the module docstring."""
    t0 = time.perf_counter()
    batcher = _BandKeyBatcher(cfg)
    scan = _scan_file(path, cfg, holdout, batcher)
    rec, index = _partition_records(batcher.pieces, cfg.bands, cfg.partitions)
    stem = f"{file_idx:06d}"
    rec.tofile(os.path.join(work_dir, "hash", stem + ".bin"))
    np.savez(
        os.path.join(work_dir, "meta", stem + ".npz"),
        status=np.asarray(scan.status, dtype=np.uint8),
        src=np.asarray(scan.src, dtype=np.uint32),
        nbytes=np.asarray(scan.nbytes, dtype=np.int64),
    )
    return {
        "lines": len(scan.status),
        "ok": int(sum(1 for s in scan.status if s == dio.OK)),
        "bytes": int(sum(scan.nbytes)),
        "sources": list(scan.names),
        "index": index,
        "bad": scan.bad,
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


def _resolve_inputs(cfg: DedupConfig) -> tuple[list[str], list[str]]:
    """The input and holdout files, which must not overlap."""
    files = dio.expand_inputs(cfg.inputs)
    holdout_files = dio.expand_inputs(cfg.holdout) if cfg.holdout else []
    overlap = set(files) & set(holdout_files)
    if overlap:
        raise dio.DedupInputError(
            f"--holdout: {sorted(overlap)[0]} is also an --input file; holdout and training must differ"
        )
    return files, holdout_files


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
        leftover = os.path.join(out, ".dedup_work")
        if os.path.isdir(leftover):
            raise dio.DedupInputError(
                f"--output {cfg.output}: holds {leftover}, the scratch directory of a run that did "
                "not finish; remove it (and that run's partial output) or pass --overwrite"
            )
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


def _discard_failed_run(cfg: DedupConfig, out: str, work: str, outputs: list[str],
                        existed: set[str], created_out: bool) -> None:
    """After a failure: removes the scratch directory (unless --keep-work) and every output
    file this run created, so that the rerun starts clean."""
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    for path in outputs:
        for p in (path + ".tmp",) + (() if path in existed else (path,)):
            if os.path.isfile(p):
                os.unlink(p)
        parent = os.path.dirname(path)
        while parent.startswith(out + os.sep) and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)
    if created_out and os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)


def _category_stats(mask, src, nbytes, n_sources):
    docs = np.bincount(src[mask], minlength=n_sources)
    byts = np.bincount(src[mask], weights=nbytes[mask], minlength=n_sources).astype(np.int64)
    return docs, byts


REPORT_FILES = ("duplicates.jsonl", "bad_input.jsonl", "stats.json")


class _DedupRun:
    """One run of the pipeline: its files and directories, the engine, and what each stage
    hands to the next (attributes set by the stage methods, in order)."""

    def __init__(self, cfg: DedupConfig, files: list[str], holdout_files: list[str], out: str,
                 work: str):
        self.cfg, self.files, self.holdout_files, self.out, self.work = (
            cfg, files, holdout_files, out, work)
        base = dio.common_base(cfg.inputs, files)
        self.relpaths = [os.path.relpath(f, base) for f in files]
        self.stages: dict[str, dict] = {}
        self.engine = None

    def outputs(self) -> list[str]:
        """Every file the run may write below the output directory."""
        return [os.path.join(self.out, r) for r in self.relpaths + list(REPORT_FILES)]

    def _progress(self, stage: str, total: int, unit: str) -> Progress:
        return Progress(stage, total, unit, self.cfg.progress)

    def run_stages(self) -> None:
        self.engine = make_engine(self.cfg.engine, self.cfg.workers, self.cfg.ray_address)
        try:
            for stage in (self.holdout, self.hash, self.lsh, self.components, self.write):
                stage()
        finally:
            self.engine.shutdown()

    def holdout(self) -> None:
        """Stage 0: holdout digests for exact decontamination."""
        self.holdout_digests, self.holdout_bad = None, []
        if not self.holdout_files:
            return
        prog = self._progress("0/4 holdout", len(self.holdout_files), "file")
        digests = set()
        tasks = [(p,) for p in self.holdout_files]
        for i, res in self.engine.map(hash_holdout_file, tasks, {"cfg": self.cfg}):
            digests.update(res["digests"])
            self.holdout_bad += [(self.holdout_files[i],) + b for b in res["bad"]]
            prog.update(1, docs=res["docs"])
        self.holdout_digests = frozenset(digests)
        self.stages["holdout"] = prog.close()

    def hash(self) -> None:
        """Stage 1: parse, filter, MinHash, band keys; then global document numbering."""
        prog = self._progress("1/4 hash", len(self.files), "file")
        summaries = [None] * len(self.files)
        common = {"cfg": self.cfg, "work_dir": self.work, "holdout": self.holdout_digests}
        for i, res in self.engine.map(hash_file, list(enumerate(self.files)), common):
            summaries[i] = res
            prog.update(1, docs=res["lines"], nbytes=res["bytes"])
        self.stages["hash"] = prog.close()
        self.summaries = summaries
        self._check_has_documents()
        counts = np.array([s["lines"] for s in summaries], dtype=np.int64)
        self.offsets = np.zeros(len(self.files) + 1, dtype=np.int64)
        np.cumsum(counts, out=self.offsets[1:])
        self.n_docs = int(self.offsets[-1])
        self.source_names = sorted({name for s in summaries for name in s["sources"]})
        gid = {name: j for j, name in enumerate(self.source_names)}
        self.src_maps = [np.array([gid[n] for n in s["sources"]], dtype=np.int64) for s in summaries]

    def _check_has_documents(self) -> None:
        lines = sum(s["lines"] for s in self.summaries)
        if lines > sum(len(s["bad"]) for s in self.summaries):
            return
        what = f"{lines} lines, all bad input" if lines else "no lines"
        raise dio.DedupInputError(
            f"--input {' '.join(self.cfg.inputs)}: the {len(self.files)} matched file(s) hold no "
            f"documents ({what}); check the glob and the files"
        )

    def lsh(self) -> None:
        """Stage 2: LSH, band by band and partition by partition."""
        summaries = self.summaries
        with_docs = [i for i, s in enumerate(summaries) if s["ok"]]
        index = np.stack([summaries[i]["index"] for i in with_docs]) if with_docs else None
        self.lsh_tasks = [(b, p, index[:, b, p:p + 2] if with_docs else np.zeros((0, 2), np.int64))
                          for b in range(self.cfg.bands) for p in range(self.cfg.partitions)]
        prog = self._progress("2/4 lsh", len(self.lsh_tasks), "part")
        self.candidate_pairs = 0
        common = {"work_dir": self.work, "files": with_docs, "offsets": self.offsets,
                  "src_maps": self.src_maps if self.cfg.mode == "local" else None}
        for _, res in self.engine.map(lsh_partition, self.lsh_tasks, common):
            self.candidate_pairs += res["edges"]
            prog.update(1, docs=res["records"])
        self.stages["lsh"] = prog.close()

    def components(self) -> None:
        """Stage 3: connected components over all candidate pairs."""
        n_docs, offsets = self.n_docs, self.offsets
        prog = self._progress("3/4 components", len(self.lsh_tasks), "part")
        uf = UnionFind(n_docs)
        for b, p, _ in self.lsh_tasks:
            uf.union_edges(np.load(os.path.join(self.work, "edges", f"b{b:03d}_p{p:04d}.npy")))
            prog.update(1)
        self.roots = uf.roots()
        self.status = np.empty(n_docs, dtype=np.uint8)
        self.src = np.empty(n_docs, dtype=np.int64)
        self.nbytes = np.empty(n_docs, dtype=np.int64)
        for f in range(len(self.files)):
            meta = np.load(os.path.join(self.work, "meta", f"{f:06d}.npz"))
            sl = slice(offsets[f], offsets[f + 1])
            self.status[sl], self.nbytes[sl] = meta["status"], meta["nbytes"]
            self.src[sl] = self.src_maps[f][meta["src"]]
        self.ok = self.status == dio.OK
        self.sizes = np.bincount(self.roots[self.ok], minlength=n_docs)
        self.is_dup = self.ok & (self.roots != np.arange(n_docs))
        self.stages["components"] = prog.close()

    def write(self) -> None:
        """Stage 4: write kept documents and duplicates."""
        prog = self._progress("4/4 write", len(self.files), "file")
        tasks = []
        for f, path in enumerate(self.files):
            r = self.roots[self.offsets[f]:self.offsets[f + 1]]
            tasks.append((f, path, os.path.join(self.out, self.relpaths[f]),
                          r, self.src[self.offsets[f]:self.offsets[f + 1]], self.src[r], self.sizes[r]))
        common = {"cfg": self.cfg, "work_dir": self.work, "offsets": self.offsets,
                  "relpaths": self.relpaths, "source_names": self.source_names}
        self.written = [None] * len(self.files)
        for i, res in self.engine.map(write_file, tasks, common):
            self.written[i] = res
            prog.update(1, docs=res["lines"])
        self.stages["write"] = prog.close()

    def report(self, t_start: float) -> dict:
        """Checks the written counts and writes duplicates.jsonl, bad_input.jsonl, stats.json."""
        n_kept = sum(w["kept"] for w in self.written)
        n_dups = sum(w["duplicates"] for w in self.written)
        if n_kept != int((self.ok & ~self.is_dup).sum()) or n_dups != int(self.is_dup.sum()):
            raise RuntimeError("internal error: written document counts disagree with the components")
        with open(os.path.join(self.out, "duplicates.jsonl"), "w", encoding="utf-8") as fh:
            for f in range(len(self.files)):
                with open(os.path.join(self.work, "dups", f"{f:06d}.jsonl"), encoding="utf-8") as part:
                    shutil.copyfileobj(part, fh)
        bad_records = [(self.files[i],) + b for i, s in enumerate(self.summaries) for b in s["bad"]]
        bad_records += self.holdout_bad
        if bad_records:
            with open(os.path.join(self.out, "bad_input.jsonl"), "w", encoding="utf-8") as fh:
                for path, lineno, reason, detail in bad_records:
                    fh.write(json.dumps({"file": path, "line": lineno, "reason": reason,
                                         "detail": detail}, ensure_ascii=False) + "\n")
        stats = _build_stats(self.cfg, self.files, self.source_names, self.status, self.src,
                             self.nbytes, self.is_dup, self.roots, self.ok, self.sizes,
                             self.candidate_pairs, self.holdout_files, self.holdout_digests,
                             self.holdout_bad)
        stats["run"] = {"engine": self.cfg.engine, "workers": self.cfg.workers,
                        "seconds": round(time.perf_counter() - t_start, 4), "stages": self.stages}
        with open(os.path.join(self.out, "stats.json"), "w", encoding="utf-8") as fh:
            json.dump(stats, fh, indent=2)
            fh.write("\n")
        return stats


def run_dedup(cfg: DedupConfig) -> dict:
    """Runs the whole pipeline; returns the contents of stats.json.

    A failed run removes its scratch directory (unless ``keep_work``) and the output files it
    created, so the same command can simply be rerun."""
    cfg.validate()
    t_start = time.perf_counter()
    files, holdout_files = _resolve_inputs(cfg)
    created_out = not os.path.exists(cfg.output)
    out, work = _prepare_output(cfg, files)
    run = _DedupRun(cfg, files, holdout_files, out, work)
    existed = {p for p in run.outputs() if os.path.exists(p)}
    try:
        run.run_stages()
        stats = run.report(t_start)
    except BaseException:
        _discard_failed_run(cfg, out, work, run.outputs(), existed, created_out)
        raise
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
