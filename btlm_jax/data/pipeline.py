"""The training input pipeline (Grain): read, shard, shuffle, tokenize, pack, mix, batch, prefetch.

Per source ``s`` (a ``MapDataset`` over the documents of that source)::

    documents of s -> [process_index::process_count] -> shuffle(seed) -> repeat (reshuffled
    each epoch) -> groups of 32 documents -> tokenize (batched, in the workers)
    -> to_iter_dataset -> pack into rows of seq_len tokens

then the per-source row streams are mixed with the mixture weights (a deterministic weighted
interleave, so a source with weight w supplies exactly a fraction w of the rows, hence of the
tokens), batched to this process's share of the global batch and prefetched (``data.num_workers``
worker processes via ``mp_prefetch``, else a background thread).

Packing (``data.packing``):

* ``concat`` (BTLM): each document's tokens followed by EOS are concatenated into one stream and
  cut into rows; row r has ``inputs = stream[rL:(r+1)L]``, ``targets = stream[rL+1:(r+1)L+1]``,
  so every token is an input exactly once and a target exactly once. ``segment_ids`` are all 1,
  ``positions`` 0..L-1.
* ``document``: documents are placed whole into rows (a document longer than the free space of
  an empty row is split); each document contributes ``inputs = [EOS] + ids``,
  ``targets = ids + [EOS]``; ``segment_ids`` number the documents of a row 1, 2, ...
  (0 = padding), ``positions`` restart at 0 in each segment. Attention must not cross segments.

Every element is a dict of numpy arrays ``[b, seq_len]``: ``inputs``, ``targets`` (int32),
``loss_mask`` (float32, 0 on padding), ``segment_ids``, ``positions`` (int32) and ``source_ids``
(int32 index into :func:`source_names`; -1 on padding).

The iterator's ``get_state()`` is a JSON-serialisable dict; ``set_state()`` restores it exactly
(the following batches equal those of an uninterrupted run). Batches are a deterministic function
of ``seed``, ``phase``, the data and the process index/count.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Any

import grain
import numpy as np

from btlm_jax.data import mixtures, sample, slimpajama
from btlm_jax.data import store as store_lib
from btlm_jax.data.slimpajama import DataError

log = logging.getLogger(__name__)

DOCS_PER_TOKENIZE_BATCH = 32
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids")


# ----------------------------------------------------------------------------------------------
# Config access (read defensively so older/newer configs work).


_get = slimpajama.cfg_get


def cache_dir(cfg) -> str:
    return str(sample.default_cache_dir(_get(cfg, "data.cache_dir", "") or None))


def train_spec(cfg) -> str:
    """``data.train``, or the embedded sample corpus' train glob (built on first use)."""
    spec = _get(cfg, "data.train", "") or ""
    return spec if spec else sample.build_sample_corpus(cache_dir(cfg))["train"]


def eval_spec(cfg) -> str | None:
    """``data.eval``; else the sample corpus' holdout when ``data.train`` is also unset; else None."""
    spec = _get(cfg, "data.eval", "") or ""
    if spec:
        return spec
    if not (_get(cfg, "data.train", "") or ""):
        return sample.build_sample_corpus(cache_dir(cfg))["eval"]
    return None


@functools.lru_cache(maxsize=16)
def _corpus_cached(spec: str, key: str, cdir: str, field: str, on_error: str,
                   stamp: tuple) -> slimpajama.Corpus:
    del stamp  # part of the cache key only
    return slimpajama.Corpus(spec, key=key, cache_dir=cdir, source_field=field, on_error=on_error)


def _stamp(spec: str) -> tuple:
    out = []
    for _, pattern in slimpajama.parse_globs(spec):
        import glob

        for p in sorted(glob.glob(os.path.expanduser(pattern), recursive=True)):
            try:
                st = os.stat(p)
                out.append((p, st.st_size, st.st_mtime_ns))
            except OSError:
                pass
    return tuple(out)


def load_corpus(cfg, spec: str, key: str) -> slimpajama.Corpus:
    return _corpus_cached(spec, key, cache_dir(cfg),
                          _get(cfg, "data.source_field", "meta.redpajama_set_name") or "",
                          _get(cfg, "data.on_error", "raise"), _stamp(spec))


def source_names(cfg) -> list[str]:
    """Sources of the training data (sorted), then any sources only the eval data has (sorted).

    ``source_ids`` in batches index this list."""
    names = list(load_corpus(cfg, train_spec(cfg), "data.train").source_names)
    es = eval_spec(cfg)
    if es:
        extra = [s for s in load_corpus(cfg, es, "data.eval").source_names if s not in names]
        names += sorted(extra)
    return names


def mixture_weights(cfg) -> dict[str, float]:
    """The resolved per-source training weights (normalised; 0 = not sampled)."""
    corpus = load_corpus(cfg, train_spec(cfg), "data.train")
    return mixtures.resolve_mixture(_get(cfg, "data.mixture", "") or "", corpus.source_names,
                                    corpus.source_bytes())


def skipped_records(cfg) -> int:
    """Bad records skipped (``data.on_error=skip``) in the training data; 0 when raising."""
    return load_corpus(cfg, train_spec(cfg), "data.train").skipped


# ----------------------------------------------------------------------------------------------
# Tokenization (a Grain transform; runs wherever the pipeline runs, i.e. in the workers).


class TokenizeDocuments(grain.transforms.Map):
    """An array of document indices -> list of int32 token arrays, each ending with EOS."""

    def __init__(self, corpus: slimpajama.Corpus, tokenizer):
        self.corpus, self.tokenizer = corpus, tokenizer

    def map(self, doc_ids):
        texts = [self.corpus.text(int(i)) for i in np.atleast_1d(doc_ids)]
        eos = self.tokenizer.eos_id
        return [np.asarray(ids + [eos], np.int32) for ids in self.tokenizer.encode_batch(texts)]


# ----------------------------------------------------------------------------------------------
# Packing (an IterDataset whose state is: parent state before the current group of documents,
# the document within the group, and the token offset within the document).


class PackIterDataset(grain.IterDataset):
    """Packs groups of token arrays (each ending with EOS) into rows of ``seq_len`` tokens."""

    def __init__(self, parent: grain.IterDataset, *, seq_len: int, mode: str, source_id: int,
                 eos_id: int):
        super().__init__(parent)
        if mode not in ("concat", "document"):
            raise DataError(f"data.packing={mode!r}: must be concat or document")
        self._seq_len, self._mode, self._source_id, self._eos = seq_len, mode, source_id, eos_id

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._mode, self._source_id,
                             self._eos)

    def __str__(self):
        return f"PackIterDataset(seq_len={self._seq_len}, mode={self._mode})"


class _PackIterator(grain.DatasetIterator):

    def __init__(self, parent, seq_len, mode, source_id, eos):
        super().__init__(parent)
        self._L, self._mode, self._src, self._eos = seq_len, mode, source_id, eos
        self._groups: list[tuple[Any, list[np.ndarray]]] = []  # (parent state before, docs)
        self._doc = 0  # document within self._groups[0]
        self._off = 0  # token (concat) or pair (document) offset within that document

    def _load(self) -> None:
        state = self._parent.get_state()
        docs = next(self._parent)
        self._groups.append((state, list(docs)))

    def _ensure(self, g: int) -> None:
        while len(self._groups) <= g:
            self._load()

    def _normalise(self) -> None:
        """Moves the cursor past exhausted documents/groups."""
        while True:
            self._ensure(0)
            docs = self._groups[0][1]
            if self._doc < len(docs) and self._off < self._doclen(docs[self._doc]):
                return
            if self._doc < len(docs):
                self._doc, self._off = self._doc + 1, 0
            if self._doc >= len(docs):
                self._groups.pop(0)
                self._doc, self._off = 0, 0

    def _doclen(self, doc: np.ndarray) -> int:
        return len(doc)  # concat: tokens; document: pairs (= len(ids) + 1 = len(ids + [eos]))

    def _take_concat(self) -> dict[str, np.ndarray]:
        L = self._L
        out = np.empty(L + 1, np.int32)
        self._normalise()
        # Copy L + 1 tokens from the cursor; the next row starts at the (L+1)-th (it is this
        # row's last target and the next row's first input).
        g, d, o, n = 0, self._doc, self._off, 0
        cursor = None
        while n < L + 1:
            self._ensure(g)
            docs = self._groups[g][1]
            if d >= len(docs):
                g, d, o = g + 1, 0, 0
                continue
            doc = docs[d]
            k = min(len(doc) - o, L + 1 - n)
            if cursor is None and n + k >= L:
                cursor = (g, d, o + (L - n))
            out[n:n + k] = doc[o:o + k]
            n, o = n + k, o + k
            if o >= len(doc):
                d, o = d + 1, 0
        self._commit(*cursor)
        return {"inputs": out[:L].copy(), "targets": out[1:].copy(),
                "loss_mask": np.ones(L, np.float32), "segment_ids": np.ones(L, np.int32),
                "positions": np.arange(L, dtype=np.int32),
                "source_ids": np.full(L, self._src, np.int32)}

    def _commit(self, g: int, d: int, o: int) -> None:
        del self._groups[:g]
        self._doc, self._off = d, o

    def _take_document(self) -> dict[str, np.ndarray]:
        L = self._L
        inputs = np.zeros(L, np.int32)
        targets = np.zeros(L, np.int32)
        seg = np.zeros(L, np.int32)
        pos = np.zeros(L, np.int32)
        n, s = 0, 0
        while n < L:
            self._normalise()
            doc = self._groups[0][1][self._doc]
            remaining = len(doc) - self._off
            free = L - n
            if remaining > free and n > 0 and remaining <= L:
                break  # the document fits in a fresh row: start it there
            k = min(remaining, free)
            # pairs j = off..off+k-1: input = ([eos] + ids)[j], target = (ids + [eos])[j]
            j0 = self._off
            targets[n:n + k] = doc[j0:j0 + k]
            if j0 == 0:
                inputs[n] = self._eos
                inputs[n + 1:n + k] = doc[0:k - 1]
            else:
                inputs[n:n + k] = doc[j0 - 1:j0 + k - 1]
            s += 1
            seg[n:n + k] = s
            pos[n:n + k] = np.arange(k, dtype=np.int32)
            n += k
            self._off += k
        mask = (seg > 0)
        return {"inputs": inputs, "targets": targets, "loss_mask": mask.astype(np.float32),
                "segment_ids": seg, "positions": pos,
                "source_ids": np.where(mask, self._src, -1).astype(np.int32)}

    def __next__(self):
        if self._mode == "concat":
            return self._take_concat()
        return self._take_document()

    def get_state(self) -> dict[str, Any]:
        self._normalise()
        return {"parent": self._groups[0][0], "doc": self._doc, "offset": self._off}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._groups = []
        self._load()
        self._doc, self._off = int(state["doc"]), int(state["offset"])


# ----------------------------------------------------------------------------------------------
# Pipelines.


def _seed_for(seed: int, *parts) -> int:
    h = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return int.from_bytes(h[:4], "little")


def _source_rows(corpus: slimpajama.Corpus, source: str, source_id: int, tokenizer, *, seq_len,
                 packing, seed, process_index, process_count, shuffle=True) -> grain.IterDataset:
    docs = corpus.docs_of_source(source)
    if shuffle:
        docs = docs[process_index::process_count]
        if len(docs) == 0:
            raise DataError(
                f"data.train: source {source!r} has fewer documents ({len(corpus.docs_of_source(source))}) "
                f"than processes ({process_count}); every process needs at least one")
    ds = grain.MapDataset.source(docs.astype(np.int64))
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(None).batch(DOCS_PER_TOKENIZE_BATCH, drop_remainder=False)
    ds = ds.map(TokenizeDocuments(corpus, tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    return PackIterDataset(it, seq_len=seq_len, mode=packing, source_id=source_id,
                           eos_id=tokenizer.eos_id)


class TrainIterator(grain.DatasetIterator):
    """The training iterator: a Grain DatasetIterator plus what the loop reports.

    Attributes: ``source_names``, ``weights`` (resolved mixture), ``skipped_records`` (alias
    ``skipped_documents``: bad input records skipped with ``data.on_error=skip``; the loop
    reports it in the metrics).
    """

    def __init__(self, inner: grain.DatasetIterator, *, source_names, weights, skipped_records):
        super().__init__(inner)
        self.source_names, self.weights = source_names, weights
        self.skipped_records = skipped_records

    @property
    def skipped_documents(self) -> int:
        return self.skipped_records

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)

    def close(self):
        close = getattr(self._parent, "close", None)
        if close is not None:
            close()


def make_train_dataset(cfg, tokenizer, *, seq_len: int, batch_size: int, phase: int = 0,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The Grain IterDataset behind :func:`make_train_iterator`."""
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} is not divisible by the process count "
                        f"{process_count}")
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} not in [0, {process_count})")
    packing = _get(cfg, "data.packing", "concat")
    seed = int(_get(cfg, "seed", 0))
    corpus = load_corpus(cfg, train_spec(cfg), "data.train")
    names = source_names(cfg)
    weights = mixture_weights(cfg)
    active = [s for s in corpus.source_names if weights[s] > 0]
    streams = [
        _source_rows(corpus, s, names.index(s), tokenizer, seq_len=seq_len, packing=packing,
                     seed=_seed_for(seed, "train", phase, s), process_index=process_index,
                     process_count=process_count)
        for s in active]
    if len(streams) == 1:
        ds = streams[0]
    else:
        ds = grain.IterDataset.mix(streams, [weights[s] for s in active])
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
    workers = int(_get(cfg, "data.num_workers", 0) or 0)
    prefetch = int(_get(cfg, "data.prefetch", 2) or 0)
    if workers > 0:
        from absl import flags  # grain's worker processes read absl flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
    elif prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def make_train_iterator(cfg, tokenizer, *, seq_len: int, batch_size: int, phase: int = 0,
                        process_index: int = 0, process_count: int = 1) -> TrainIterator:
    """An infinite iterator over this process's share of the global batch.

    ``batch_size`` is the global batch; each element has ``batch_size // process_count`` rows.
    """
    ds = make_train_dataset(cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, phase=phase,
                            process_index=process_index, process_count=process_count)
    it = TrainIterator(iter(ds), source_names=source_names(cfg), weights=mixture_weights(cfg),
                       skipped_records=skipped_records(cfg))
    return it


def make_eval_batches(cfg, tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches from ``data.eval`` (or the sample corpus' holdout).

    The rows are those of the eval corpus' packed store in order (documents in file order, each
    source packed separately), taken round-robin across sources, so every source gets an equal
    number of rows (per-source losses come from ``source_ids``); a source with fewer rows wraps
    around. Every process computes the same (whole) batches. Returns [] when there is no
    evaluation data (``data.eval`` unset while ``data.train`` is set).
    """
    spec = eval_spec(cfg)
    if spec is None:
        log.warning("data.eval is unset (and data.train is set): no evaluation batches")
        return []
    st = open_store(cfg, tokenizer, spec, "data.eval", seq_len)
    names = source_names(cfg)
    srcs = [st.rows(s, names.index(s)) for s in st.source_names]
    total = batch_size * num_batches
    which = np.arange(total) % len(srcs)
    out = {f: np.empty((total, seq_len), np.float32 if f == "loss_mask" else np.int32)
           for f in FIELDS}
    for i, rows in enumerate(srcs):
        where = np.flatnonzero(which == i)
        got = rows.take((where // len(srcs)) % len(rows))
        for f in FIELDS:
            out[f][where] = got[f]
    return [{f: out[f][b * batch_size:(b + 1) * batch_size] for f in FIELDS}
            for b in range(num_batches)]


# ----------------------------------------------------------------------------------------------
# Step-keyed training data: the global batch of step i is a pure function of (seed, data config,
# phases, i), whatever the number of processes; each process reads only its rows.


def corpus_identity(cfg, spec: str) -> list:
    """What the packed store of a corpus depends on: the files (path, size, mtime), the labels,
    the source field and the error policy."""
    return [spec, [list(x) for x in _stamp(spec)],
            _get(cfg, "data.source_field", "meta.redpajama_set_name") or "",
            _get(cfg, "data.on_error", "raise")]


def open_store(cfg, tokenizer, spec: str, key: str, seq_len: int, log=None) -> store_lib.Store:
    """The packed store of ``spec`` for this tokenizer, ``seq_len`` and ``data.packing``."""
    corpus = load_corpus(cfg, spec, key)
    return store_lib.open_or_build(
        corpus, corpus_identity(cfg, spec), tokenizer, cache_dir(cfg), seq_len=seq_len,
        packing=_get(cfg, "data.packing", "concat"),
        num_workers=int(_get(cfg, "data.num_workers", 0) or 0), log=log)


class EpochOrder:
    """The order in which a source's ``n`` packed rows are read: arrival ``k`` is row
    ``perm_e(k mod n)``, ``e = k // n``, a fresh permutation every epoch.

    Up to :attr:`DENSE_MAX` rows the permutation of an epoch is NumPy's (``default_rng((seed,
    e)).permutation(n)``, cached for two epochs); above, Grain's index shuffle computes each entry
    on its own (O(1) memory, about 35 us per row; it is slow on small ranges)."""

    DENSE_MAX = 1 << 22

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)
        self._perms: dict[int, np.ndarray] = {}
        self._grain = None if self.n <= self.DENSE_MAX else \
            grain.MapDataset.range(self.n).shuffle(seed=self.seed)

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = p
        return p

    def __call__(self, ks) -> np.ndarray:
        ks = np.asarray(ks, np.int64)
        if self._grain is not None:
            return np.asarray([self._grain[int(k)] % self.n for k in ks], np.int64)
        out = np.empty(len(ks), np.int64)
        epochs = ks // self.n
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[ks[m] % self.n]
        return out


class StepData:
    """The training batches, keyed by step.

    ``StepData(cfg, tokenizer, process_index, process_count).local_batch(step)`` is this process's
    rows ``[p * B / P, (p + 1) * B / P)`` of the global batch of ``step`` (``B`` and the sequence
    length from the step's phase, ``train.phases``); :meth:`rows` gives any stretch of it. The
    global batch is the same for every process count and every device mesh, so a checkpoint needs
    no data state and resumes on any number of processes.

    The global batch of step ``i`` (``j = i - start of its phase``): rows ``j * B .. (j + 1) * B``
    of the phase's row sequence, in which the sources follow :class:`mixtures.Interleave` (row
    ``h`` is row number ``k`` of source ``s``), and row ``k`` of source ``s`` is row
    ``perm_e(k mod R_s)`` of the source's packed store (``R_s`` rows), ``e = k // R_s`` the
    epoch and ``perm_e`` a permutation seeded by (``seed``, phase, source) and ``e``
    (:class:`EpochOrder`).

    Every element is a dict of numpy arrays ``[rows, seq_len]``: ``inputs``, ``targets`` (int32),
    ``loss_mask`` (float32, 0 on padding), ``segment_ids``, ``positions`` (int32) and
    ``source_ids`` (int32 index into :func:`source_names`; -1 on padding).

    Attributes: ``source_names``, ``weights`` (resolved mixture), ``skipped_records`` (bad input
    records skipped with ``data.on_error=skip``), ``phases``.
    """

    def __init__(self, cfg, tokenizer, process_index: int = 0, process_count: int = 1, *,
                 log=None):
        from btlm_jax.config import parse_phases

        if not 0 <= process_index < process_count:
            raise DataError(f"process_index={process_index} not in [0, {process_count})")
        self.cfg, self.tokenizer, self._log = cfg, tokenizer, log
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.phases = parse_phases(cfg)
        for i, (_, b, _) in enumerate(self.phases):
            if b % self.process_count:
                what = "train.batch_size" if len(self.phases) == 1 else f"train.phases[{i}]"
                raise DataError(f"{what}: global batch {b} is not divisible by the "
                                f"{self.process_count} processes; use a multiple of it")
        self.seed = int(_get(cfg, "seed", 0))
        self.spec = train_spec(cfg)
        corpus = load_corpus(cfg, self.spec, "data.train")
        self.source_names = source_names(cfg)
        self.weights = mixture_weights(cfg)
        self.active = [s for s in corpus.source_names if self.weights[s] > 0]
        self.interleave = mixtures.Interleave([self.weights[s] for s in self.active])
        self.skipped_records = corpus.skipped
        self._by_phase: dict[int, list] = {}
        self._prefetch = int(_get(cfg, "data.prefetch", 2) or 0) > 0
        self._pool = None
        self._pending: dict[int, Any] = {}

    # -- steps and phases ------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(p[2] for p in self.phases)

    def phase_start(self, phase: int) -> int:
        return sum(p[2] for p in self.phases[:phase])

    def phase_of(self, step: int) -> int:
        """The phase of the step that follows ``step`` completed steps (the last phase after the
        end)."""
        end = 0
        for i, (_, _, n) in enumerate(self.phases):
            end += n
            if step < end:
                return i
        return len(self.phases) - 1

    def batch_shape(self, step: int) -> tuple[int, int]:
        """(global batch, seq_len) of ``step``."""
        seq_len, b, _ = self.phases[self.phase_of(step)]
        return b, seq_len

    def local_range(self, step: int) -> tuple[int, int]:
        b, _ = self.batch_shape(step)
        n = b // self.process_count
        return self.process_index * n, (self.process_index + 1) * n

    # -- rows --------------------------------------------------------------------------------------
    def _sources(self, phase: int):
        """Per active source: (Rows of the phase's store, shuffled row order)."""
        if phase not in self._by_phase:
            seq_len = self.phases[phase][0]
            st = open_store(self.cfg, self.tokenizer, self.spec, "data.train", seq_len,
                            log=self._log)
            out = []
            for s in self.active:
                rows = st.rows(s, self.source_names.index(s))
                order = EpochOrder(len(rows), _seed_for(self.seed, "train", phase, s))
                out.append((rows, order))
            self._by_phase[phase] = out
        return self._by_phase[phase]

    def rows(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``lo .. hi - 1`` of the global batch of ``step``."""
        phase = self.phase_of(step)
        seq_len, b, _ = self.phases[phase]
        if not 0 <= lo <= hi <= b:
            raise IndexError(f"rows [{lo}, {hi}) of a global batch of {b}")
        h0 = (step - self.phase_start(phase)) * b
        assign = self.interleave.rows(h0 + lo, h0 + hi)
        out = {f: np.empty((hi - lo, seq_len), np.float32 if f == "loss_mask" else np.int32)
               for f in FIELDS}
        src = np.asarray([s for s, _ in assign], np.int64)
        for i, (rows, order) in enumerate(self._sources(phase)):
            where = np.flatnonzero(src == i)
            if len(where) == 0:
                continue
            got = rows.take(order([assign[w][1] for w in where]))
            for f in FIELDS:
                out[f][where] = got[f]
        return out

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        return self.rows(step, 0, self.batch_shape(step)[0])

    def _local(self, step: int) -> dict[str, np.ndarray]:
        return self.rows(step, *self.local_range(step))

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of ``step``; the next step's rows are read in
        a background thread meanwhile (``data.prefetch`` > 0)."""
        if not self._prefetch:
            return self._local(step)
        fut = self._pending.pop(step, None)
        self._pending.clear()
        out = fut.result() if fut is not None else self._local(step)
        if self._pool is None:
            import concurrent.futures

            self._pool = concurrent.futures.ThreadPoolExecutor(1, "btlm-data")
        self._sources(self.phase_of(step + 1))  # open (or build) the store in this thread
        self._pending[step + 1] = self._pool.submit(self._local, step + 1)
        return out

    def close(self):
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
