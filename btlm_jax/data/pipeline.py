"""The training input: step-keyed batches read from a packed token store.

The global batch of step ``i`` is a pure function of (``seed``, the data config, ``train.phases``,
``i``): the same for every number of processes and every device mesh. Each process reads only its
rows of it (:class:`StepData`), so resuming needs no replay and no iterator state, and a
checkpoint written by N processes resumes on M processes with the same batches.

    corpus files --(once, cached)--> packed store per (corpus, tokenizer, seq_len, packing)
        (btlm_jax.data.store: every document tokenized and packed into rows, memory-mapped)
    step i -> phase, row range [j*B, (j+1)*B) of the phase's row sequence
           -> sources by the mixture (mixtures.Interleave: exact proportions at every step)
           -> row k of source s = stored row perm_epoch(k mod rows_s) (EpochOrder)
           -> this process's rows [p*B/P, (p+1)*B/P)

Packing (``data.packing``, see :mod:`btlm_jax.data.store`): ``concat`` (BTLM: documents + EOS cut
into rows) or ``document`` (whole documents, segment ids and per-document positions; attention
must not cross segments).

Every batch is a dict of numpy arrays ``[rows, seq_len]``: ``inputs``, ``targets`` (int32),
``loss_mask`` (float32, 0 on padding), ``segment_ids``, ``positions`` (int32) and ``source_ids``
(int32 index into :func:`source_names`; -1 on padding).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from typing import Any

import grain
import numpy as np

from btlm_jax.data import mixtures, sample, slimpajama
from btlm_jax.data import store as store_lib
from btlm_jax.data.slimpajama import DataError

log = logging.getLogger(__name__)

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


def _seed_for(seed: int, *parts) -> int:
    h = hashlib.sha256(repr((int(seed),) + parts).encode()).digest()
    return int.from_bytes(h[:4], "little")


class StepIterator:
    """An iterator over this process's batches of :class:`StepData`, from the first step of a
    phase. Its state is only the step (the same on every process), for loops that checkpoint an
    iterator state."""

    def __init__(self, data: "StepData", start: int):
        self.data, self.step = data, int(start)
        self.source_names, self.weights = data.source_names, data.weights
        self.skipped_records = data.skipped_records

    @property
    def skipped_documents(self) -> int:
        return self.skipped_records

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.data.local_batch(self.step)
        self.step += 1
        return out

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])

    def close(self):
        self.data.close()


def make_train_iterator(cfg, tokenizer, *, seq_len: int, batch_size: int, phase: int = 0,
                        process_index: int = 0, process_count: int = 1) -> StepIterator:
    """This process's batches of phase ``phase`` of ``train.phases`` (``seq_len`` and
    ``batch_size`` must be that phase's), from the phase's first step: :class:`StepData` as an
    iterator."""
    data = StepData(cfg, tokenizer, process_index, process_count)
    want = data.phases[phase][:2]
    if (seq_len, batch_size) != tuple(want):
        raise ValueError(f"phase {phase} of the config is seq_len {want[0]} x batch {want[1]}, "
                         f"not {seq_len} x {batch_size}")
    return StepIterator(data, data.phase_start(phase))


def make_eval_batches(cfg, tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int, contiguous: bool = False) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches from ``data.eval`` (or the sample corpus' holdout).

    The rows are those of the eval corpus' packed store in order (documents in file order, each
    source packed separately), taken round-robin across sources, so every source gets an equal
    number of rows (per-source losses come from ``source_ids``); a source with fewer rows wraps
    around. Every process computes the same (whole) batches. Returns [] when there is no
    evaluation data (``data.eval`` unset while ``data.train`` is set).

    ``contiguous``: only rows that lie inside one document (no end-of-document token among the
    inputs after the first), so a long row never reads across into an unrelated text; an error
    when no row of ``seq_len`` fits inside a document.
    """
    spec = eval_spec(cfg)
    if spec is None:
        log.warning("data.eval is unset (and data.train is set): no evaluation batches")
        return []
    st = open_store(cfg, tokenizer, spec, "data.eval", seq_len)
    names = source_names(cfg)
    srcs = [st.rows(s, names.index(s), seq_len) for s in st.source_names]
    if contiguous:
        srcs = [_ContiguousRows(r, tokenizer.eos_id) for r in srcs]
        srcs = [r for r in srcs if len(r)]
        if not srcs:
            raise DataError(f"data.eval={spec!r}: no document is {seq_len} tokens long, so no "
                            "evaluation row lies inside one document; give longer texts")
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


class _ContiguousRows:
    """The rows of ``rows`` that hold no end-of-document token after their first input."""

    def __init__(self, rows, eos_id: int):
        self.rows = rows
        inputs = rows.take(np.arange(len(rows)))["inputs"] if len(rows) else np.zeros((0, 1))
        self.keep = np.flatnonzero(~np.any(inputs[:, 1:] == eos_id, axis=1))

    def __len__(self) -> int:
        return int(self.keep.size)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return self.rows.take(self.keep[np.asarray(idx)])


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
        self._lock = threading.Lock()  # the prefetch thread and the loop may both read
        self._grain = None if self.n <= self.DENSE_MAX else \
            grain.MapDataset.range(self.n).shuffle(seed=self.seed)

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
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
        from btlm_jax.config import parse_phases, phase_of

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
        from btlm_jax.config import phase_of

        return phase_of(self.phases, step)

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
                rows = st.rows(s, self.source_names.index(s), seq_len)
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
