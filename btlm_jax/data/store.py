"""A pre-tokenized, packed store of a corpus, read by random access.

One store per (corpus files, source field, tokenizer, packing, and ``seq_len`` for document
packing) lives in ``<cache_dir>/store/<key>/``. It is built once (the first run that needs it
tokenizes every document of every source, in corpus order, and packs the tokens) and then
memory-mapped by every later run and every process, so a training batch is a handful of array
slices and the pipeline has no state to checkpoint. A concat store is one token stream per source,
cut into rows of any ``seq_len`` when read, so the phases of a variable-length run share it.

Layout, per source ``i`` (in the corpus' sorted source order)::

    meta.json                           sources, rows, tokens, documents, dtypes (written last)
    concat:    src{i}.tokens.bin        the source's token stream: each document's ids + EOS
    document:  src{i}.inputs.bin        [rows, seq_len] inputs
               src{i}.targets.bin       [rows, seq_len] targets
               src{i}.segments.bin      [rows, seq_len] segment ids (0 = padding)

Packing (``data.packing``):

* ``concat`` (BTLM): row ``r`` is ``inputs = stream[rL:(r+1)L]``, ``targets =
  stream[rL+1:(r+1)L+1]``; every token of the stream except the tail after the last full row is a
  target exactly once. ``segment_ids`` are all 1, ``positions`` 0..L-1.
* ``document``: documents are placed whole into rows (one longer than an empty row is split across
  rows); a document contributes ``inputs = [EOS] + ids``, ``targets = ids + [EOS]``;
  ``segment_ids`` number the documents of a row 1, 2, ... (0 = padding) and ``positions`` restart
  at 0 in every segment. The last row of a source is padded. With ``unit_tokens = U > 0`` (a run
  whose phases have several lengths) the documents are grouped into *units* by where they start in
  the source's token stream (unit ``u``: the documents whose first token lies in ``[uU, (u+1)U)``)
  and each unit is packed on its own (its last row padded), so the stores of every length hold the
  same documents in unit ``u``; ``src{i}.units.bin`` (int64, units + 1) gives each unit's first
  row. :mod:`btlm_jax.data.positions` reads units, not rows, across phases.

The build writes into a temporary sibling directory and renames it into place under a file lock,
so concurrent processes (several local processes sharing one cache) build it once and an
interrupted build is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from btlm_jax.data.slimpajama import Corpus, DataError

STORE_VERSION = 1  # a document store with units has its own key (``unit_tokens``)
DOCS_PER_CHUNK = 256
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.kind.encode())
    for name in sorted(tokenizer.files):
        h.update(name.encode() + b"\0" + bytes(tokenizer.files[name]) + b"\0")
    return h.hexdigest()[:20]


def store_key(corpus_identity, tokenizer, seq_len: int, packing: str,
              unit_tokens: int = 0) -> str:
    length = int(seq_len) if packing == "document" else None  # a concat stream fits any length
    parts = [STORE_VERSION, corpus_identity, tokenizer_fingerprint(tokenizer), length, packing]
    if packing == "document" and unit_tokens:
        parts.append(["units", int(unit_tokens)])
    ident = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


# ----------------------------------------------------------------------------------------------
# Reading.


def _positions(seg: np.ndarray) -> np.ndarray:
    """Position within each run of equal segment ids (restarting at 0 in every run)."""
    L = seg.shape[-1]
    idx = np.broadcast_to(np.arange(L), seg.shape)
    start = np.ones(seg.shape, bool)
    start[..., 1:] = seg[..., 1:] != seg[..., :-1]
    first = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
    return (idx - first).astype(np.int32)


class Rows:
    """The packed rows of one source at one length: ``len(rows)``, ``rows[r]`` -> dict of
    ``[seq_len]`` arrays (the fields of :data:`FIELDS`).

    A Grain random-access data source (``grain.MapDataset.source(rows)``), with the batched read
    Grain's ``SourceMapDataset`` uses (``_getitems``); picklable for Grain's worker processes (the
    memory maps open lazily in each process)."""

    def __init__(self, path: str, meta: dict, index: int, source_id: int, seq_len: int):
        self.path, self.index, self.source_id = path, index, int(source_id)
        self.packing, self.L = meta["packing"], int(seq_len)
        s = meta["sources"][index]
        self.name, self.num_tokens = s["name"], int(s["tokens"])
        if self.packing == "concat":
            self.num_rows = (self.num_tokens - 1) // self.L
            if self.num_rows < 1:
                raise DataError(
                    f"source {self.name!r} of {meta['corpus']!r} has {self.num_tokens} tokens, "
                    f"fewer than one row of seq_len+1={self.L + 1}; add data or give the source "
                    "weight 0 (data.mixture)")
        else:
            if int(meta["seq_len"]) != self.L:
                raise ValueError(f"{path} is packed at seq_len {meta['seq_len']}, not {self.L}")
            self.num_rows = int(s["rows"])
        self.unit_tokens = int(meta.get("unit_tokens") or 0)
        self.dtype, self.seg_dtype = np.dtype(meta["token_dtype"]), np.dtype(meta["segment_dtype"])
        self._mm: dict | None = None

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_mm"] = None
        d.pop("_const", None)
        return d

    def __repr__(self) -> str:
        return f"Rows({self.name!r}, seq_len={self.L}, rows={self.num_rows}, {self.packing})"

    def _maps(self) -> dict:
        if self._mm is None:
            base = os.path.join(self.path, f"src{self.index}")
            if self.packing == "concat":
                self._mm = {"tokens": np.memmap(base + ".tokens.bin", self.dtype, "r",
                                                shape=(self.num_tokens,))}
            else:
                shape = (self.num_rows, self.L)
                self._mm = {"inputs": np.memmap(base + ".inputs.bin", self.dtype, "r", shape=shape),
                            "targets": np.memmap(base + ".targets.bin", self.dtype, "r", shape=shape),
                            "segments": np.memmap(base + ".segments.bin", self.seg_dtype, "r",
                                                  shape=shape)}
        return self._mm

    def __len__(self) -> int:
        return self.num_rows

    def unit_rows(self) -> np.ndarray:
        """A document store with units: the first row of each unit, then the row count
        (int64, units + 1)."""
        if not self.unit_tokens:
            raise ValueError(f"{self.path} is not packed in units")
        return np.fromfile(os.path.join(self.path, f"src{self.index}.units.bin"), np.int64)

    def _check(self, rows: np.ndarray) -> None:
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"rows {rows} out of range for {self.num_rows} rows of {self.name}")

    def _constant(self) -> dict[str, np.ndarray]:
        """A concat row's fields that do not depend on the row: shared, read-only."""
        c = self.__dict__.get("_const")
        if c is None:
            L = self.L
            c = {"loss_mask": np.ones(L, np.float32), "segment_ids": np.ones(L, np.int32),
                 "positions": np.arange(L, dtype=np.int32),
                 "source_ids": np.full(L, self.source_id, np.int32)}
            for v in c.values():
                v.flags.writeable = False
            self._const = c
        return c

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        """Row ``r``: a dict of ``[seq_len]`` arrays, some of them shared and read-only (a
        transform returns new arrays rather than writing into them)."""
        return self._getitems([r])[0]

    def _getitems(self, rows) -> list[dict[str, np.ndarray]]:
        """Grain's batched read: the rows ``rows`` as a list of row dicts (views of one read;
        with concat packing the constant fields are shared read-only arrays)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if self.packing != "concat":
            got = self.take(rows)
            return [{k: v[i] for k, v in got.items()} for i in range(len(rows))]
        self._check(rows)
        t = self._tokens(rows)
        t.flags.writeable = False
        L, const = self.L, self._constant()
        return [{"inputs": t[i, :L], "targets": t[i, 1:], **const} for i in range(len(rows))]

    def _tokens(self, rows: np.ndarray) -> np.ndarray:
        """Concat: the ``L + 1`` stream tokens of each row (int32 ``[len(rows), L + 1]``)."""
        L, tok = self.L, self._maps()["tokens"]
        t = np.empty((len(rows), L + 1), np.int32)
        for i, r in enumerate(rows):  # contiguous slices: faster than one fancy gather
            t[i] = tok[r * L:r * L + L + 1]
        return t

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The rows ``rows`` (int array) stacked: dict of [len(rows), seq_len] arrays."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        self._check(rows)
        L, n, mm = self.L, len(rows), self._maps()
        if self.packing == "concat":
            t = self._tokens(rows)
            return {"inputs": t[:, :L], "targets": t[:, 1:],
                    "loss_mask": np.ones((n, L), np.float32),
                    "segment_ids": np.ones((n, L), np.int32),
                    "positions": np.broadcast_to(np.arange(L, dtype=np.int32), (n, L)).copy(),
                    "source_ids": np.full((n, L), self.source_id, np.int32)}
        seg = np.asarray(mm["segments"][rows], np.int32)
        mask = seg > 0
        return {"inputs": np.asarray(mm["inputs"][rows], np.int32),
                "targets": np.asarray(mm["targets"][rows], np.int32),
                "loss_mask": mask.astype(np.float32), "segment_ids": seg,
                "positions": np.where(mask, _positions(seg), 0).astype(np.int32),
                "source_ids": np.where(mask, self.source_id, -1).astype(np.int32)}


class Store:
    """An opened store: ``meta``, ``source_names`` and :meth:`rows` per source."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.meta = json.loads((Path(path) / "meta.json").read_text())
        self.source_names = [s["name"] for s in self.meta["sources"]]
        self.seq_len, self.packing = self.meta["seq_len"], self.meta["packing"]

    def rows(self, source: str, source_id: int, seq_len: int | None = None) -> Rows:
        """The rows of ``source`` (labelled ``source_id`` in batches) at ``seq_len`` (any length
        for a concat store; a document store's own length by default)."""
        seq_len = self.seq_len if seq_len is None else seq_len
        return Rows(self.path, self.meta, self.source_names.index(source), source_id, seq_len)

    def tokens(self, source: str) -> int:
        return int(self.meta["sources"][self.source_names.index(source)]["tokens"])


# ----------------------------------------------------------------------------------------------
# Building.


class _Writer:
    """Appends arrays of one dtype to a raw file."""

    def __init__(self, path: str, dtype):
        self.f, self.dtype, self.count = open(path, "wb"), np.dtype(dtype), 0

    def write(self, a: np.ndarray):
        a = np.ascontiguousarray(a, self.dtype)
        self.f.write(a.tobytes())
        self.count += a.size

    def close(self):
        self.f.close()


class _DocumentPacker:
    """Greedy document packing into rows of L (whole documents where they fit)."""

    def __init__(self, L: int, eos: int, out: dict[str, _Writer]):
        self.L, self.eos, self.out = L, eos, out
        self.rows = 0
        self._new()

    def _new(self):
        L = self.L
        self.inp, self.tgt = np.zeros(L, np.int64), np.zeros(L, np.int64)
        self.seg, self.n, self.s = np.zeros(L, np.int64), 0, 0

    def flush(self):
        if self.n == 0:
            return
        self.out["inputs"].write(self.inp)
        self.out["targets"].write(self.tgt)
        self.out["segments"].write(self.seg)
        self.rows += 1
        self._new()

    def add(self, doc: np.ndarray):
        """``doc`` = ids + [EOS]; pairs j: input ([EOS] + ids)[j], target doc[j]."""
        L, m = self.L, len(doc)
        inputs = np.concatenate([[self.eos], doc[:-1]])
        off = 0
        while off < m:
            remaining, free = m - off, L - self.n
            if remaining > free and self.n > 0 and remaining <= L:
                self.flush()  # the rest fits in a fresh row: start it there
                continue
            k = min(remaining, free)
            n = self.n
            self.tgt[n:n + k] = doc[off:off + k]
            self.inp[n:n + k] = inputs[off:off + k]
            self.s += 1
            self.seg[n:n + k] = self.s
            self.n += k
            off += k
            if self.n == L:
                self.flush()


class _Tokenize:
    """A chunk of document ids -> their token ids (int64 arrays), in order (picklable: Grain's
    worker processes get a copy)."""

    def __init__(self, corpus: Corpus, tokenizer):
        self.corpus, self.tokenizer = corpus, tokenizer

    def __call__(self, doc_ids) -> list[np.ndarray]:
        texts = [self.corpus.text(int(i)) for i in np.atleast_1d(doc_ids)]
        return [np.asarray(ids, np.int64) for ids in self.tokenizer.encode_batch(texts)]


def _chunks(corpus: Corpus, tokenizer, docs: np.ndarray, workers: int):
    """The token ids of ``docs`` in chunks of ``DOCS_PER_CHUNK``, in order: a Grain chain
    (``MapDataset.source(docs).batch(...).map(tokenize)``), read in ``workers`` Grain worker
    processes (0: in this process, one chunk read ahead in a thread)."""
    import grain

    from btlm_jax.data import chain

    if len(docs) == 0:
        return
    ds = grain.MapDataset.source(np.asarray(docs, np.int64)).batch(DOCS_PER_CHUNK)
    ds = ds.map(_Tokenize(corpus, tokenizer))
    if len(ds) <= 1:
        workers = 0
    it = chain.worker_processes(ds, workers, prefetch=1)
    try:
        yield from it
    finally:
        it.close()


def build(corpus: Corpus, tokenizer, path: str | os.PathLike, *, seq_len: int, packing: str,
          num_workers: int = 0, log: Callable[[str], None] | None = None,
          unit_tokens: int = 0) -> dict:
    """Tokenizes and packs ``corpus`` into a new store at ``path`` (must not exist);
    ``seq_len`` is the row length of document packing (a concat store has no fixed length), and
    ``unit_tokens`` > 0 packs a document store in units of that many stream tokens.

    Returns the build statistics (documents, tokens, seconds)."""
    if packing not in ("concat", "document"):
        raise DataError(f"data.packing={packing!r}: must be concat or document")
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len}: must be >= 1")
    path = Path(path)
    tdt = token_dtype(tokenizer.vocab_size)
    sdt = np.dtype(np.uint16) if seq_len < 1 << 16 else np.dtype(np.int32)
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    sources, total_docs, total_tokens = [], 0, 0
    try:
        for i, name in enumerate(corpus.source_names):
            docs = corpus.docs_of_source(name)
            base = str(tmp / f"src{i}")
            ntok = ndoc = 0
            if packing == "concat":
                w = {"tokens": _Writer(base + ".tokens.bin", tdt)}
            else:
                w = {"inputs": _Writer(base + ".inputs.bin", tdt),
                     "targets": _Writer(base + ".targets.bin", tdt),
                     "segments": _Writer(base + ".segments.bin", sdt)}
                packer = _DocumentPacker(seq_len, tokenizer.eos_id, w)
            units: list[int] = []  # first row of each unit (document packing in units)
            for chunk in _chunks(corpus, tokenizer, docs, num_workers):
                for ids in chunk:
                    doc = np.append(ids, tokenizer.eos_id)
                    if packing == "concat":
                        w["tokens"].write(doc)
                    else:
                        if unit_tokens:
                            unit = ntok // unit_tokens
                            if unit >= len(units):  # the document starts a new unit
                                packer.flush()
                                units += [packer.rows] * (unit + 1 - len(units))
                        packer.add(doc)
                    ntok += len(doc)
                    ndoc += 1
            src = {"name": name, "documents": ndoc, "tokens": ntok}
            if packing == "document":
                packer.flush()
                src["rows"] = packer.rows
                if unit_tokens:
                    units += [packer.rows] * (-(-ntok // unit_tokens) + 1 - len(units))
                    np.asarray(units, np.int64).tofile(base + ".units.bin")
                    src["units"] = len(units) - 1
            for x in w.values():
                x.close()
            sources.append(src)
            total_docs += ndoc
            total_tokens += ntok
        seconds = time.perf_counter() - t0
        meta = {"version": STORE_VERSION, "packing": packing,
                "seq_len": int(seq_len) if packing == "document" else None,
                "unit_tokens": int(unit_tokens) if packing == "document" else 0,
                "token_dtype": tdt.name, "segment_dtype": sdt.name, "eos_id": tokenizer.eos_id,
                "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer_fingerprint(tokenizer),
                "corpus": corpus.spec, "sources": sources, "documents": total_docs,
                "tokens": total_tokens, "build_seconds": seconds}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if log is not None:
        log(f"built the packed store {path} ({total_docs:,} documents, {total_tokens:,} tokens, "
            f"{seconds:.1f} s, {total_tokens / max(seconds, 1e-9):,.0f} tokens/s)")
    return {"documents": total_docs, "tokens": total_tokens, "seconds": seconds}


@contextlib.contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_or_build(corpus: Corpus, corpus_identity, tokenizer, cache_dir: str | os.PathLike, *,
                  seq_len: int, packing: str, num_workers: int = 0,
                  log: Callable[[str], None] | None = None, unit_tokens: int = 0) -> Store:
    """The store for (corpus, tokenizer, packing[, seq_len, unit_tokens]) from ``cache_dir``,
    built if missing."""
    unit_tokens = int(unit_tokens) if packing == "document" else 0
    key = store_key(corpus_identity, tokenizer, seq_len, packing, unit_tokens)
    path = Path(cache_dir) / "store" / key
    if not (path / "meta.json").exists():
        with _locked(path.with_name(key + ".lock")):
            if not (path / "meta.json").exists():  # another process may have built it meanwhile
                if path.exists():
                    shutil.rmtree(path)
                build(corpus, tokenizer, path, seq_len=seq_len, packing=packing,
                      num_workers=num_workers, log=log, unit_tokens=unit_tokens)
    return Store(path)
