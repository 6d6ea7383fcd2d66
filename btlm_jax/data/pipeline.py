"""The training input: step-keyed batches read from a packed token store.

The global batch of step ``i`` is a pure function of (``seed``, the data config, ``train.phases``,
the run's rollback log, ``i``): the same for every number of processes and every device mesh.
Each process reads only its rows of it (:class:`StepData`), so resuming needs no replay and no
iterator state, and a checkpoint written by N processes resumes on M processes with the same
batches. The training loop (:mod:`btlm_jax.train.feed`) and the batch inspector
(:mod:`btlm_jax.cli.batches`) read the batches through the same :meth:`StepData.rows`.

    corpus files --(once, cached)--> packed store per (corpus, tokenizer, packing[, seq_len])
        (btlm_jax.data.store: every document tokenized and packed, memory-mapped)
    step i -> its segment (btlm_jax.data.positions: phase, start position in each source)
           -> rows of the segment's row sequence [j*B, (j+1)*B)
           -> sources by the mixture (mixtures.Interleave: exact proportions at every step)
           -> row k of source s = row k from the segment's start in s's units, read in a
              fresh random unit order every epoch (SourceUnits, EpochOrder)
           -> this process's rows [p*B/P, (p+1)*B/P)

The data position is global across phases and rollbacks: each source has one cursor, a phase
packs rows at its own length from the next unread unit, and a rollback skips data, never
rewinds it; so a run whose phases add up to at most one pass over a source reads each token at
most once (units, epochs and skips: :mod:`btlm_jax.data.positions`).

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
import math
import os
import threading
from typing import Any

import grain
import numpy as np

from btlm_jax.data import mixtures, positions, sample, slimpajama
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


def mixture_weights(cfg, tokenizer, log=None) -> dict[str, float]:
    """The resolved per-source training weights (normalised; 0 = not sampled). The natural
    mixture (``data.mixture`` empty) weights each source by its tokens: the exact counts of the
    packed store the run trains from (built here if missing)."""
    from btlm_jax.config import parse_phases

    corpus = load_corpus(cfg, train_spec(cfg), "data.train")
    spec = _get(cfg, "data.mixture", "") or ""
    natural: dict[str, float] = {}
    if not spec.strip():
        phases = parse_phases(cfg)
        st = open_store(cfg, tokenizer, train_spec(cfg), "data.train", phases[0][0], log=log,
                        unit_tokens=unit_size(phases, _get(cfg, "data.packing", "concat")))
        natural = {s: st.tokens(s) for s in st.source_names}
    return mixtures.resolve_mixture(spec, corpus.source_names, natural)


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


def open_store(cfg, tokenizer, spec: str, key: str, seq_len: int, log=None,
               unit_tokens: int = 0) -> store_lib.Store:
    """The packed store of ``spec`` for this tokenizer, ``seq_len`` and ``data.packing`` (a
    document store in units of ``unit_tokens`` stream tokens when > 0)."""
    corpus = load_corpus(cfg, spec, key)
    return store_lib.open_or_build(
        corpus, corpus_identity(cfg, spec), tokenizer, cache_dir(cfg), seq_len=seq_len,
        packing=_get(cfg, "data.packing", "concat"),
        num_workers=int(_get(cfg, "data.num_workers", 0) or 0), log=log, unit_tokens=unit_tokens)


class EpochOrder:
    """The order in which a source's ``n`` units are read: unit position ``k`` is unit
    ``perm_e(k mod n)``, ``e = k // n``, a fresh permutation every epoch.

    Up to :attr:`DENSE_MAX` units the permutation of an epoch is NumPy's (``default_rng((seed,
    e)).permutation(n)``, cached for two epochs); above, Grain's index shuffle computes each entry
    on its own (O(1) memory, about 35 us per unit; it is slow on small ranges)."""

    DENSE_MAX = 1 << 22

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the prefetch thread and the loop may both read
        self._grain = None if self.n <= self.DENSE_MAX else \
            grain.MapDataset.range(self.n).shuffle(seed=self.seed)

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole permutation of ``epoch`` (NumPy's, whatever ``n``)."""
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
            out[m] = self.permutation(int(e))[ks[m] % self.n]
        return out


DOC_UNIT_ROWS = 32  # document packing with several lengths: units of 32 x the longest length


def unit_size(phases, packing: str) -> int:
    """The unit of the data position (:mod:`btlm_jax.data.positions`) in stream tokens: concat,
    the least common multiple of the phases' lengths; document packing, 0 (one packed row) when
    every phase has the same length, else ``DOC_UNIT_ROWS`` x the longest length."""
    lengths = sorted({int(p[0]) for p in phases})
    if packing == "concat":
        return math.lcm(*lengths)
    return 0 if len(lengths) == 1 else DOC_UNIT_ROWS * lengths[-1]


class SourceUnits:
    """One source's units in epoch order and where the rows of each phase lie in them.

    ``per_unit[phase]`` is an int (every unit holds that many rows of the phase's length: concat
    packing, or document packing with one row per unit) or an int64 array (document packing in
    units: the first row of each unit, then the row count)."""

    def __init__(self, name: str, n: int, seed: int):
        self.name, self.n = name, int(n)
        self.order = EpochOrder(self.n, seed)
        self.per_unit: dict[int, Any] = {}
        self._cum: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def _cumulative(self, phase: int, epoch: int) -> np.ndarray:
        """Rows before each unit position of ``epoch`` (n + 1 entries), document units."""
        key = (phase, epoch)
        with self._lock:
            c = self._cum.get(key)
        if c is None:
            off = self.per_unit[phase]
            counts = np.diff(off)[self.order.permutation(epoch)]
            c = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            with self._lock:
                if len(self._cum) >= 8:
                    self._cum.pop(next(iter(self._cum)))
                self._cum[key] = c
        return c

    def _first_row(self, phase: int, start: int) -> int:
        """Document units: the number of rows before unit position ``start``."""
        per_epoch = int(self.per_unit[phase][-1])
        e, p = divmod(int(start), self.n)
        return e * per_epoch + int(self._cumulative(phase, e)[p])

    def end(self, phase: int, start: int, rows: int) -> int:
        """The unit position after the last of ``rows`` rows read from unit position ``start``."""
        m = self.per_unit[phase]
        if rows <= 0:
            return int(start)
        if isinstance(m, int):
            return int(start) + -(-int(rows) // m)
        per_epoch = int(m[-1])
        e, w = divmod(self._first_row(phase, start) + int(rows) - 1, per_epoch)
        p = int(np.searchsorted(self._cumulative(phase, e), w, "right")) - 1
        return e * self.n + p + 1

    def locate(self, phase: int, start: int, ks) -> np.ndarray:
        """The store rows (at the phase's length) of rows ``ks`` counted from ``start``."""
        ks = np.asarray(ks, np.int64)
        m = self.per_unit[phase]
        if isinstance(m, int):
            pos = int(start) + ks // m
            return self.order(pos) * m + ks % m
        per_epoch = int(m[-1])
        g = self._first_row(phase, start) + ks
        out = np.empty(len(ks), np.int64)
        epochs = g // per_epoch
        for e in np.unique(epochs):
            sel = epochs == e
            w = g[sel] % per_epoch
            cum = self._cumulative(phase, int(e))
            p = np.searchsorted(cum, w, "right") - 1
            out[sel] = m[self.order.permutation(int(e))[p]] + (w - cum[p])
        return out


class StepData:
    """The training batches, keyed by step.

    ``StepData(cfg, tokenizer, process_index, process_count, rollbacks=...).local_batch(step)`` is
    this process's rows ``[p * B / P, (p + 1) * B / P)`` of the global batch of ``step`` (``B``
    and the sequence length from the step's phase, ``train.phases``); :meth:`rows` gives any
    stretch of it. The global batch is a pure function of the config, the step and the run's
    rollback log (:meth:`set_rollbacks`), the same for every process count and every device mesh,
    so a checkpoint carries only the log and resumes on any number of processes.

    The global batch of step ``i`` (the batch index: ``i`` completed steps): rows ``j * B .. (j +
    1) * B`` of its segment (``j = i -`` the segment's first step), in which the sources follow
    :class:`mixtures.Interleave` (row ``h`` is row ``k`` of source ``s``), and row ``k`` of source
    ``s`` is the ``k``-th row from the segment's start in the source's units, read in epoch order
    (:class:`SourceUnits`, :class:`EpochOrder`); segments, units and epochs are described in
    :mod:`btlm_jax.data.positions`.

    Every element is a dict of numpy arrays ``[rows, seq_len]``: ``inputs``, ``targets`` (int32),
    ``loss_mask`` (float32, 0 on padding), ``segment_ids``, ``positions`` (int32) and
    ``source_ids`` (int32 index into :func:`source_names`; -1 on padding).

    Attributes: ``source_names``, ``weights`` (resolved mixture), ``skipped_records`` (bad input
    records skipped with ``data.on_error=skip``), ``phases``, ``rollbacks``.
    """

    def __init__(self, cfg, tokenizer, process_index: int = 0, process_count: int = 1, *,
                 log=None, rollbacks=()):
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
        self.packing = _get(cfg, "data.packing", "concat")
        self.unit_tokens = unit_size(self.phases, self.packing)
        corpus = load_corpus(cfg, self.spec, "data.train")
        self.source_names = source_names(cfg)
        self.weights = mixture_weights(cfg, tokenizer, log=log)
        self.active = [s for s in corpus.source_names if self.weights[s] > 0]
        self.interleave = mixtures.Interleave([self.weights[s] for s in self.active])
        self.skipped_records = corpus.skipped
        self._stores: dict[int, store_lib.Store] = {}
        self._rows: dict[tuple[int, int], store_lib.Rows] = {}
        self._units: list[SourceUnits] = []
        self._open_lock = threading.Lock()
        for i, s in enumerate(self.active):
            self._units.append(SourceUnits(s, self._count_units(s), _seed_for(self.seed, "train",
                                                                              s)))
        self._prefetch = int(_get(cfg, "data.prefetch", 2) or 0) > 0
        self._pool = None
        self._pending: dict[int, Any] = {}
        self._plan = positions.Plan(self.phases, self.interleave, self, rollbacks)

    # -- the rollback log ------------------------------------------------------------------------
    @property
    def rollbacks(self) -> list[positions.Rollback]:
        return list(self._plan.rollbacks)

    def set_rollbacks(self, rollbacks) -> None:
        """Reads the batches of the trajectory the rollback log describes from now on."""
        plan = positions.Plan(self.phases, self.interleave, self, rollbacks)
        self._pending.clear()  # batches read ahead for the previous trajectory
        self._plan = plan

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

    # -- units and rows ----------------------------------------------------------------------------
    def _store(self, phase: int) -> store_lib.Store:
        seq_len = self.phases[phase][0]
        key = 0 if self.packing == "concat" else seq_len  # one concat store serves every length
        with self._open_lock:
            if key not in self._stores:
                self._stores[key] = open_store(self.cfg, self.tokenizer, self.spec, "data.train",
                                               seq_len, log=self._log,
                                               unit_tokens=self.unit_tokens)
            return self._stores[key]

    def _source_rows(self, i: int, phase: int) -> store_lib.Rows:
        """Active source ``i``'s rows at ``phase``'s length (and its units' rows there)."""
        key = (i, phase)
        if key not in self._rows:
            seq_len, s = self.phases[phase][0], self.active[i]
            rows = self._store(phase).rows(s, self.source_names.index(s), seq_len)
            u = self._units[i]
            if self.packing == "concat":
                u.per_unit[phase] = self.unit_tokens // seq_len
            elif self.unit_tokens:
                off = rows.unit_rows()
                if len(off) != u.n + 1:
                    raise DataError(f"the packed stores of {self.spec!r} at different lengths do "
                                    f"not hold the same units of source {s!r}; clear "
                                    f"{cache_dir(self.cfg)}/store and rerun")
                u.per_unit[phase] = off
            else:
                u.per_unit[phase] = 1
            self._rows[key] = rows
        return self._rows[key]

    def _count_units(self, source: str) -> int:
        st = self._store(0)
        idx = st.source_names.index(source)
        tokens = st.tokens(source)
        if self.packing == "concat":
            n = (tokens - 1) // self.unit_tokens
            if n < 1:
                lengths = sorted({p[0] for p in self.phases})
                why = ("the sequence length" if len(lengths) == 1 else
                       f"the least common multiple of the phases' lengths {lengths}")
                raise DataError(
                    f"source {source!r} of {self.spec!r} has {tokens} tokens, fewer than one row "
                    f"of {self.unit_tokens} + 1 ({why}); add data, give the source weight 0 "
                    "(data.mixture) or use phase lengths that divide the longest")
            return n
        if self.unit_tokens:
            return int(st.meta["sources"][idx]["units"])
        return int(st.meta["sources"][idx]["rows"])

    def end(self, source: int, phase: int, start: int, rows: int) -> int:
        """:class:`btlm_jax.data.positions.Layout`: see :meth:`SourceUnits.end`."""
        self._source_rows(source, phase)
        return self._units[source].end(phase, start, rows)

    def rows(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``lo .. hi - 1`` of the global batch of ``step`` (its batch index)."""
        phase = self.phase_of(step)
        seq_len, b, _ = self.phases[phase]
        if not 0 <= lo <= hi <= b:
            raise IndexError(f"rows [{lo}, {hi}) of a global batch of {b}")
        seg, assign = self._plan.rows(step, lo, hi)
        out = {f: np.empty((hi - lo, seq_len), np.float32 if f == "loss_mask" else np.int32)
               for f in FIELDS}
        src = np.asarray([s for s, _ in assign], np.int64)
        ks = np.asarray([k for _, k in assign], np.int64)
        for i, u in enumerate(self._units):
            where = np.flatnonzero(src == i)
            if len(where) == 0:
                continue
            rows = self._source_rows(i, phase)
            got = rows.take(u.locate(phase, seg.units[i], ks[where]))
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
        nxt = self.phase_of(step + 1)
        for i in range(len(self._units)):  # open (or build) the next phase's store in this thread
            self._source_rows(i, nxt)
        self._pending[step + 1] = self._pool.submit(self._local, step + 1)
        return out

    def close(self):
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
