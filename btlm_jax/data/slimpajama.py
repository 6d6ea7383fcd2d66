"""Reading SlimPajama-style corpora: shards, sources, and a cached document-offset index.

Accepted inputs (``data.train`` / ``data.eval``: comma-separated globs, each optionally
``label=glob``):

* ``.jsonl.zst`` and ``.jsonl``: one JSON object per line with the document in ``"text"``
  (SlimPajama: ``train/chunkN/example_train_K.jsonl.zst``, ``validation|test/chunkN/
  example_holdout_K.jsonl.zst``);
* ``.array_record`` (also ``NAME.array_record-00000-of-00008``): Grain's own random-access
  format, one JSON object (as above) per record, read through
  ``grain.sources.ArrayRecordDataSource``; ``python -m btlm_jax.data.convert_arrayrecord``
  writes them from ``.jsonl(.zst)`` shards;
* ``.txt``: the whole file is one document.

The source of a document is, in order: the glob's label (``code=/data/github/*.jsonl``), the
configured field (``data.source_field``, dotted, default ``meta.redpajama_set_name``), or
``"default"``.

Random access: the first time a shard is seen we read it once and write an index into the cache
directory (keyed by path, size and mtime): for each document its byte range, and for compressed
shards a *seekable* copy of the shard made of independent zstd frames of about 256 KiB each, so a
document is read by decompressing one small frame rather than the whole shard. Plain ``.jsonl``
and ``.txt`` files are read in place with ``os.pread``, ArrayRecord files by record number (they
need no seekable copy).

Bad input: a corrupt or truncated ``.zst`` shard, invalid UTF-8, invalid JSON or a line without a
string ``text`` field raise :class:`DataError` naming the file (and line). With
``data.on_error=skip`` they are skipped instead and counted (:attr:`Corpus.skipped`), so the loop
can report them; nothing is skipped silently.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import zstandard

INDEX_VERSION = 1
BLOCK_BYTES = 256 * 1024
DEFAULT_SOURCE = "default"
_READ_CHUNK = 1 << 20


class DataError(ValueError):
    """Bad input data or a bad data path. The message names the file (and line) or the key."""


# ----------------------------------------------------------------------------------------------
# Writing (used by the sample corpus, tests and tools).


def write_jsonl_zst(path: str | os.PathLike, records: Iterable[dict[str, Any]], level: int = 10):
    """Writes records as one zstd-compressed JSON line each, atomically (tmp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    data = zstandard.ZstdCompressor(level=level).compress(payload)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Globs and sources.


def parse_globs(spec: str) -> list[tuple[str | None, str]]:
    """Splits ``"a=/x/*.zst,/y/*.jsonl"`` into ``[("a", "/x/*.zst"), (None, "/y/*.jsonl")]``."""
    out = []
    for item in str(spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        label = None
        if "=" in item:
            head, tail = item.split("=", 1)
            if head and not any(c in head for c in "/\\*?[."):
                label, item = head.strip(), tail.strip()
        out.append((label, item))
    return out


def expand_globs(spec: str, key: str = "data.train") -> list[tuple[str | None, str]]:
    """(label, file) for every file matched by ``spec``; an error naming ``key`` if none match."""
    parts = parse_globs(spec)
    if not parts:
        raise DataError(f"{key} is empty: set it to a glob of .jsonl.zst/.jsonl/.array_record/"
                        ".txt files")
    files: list[tuple[str | None, str]] = []
    for label, pattern in parts:
        matched = sorted(p for p in _glob.glob(os.path.expanduser(pattern), recursive=True)
                         if os.path.isfile(p) and _kind(p) is not None)
        if not matched:
            raise DataError(
                f"{key}={spec!r}: the glob {pattern!r} matches no .jsonl.zst, .jsonl, "
                ".array_record or .txt files; check the path")
        files.extend((label, p) for p in matched)
    return files


_ARRAY_RECORD = re.compile(r"\.array_record(-\d+-of-\d+)?$")


def _kind(path: str) -> str | None:
    if _ARRAY_RECORD.search(path):
        return "arrayrecord"
    if path.endswith(".jsonl.zst") or path.endswith(".json.zst"):
        return "zst"
    if path.endswith(".jsonl") or path.endswith(".json"):
        return "jsonl"
    if path.endswith(".txt"):
        return "txt"
    return None


def cfg_get(cfg, dotted: str, default=None):
    """``cfg.a.b`` for ``"a.b"``, or ``default`` when a key is missing (configs read defensively)."""
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            return default
    return node


def _field(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


# ----------------------------------------------------------------------------------------------
# Per-file index.


@dataclass
class FileIndex:
    """Byte ranges of the documents of one file (in the seekable copy, for .zst shards)."""

    path: str
    kind: str
    starts: np.ndarray  # int64 byte offset of each document's line (or block-relative offset)
    ends: np.ndarray  # int64, exclusive
    blocks: np.ndarray  # int32 block of each document (zst only; else zeros)
    sources: list[str]  # source name of each document
    block_offsets: np.ndarray  # int64 [num_blocks + 1] offsets of frames in the seekable copy
    seekable_path: str | None
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _iter_zst_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """Yields (line number, line bytes) of a (possibly multi-frame) .zst file.

    Raises DataError for corrupt or truncated data, naming the file and the line reached."""
    dctx = zstandard.ZstdDecompressor()
    lineno, pending = 0, b""
    with open(path, "rb") as f:
        dobj, fed = dctx.decompressobj(), False
        while True:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                break
            while chunk:
                try:
                    out = dobj.decompress(chunk)
                except zstandard.ZstdError as e:
                    raise DataError(
                        f"{path}: corrupt zstd data after line {lineno} ({e}); re-download or "
                        "delete the file") from None
                fed = True
                chunk = b""
                if dobj.eof:
                    chunk = dobj.unused_data
                    dobj, fed = dctx.decompressobj(), False
                if out:
                    pending += out
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        lineno += 1
                        yield lineno, line
        if fed:
            raise DataError(
                f"{path}: truncated zstd shard (the stream ends inside a frame after line "
                f"{lineno}); re-download or delete the file")
    if pending:
        yield lineno + 1, pending


def _iter_plain_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    with open(path, "rb") as f:
        pos = 0
        for lineno, line in enumerate(f, 1):
            yield lineno, pos, line
            pos += len(line)


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line bytes without the newline) of a jsonl file, zstd-compressed
    (``.zst``/``.zstd``, any number of frames) or plain: the one line reader of the training data
    and of deduplication.

    Raises DataError for a corrupt zstd stream or one that ends inside a frame (a truncated
    shard), naming the file and the last line read."""
    if path.endswith((".zst", ".zstd")):
        yield from _iter_zst_lines(path)
        return
    for lineno, _, line in _iter_plain_lines(path):
        yield lineno, line[:-1] if line.endswith(b"\n") else line


def _parse_line(path: str, lineno: int, line: bytes) -> dict:
    return parse_record(f"{path}:{lineno}", line)


def parse_record(where: str, line: bytes) -> dict:
    """One JSON record (a jsonl line, an ArrayRecord record) with a string ``"text"``; a
    DataError naming ``where`` (file:line, file record N) otherwise."""
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: invalid UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{where}: expected a JSON object with a string \"text\" field")
    return obj


def _source_of(obj: dict, label: str | None, source_field: str) -> str:
    if label:
        return label
    s = _field(obj, source_field) if source_field else None
    return str(s) if s is not None else DEFAULT_SOURCE


class _IndexBuilder:
    """The documents of one file as they are found: byte range, block and source of each, and
    the bad records (raised at once, or counted and listed with ``on_error=skip``)."""

    def __init__(self, path: str, label: str | None, source_field: str, on_error: str):
        self.path, self.kind, self.label = path, _kind(path), label
        self.source_field, self.on_error = source_field, on_error
        self.starts, self.ends, self.blocks, self.sources = [], [], [], []
        self.errors: list[str] = []

    def bad(self, msg: str) -> None:
        if self.on_error != "skip":
            raise DataError(msg)
        self.errors.append(msg)

    def add(self, start: int, end: int, block: int, source: str) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.blocks.append(block)
        self.sources.append(source)

    def add_line(self, lineno: int, line: bytes, start: int, end: int, block: int = 0,
                 where: str | None = None) -> bool:
        """Parses one jsonl line (or record) and adds it as the document at ``[start, end)``;
        False for a blank or (skipped) bad line."""
        if not line.strip():
            return False
        try:
            obj = parse_record(where or f"{self.path}:{lineno}", line)
        except DataError as e:
            self.bad(str(e))
            return False
        self.add(start, end, block, _source_of(obj, self.label, self.source_field))
        return True

    def result(self, block_offsets=(0,), seekable_path: str | None = None) -> FileIndex:
        return FileIndex(self.path, self.kind, np.asarray(self.starts, np.int64),
                         np.asarray(self.ends, np.int64), np.asarray(self.blocks, np.int32),
                         self.sources, np.asarray(block_offsets, np.int64), seekable_path,
                         len(self.errors), self.errors)


class _SeekableWriter:
    """Writes records into independent zstd frames of about ``BLOCK_BYTES`` each, atomically
    (a temporary file renamed on success, removed on failure)."""

    def __init__(self, path: str):
        self.path = path
        self.cctx = zstandard.ZstdCompressor(level=3)
        self.block_offsets = [0]
        self.buf = bytearray()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=".tmp-", dir=Path(path).parent)
        self.out = os.fdopen(fd, "wb")

    @property
    def position(self) -> tuple[int, int]:
        """(offset in the current block, block number) of the next record."""
        return len(self.buf), len(self.block_offsets) - 1

    def append(self, record: bytes) -> None:
        self.buf += record
        if len(self.buf) >= BLOCK_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.buf:
            frame = self.cctx.compress(bytes(self.buf))
            self.out.write(frame)
            self.block_offsets.append(self.block_offsets[-1] + len(frame))
            self.buf.clear()

    def __enter__(self) -> "_SeekableWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self._flush()
            self.out.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _index_txt(b: _IndexBuilder) -> FileIndex:
    with open(b.path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        b.bad(f"{b.path}: invalid UTF-8 ({e})")
    else:
        if data.strip():
            b.add(0, len(data), 0, b.label or DEFAULT_SOURCE)
    return b.result()


def _index_jsonl(b: _IndexBuilder) -> FileIndex:
    for lineno, pos, line in _iter_plain_lines(b.path):
        b.add_line(lineno, line, pos, pos + len(line))
    return b.result()


def _index_zst(b: _IndexBuilder, seekable_path: str) -> FileIndex:
    """Re-encodes the good lines into the seekable copy. A corrupt or truncated stream keeps the
    documents read before it only when skipping."""
    with _SeekableWriter(seekable_path) as w:
        try:
            for lineno, line in _iter_zst_lines(b.path):
                start, block = w.position
                if b.add_line(lineno, line, start, start + len(line) + 1, block):
                    w.append(line + b"\n")
        except DataError as e:
            b.bad(str(e))
    return b.result(w.block_offsets, seekable_path)


def open_array_record_reader(path: str):
    """array_record's sequential reader of ``path``; a DataError for a corrupt or truncated
    file."""
    from array_record.python import array_record_module

    why = ("corrupt, truncated or not an ArrayRecord file; convert the .jsonl(.zst) shard again "
           "(python -m btlm_jax.data.convert_arrayrecord)")
    try:
        r = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
    except RuntimeError as e:
        raise DataError(f"{path}: {why} ({str(e)[:160]})") from None
    if not r.ok():
        raise DataError(f"{path}: {why}")
    return r


def _index_arrayrecord(b: _IndexBuilder) -> FileIndex:
    """Document ``j`` of the file is record ``j`` (``starts``: the record number)."""
    try:
        r = open_array_record_reader(b.path)
        n = r.num_records()
        for lo in range(0, n, 1024):
            for j, rec in enumerate(r.read(list(range(lo, min(lo + 1024, n)))), lo):
                b.add_line(j, rec, j, j + 1, where=f"{b.path} record {j}")
        r.close()
    except DataError as e:
        b.bad(str(e))
    return b.result()


def _build_index(path: str, label: str | None, source_field: str, on_error: str,
                 seekable_path: str | None) -> FileIndex:
    b = _IndexBuilder(path, label, source_field, on_error)
    if b.kind == "txt":
        return _index_txt(b)
    if b.kind == "arrayrecord":
        return _index_arrayrecord(b)
    if b.kind == "jsonl":
        return _index_jsonl(b)
    assert seekable_path is not None
    return _index_zst(b, seekable_path)


def _index_key(path: str, label: str | None, source_field: str, on_error: str) -> str:
    st = os.stat(path)
    ident = json.dumps([INDEX_VERSION, os.path.abspath(path), st.st_size, st.st_mtime_ns, label,
                        source_field, on_error])
    return hashlib.sha1(ident.encode()).hexdigest()


def load_file_index(path: str, label: str | None, source_field: str, on_error: str,
                    cache_dir: str | os.PathLike) -> FileIndex:
    """The file's index from the cache, building (and caching) it on first use."""
    key = _index_key(path, label, source_field, on_error)
    idx_dir = Path(cache_dir) / "index" / key[:2]
    meta_path = idx_dir / f"{key}.npz"
    seek_path = str(idx_dir / f"{key}.seekable.zst") if _kind(path) == "zst" else None
    if meta_path.exists() and (seek_path is None or os.path.exists(seek_path)):
        try:
            with np.load(meta_path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                names = meta["source_names"]
                return FileIndex(path, meta["kind"], z["starts"], z["ends"], z["blocks"],
                                 [names[i] for i in z["source_ids"]], z["block_offsets"],
                                 seek_path, meta["skipped"], meta["errors"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: rebuild it
    fi = _build_index(path, label, source_field, on_error, seek_path)
    names = sorted(set(fi.sources))
    lookup = {n: i for i, n in enumerate(names)}
    ids = np.asarray([lookup[s] for s in fi.sources], np.int32)
    idx_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=idx_dir)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, starts=fi.starts, ends=fi.ends, blocks=fi.blocks, source_ids=ids,
                 block_offsets=fi.block_offsets,
                 meta=np.asarray(json.dumps({"kind": fi.kind, "source_names": names,
                                             "skipped": fi.skipped, "errors": fi.errors})))
    os.replace(tmp, meta_path)
    return fi


# ----------------------------------------------------------------------------------------------
# A corpus: many files, addressable by document number.


class Corpus:
    """All documents of a set of files, addressable by index (picklable for Grain workers).

    Attributes:
      source_names: sorted source names found in the data.
      doc_source: int32 [num_docs] source id of each document.
      skipped: number of bad records skipped (``on_error=skip``); ``errors`` lists them.
    """

    def __init__(self, spec: str, *, key: str = "data.train", cache_dir: str | os.PathLike,
                 source_field: str = "meta.redpajama_set_name", on_error: str = "raise"):
        if on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error={on_error!r}: must be raise or skip")
        self.spec = spec
        files = expand_globs(spec, key)
        indices = [load_file_index(p, label, source_field, on_error, cache_dir)
                   for label, p in files]
        self.paths = [fi.path for fi in indices]
        self.kinds = [fi.kind for fi in indices]
        self.seekable = [fi.seekable_path for fi in indices]
        self.block_offsets = [fi.block_offsets for fi in indices]
        self.skipped = int(sum(fi.skipped for fi in indices))
        self.errors = [e for fi in indices for e in fi.errors]
        self.source_names = sorted({s for fi in indices for s in fi.sources})
        lookup = {n: i for i, n in enumerate(self.source_names)}
        self.doc_file = np.concatenate(
            [np.full(len(fi.starts), i, np.int32) for i, fi in enumerate(indices)] +
            [np.zeros(0, np.int32)])
        self.doc_start = np.concatenate([fi.starts for fi in indices] + [np.zeros(0, np.int64)])
        self.doc_end = np.concatenate([fi.ends for fi in indices] + [np.zeros(0, np.int64)])
        self.doc_block = np.concatenate([fi.blocks for fi in indices] + [np.zeros(0, np.int32)])
        self.doc_source = np.asarray([lookup[s] for fi in indices for s in fi.sources], np.int32)
        if len(self) == 0:
            raise DataError(f"{key}={spec!r}: the files contain no documents")
        self._fds: dict[int, int] = {}
        self._ars: dict[int, Any] = {}  # grain.sources.ArrayRecordDataSource per file
        self._fd_lock = threading.Lock()
        self._local = threading.local()  # per-thread decompressor and block cache

    def __len__(self) -> int:
        return len(self.doc_start)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"], state["_fd_lock"], state["_local"] = {}, None, None
        state["_ars"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._fd_lock, self._local = threading.Lock(), threading.local()

    def __del__(self, _close=os.close):
        for fd in list(getattr(self, "_fds", {}).values()):
            try:
                _close(fd)
            except OSError:
                pass

    def docs_of_source(self, source: str) -> np.ndarray:
        return np.flatnonzero(self.doc_source == self.source_names.index(source))

    def _fd(self, path: str, i: int) -> int:
        fd = self._fds.get(i)
        if fd is None:
            with self._fd_lock:
                fd = self._fds.get(i)
                if fd is None:
                    fd = self._fds[i] = os.open(path, os.O_RDONLY)
        return fd

    def _block(self, f: int, b: int) -> bytes:
        local = self._local
        if not hasattr(local, "blocks"):
            local.blocks, local.dctx = OrderedDict(), zstandard.ZstdDecompressor()
        key = (f, b)
        data = local.blocks.get(key)
        if data is not None:
            local.blocks.move_to_end(key)
            return data
        lo, hi = int(self.block_offsets[f][b]), int(self.block_offsets[f][b + 1])
        raw = os.pread(self._fd(self.seekable[f], f), hi - lo, lo)
        try:
            data = local.dctx.decompress(raw)
        except zstandard.ZstdError as e:
            raise DataError(f"{self.seekable[f]} (index of {self.paths[f]}): corrupt cached "
                            f"block {b} ({e}); delete the cache entry to rebuild it") from None
        local.blocks[key] = data
        if len(local.blocks) > 8:
            local.blocks.popitem(last=False)
        return data

    def _array_record(self, f: int):
        src = self._ars.get(f)
        if src is None:
            import grain

            with self._fd_lock:
                src = self._ars.get(f)
                if src is None:
                    src = self._ars[f] = grain.sources.ArrayRecordDataSource([self.paths[f]])
        return src

    def raw(self, i: int) -> bytes:
        f, s, e = int(self.doc_file[i]), int(self.doc_start[i]), int(self.doc_end[i])
        if self.kinds[f] == "arrayrecord":
            return self._array_record(f)[s]
        if self.kinds[f] == "zst":
            return self._block(f, int(self.doc_block[i]))[s:e]
        return os.pread(self._fd(self.paths[f], f), e - s, s)

    def text(self, i: int) -> str:
        """The text of document ``i``."""
        raw = self.raw(i)
        f = int(self.doc_file[i])
        if self.kinds[f] == "txt":
            return raw.decode("utf-8")
        return json.loads(raw)["text"]


def read_documents(path: str, source_field: str = "meta.redpajama_set_name",
                   label: str | None = None) -> Iterator[tuple[str, str]]:
    """Streams (source, text) of every document of one file in order (no index, no cache)."""
    kind = _kind(path)
    if kind is None:
        raise DataError(f"{path}: unsupported file type (want .jsonl.zst, .jsonl, .array_record "
                        "or .txt)")
    if kind == "txt":
        text = Path(path).read_text(encoding="utf-8")
        if text.strip():
            yield label or DEFAULT_SOURCE, text
        return
    if kind == "arrayrecord":
        r = open_array_record_reader(path)
        for j in range(r.num_records()):
            (rec,) = r.read([j])
            if rec.strip():
                obj = parse_record(f"{path} record {j}", rec)
                yield _source_of(obj, label, source_field), obj["text"]
        r.close()
        return
    for lineno, line in iter_lines(path):
        if line.strip():
            obj = _parse_line(path, lineno, line)
            yield _source_of(obj, label, source_field), obj["text"]
