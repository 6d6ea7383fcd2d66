"""The training input: a chain of ``grain.MapDataset``s, keyed by step, over a packed token store.

The global batch of step ``i`` is ``dataset[i]``, a pure function of (``seed``, the data config,
``train.phases``, the run's rollback log, ``i``): the same for every number of processes and
every device mesh. Each process reads only its rows of it, so resuming needs no replay and no
iterator state, and a checkpoint written by N processes resumes on M processes with the same
batches. The training loop (:mod:`btlm_jax.train.feed`) and the batch inspector
(:mod:`btlm_jax.cli.batches`) read the same chain (:class:`StepData`;
:func:`btlm_jax.data.train_dataset` builds it for a run directory)::

    corpus files (.jsonl.zst, .jsonl, .txt, .array_record) --(once, cached)--> packed store
        (btlm_jax.data.store: every document tokenized and packed, memory-mapped)
    per source s and phase p (btlm_jax.data.units):
      Rows                                       the store's rows at the phase's length, a
                                                 Grain data source (btlm_jax.data.store)
      UnitOrder                                  the units' order, a fresh shuffle per epoch
      UnitRows(UnitOrder, Rows)                  the rows in unit order
    per segment (btlm_jax.data.positions: a stretch of steps, one phase, its start units):
      grain.MapDataset.select_from_datasets(     the mixture: exact proportions at every step
          [UnitRows of each source], SegmentMixture)   (btlm_jax.data.chain)
    grain.MapDataset.concatenate(segments)       the run's row sequence
      -> data.transforms                         user MapDataset transforms (btlm_jax.data
                                                 .transforms)
      -> per phase: .slice(phase's rows), Batch(B / P), .slice(p::P); concatenated
                                                 this process's rows of each step's batch
                                                 (P processes, this one p)
    dataset[i]                                   the batch of step i

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

import grain
import numpy as np

from btlm_jax.data import chain, mixtures, positions, sample, slimpajama
from btlm_jax.data import store as store_lib
from btlm_jax.data import transforms as transforms_lib
from btlm_jax.data import units as units_lib
from btlm_jax.data.slimpajama import DataError

log = logging.getLogger(__name__)

FIELDS = store_lib.FIELDS


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


def make_eval_batches(cfg, tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int, contiguous: bool = False) -> list[dict[str, np.ndarray]]:
    """Deterministic evaluation batches from ``data.eval`` (or the sample corpus' holdout).

    A Grain chain (:func:`eval_dataset`): the rows of the eval corpus' packed store in order
    (documents in file order, each source packed separately), taken round-robin across sources,
    so every source gets an equal number of rows (per-source losses come from ``source_ids``); a
    source with fewer rows wraps around. Every process computes the same (whole) batches.
    Returns [] when there is no evaluation data (``data.eval`` unset while ``data.train`` is
    set).

    ``contiguous``: only rows that lie inside one document (no end-of-document token among the
    inputs after the first), so a long row never reads across into an unrelated text; an error
    when no row of ``seq_len`` fits inside a document.
    """
    ds = eval_dataset(cfg, tokenizer, seq_len=seq_len, batch_size=batch_size,
                      num_batches=num_batches, contiguous=contiguous)
    return [] if ds is None else [ds[b] for b in range(len(ds))]


def eval_dataset(cfg, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                 contiguous: bool = False) -> grain.MapDataset | None:
    """The evaluation batches as a ``grain.MapDataset`` (element ``b``: batch ``b``), or None
    without evaluation data: per source ``grain.MapDataset.source(Rows)`` (``contiguous``: only
    the rows inside one document), mixed round-robin (:class:`chain.RoundRobin`), batched."""
    spec = eval_spec(cfg)
    if spec is None:
        log.warning("data.eval is unset (and data.train is set): no evaluation batches")
        return None
    st = open_store(cfg, tokenizer, spec, "data.eval", seq_len)
    names = source_names(cfg)
    srcs = [st.rows(s, names.index(s), seq_len) for s in st.source_names]
    if contiguous:
        srcs = [_Contiguous(r, tokenizer.eos_id) for r in srcs]
        srcs = [r for r in srcs if len(r)]
        if not srcs:
            raise DataError(f"data.eval={spec!r}: no document is {seq_len} tokens long, so no "
                            "evaluation row lies inside one document; give longer texts")
    total = batch_size * num_batches
    rows = chain.mixture([grain.MapDataset.source(r) for r in srcs],
                         chain.RoundRobin([len(r) for r in srcs], total))
    return rows.batch(batch_size)


class _Contiguous:
    """The rows of ``rows`` that hold no end-of-document token after their first input (a Grain
    data source)."""

    def __init__(self, rows: store_lib.Rows, eos_id: int):
        self.rows = rows
        inputs = rows.take(np.arange(len(rows)))["inputs"] if len(rows) else np.zeros((0, 1))
        self.keep = np.flatnonzero(~np.any(inputs[:, 1:] == eos_id, axis=1))

    def __len__(self) -> int:
        return int(self.keep.size)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.rows[int(self.keep[i])]


# ----------------------------------------------------------------------------------------------
# Step-keyed training data: the global batch of step i is a pure function of (seed, data config,
# phases, rollback log, i), whatever the number of processes; each process reads only its rows.


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


DOC_UNIT_ROWS = 32  # document packing with several lengths: units of 32 x the longest length


def unit_size(phases, packing: str) -> int:
    """The unit of the data position (:mod:`btlm_jax.data.positions`) in stream tokens: concat,
    the least common multiple of the phases' lengths; document packing, 0 (one packed row) when
    every phase has the same length, else ``DOC_UNIT_ROWS`` x the longest length."""
    lengths = sorted({int(p[0]) for p in phases})
    if packing == "concat":
        return math.lcm(*lengths)
    return 0 if len(lengths) == 1 else DOC_UNIT_ROWS * lengths[-1]


class StepData:
    """The training batches, keyed by step: the run's chain of ``grain.MapDataset``s.

    ``StepData(cfg, tokenizer, process_index, process_count, rollbacks=...)``: :meth:`dataset`
    is the chain (``dataset(p, P)[i]``: process ``p``'s rows ``[p * B / P, (p + 1) * B / P)`` of
    the global batch of step ``i``; ``dataset()[i]``: the whole global batch), ``B`` and the
    sequence length from the step's phase (``train.phases``). The global batch is a pure
    function of the config, the step and the run's rollback log (:meth:`set_rollbacks`), the same
    for every process count and every device mesh, so a checkpoint carries only the log and
    resumes on any number of processes. :meth:`reader` iterates over this process's batches from
    a step with Grain's prefetch (``data.prefetch``) and worker processes (``data.num_workers``).

    The global batch of step ``i`` (the batch index: ``i`` completed steps): rows ``j * B .. (j +
    1) * B`` of its segment (``j = i -`` the segment's first step), in which the sources follow
    :class:`mixtures.Interleave` (row ``h`` is row ``k`` of source ``s``), and row ``k`` of source
    ``s`` is the ``k``-th row from the segment's start in the source's units, read in epoch order
    (:mod:`btlm_jax.data.units`); segments, units and epochs are described in
    :mod:`btlm_jax.data.positions`. ``data.transforms`` then apply to each row.

    Every element is a dict of numpy arrays ``[rows, seq_len]``: ``inputs``, ``targets`` (int32),
    ``loss_mask`` (float32, 0 on padding), ``segment_ids``, ``positions`` (int32) and
    ``source_ids`` (int32 index into :func:`source_names`; -1 on padding), plus any field a
    transform adds.

    Attributes: ``source_names``, ``weights`` (resolved mixture), ``skipped_records`` (bad input
    records skipped with ``data.on_error=skip``), ``phases``, ``rollbacks``, ``rows_dataset``
    (the run's row sequence after the transforms).
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
        self.transforms = transforms_lib.parse(_get(cfg, "data.transforms", ()))
        for i, name in enumerate(self.transforms):  # a typo fails here, before any store build
            transforms_lib.resolve(name, i)
        corpus = load_corpus(cfg, self.spec, "data.train")
        self.source_names = source_names(cfg)
        self.weights = mixture_weights(cfg, tokenizer, log=log)
        self.active = [s for s in corpus.source_names if self.weights[s] > 0]
        self.interleave = mixtures.Interleave([self.weights[s] for s in self.active])
        self.skipped_records = corpus.skipped
        self._stores: dict[int, store_lib.Store] = {}
        self._rows: dict[tuple[int, int], store_lib.Rows] = {}
        self._streams: dict[tuple[int, int], units_lib.UnitRows] = {}
        self._open_lock = threading.Lock()
        self._units = [units_lib.SourceUnits(s, self._count_units(s),
                                             _seed_for(self.seed, "train", s))
                       for s in self.active]
        self.set_rollbacks(rollbacks)

    # -- the rollback log and the chain --------------------------------------------------------
    @property
    def rollbacks(self) -> list[positions.Rollback]:
        return list(self._plan.rollbacks)

    def set_rollbacks(self, rollbacks) -> None:
        """Builds the chain of the trajectory the rollback log describes."""
        plan = positions.Plan(self.phases, self.interleave, self, rollbacks)
        segs = plan.segments
        parts = []
        for g, seg in enumerate(segs):
            stop = segs[g + 1].start if g + 1 < len(segs) else plan.total
            b = self.phases[seg.phase][1]
            streams = [self._stream(i, seg.phase) for i in range(len(self._units))]
            first = [u.first_row(seg.phase, seg.units[i]) for i, u in enumerate(self._units)]
            mix = chain.SegmentMixture(self.interleave, first, (stop - seg.start) * b, b)
            parts.append(chain.mixture(streams, mix))
        rows = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        self.rows_dataset = transforms_lib.apply(rows, self.transforms)
        self._global = chain.step_batches(self.rows_dataset, self.phases)
        self._local = (self._global if self.process_count == 1 else chain.step_batches(
            self.rows_dataset, self.phases, self.process_index, self.process_count))
        self._first_rows = np.cumsum([0] + [b * n for _, b, n in self.phases])
        self._plan = plan

    def dataset(self, process_index: int | None = None,
                process_count: int | None = None) -> grain.MapDataset:
        """The chain: element ``i`` is process ``process_index``'s rows of the batch of step
        ``i`` (default: this object's process); ``dataset(0, 1)``: the global batches."""
        p = self.process_index if process_index is None else int(process_index)
        n = self.process_count if process_count is None else int(process_count)
        if (p, n) == (0, 1):
            return self._global
        if (p, n) == (self.process_index, self.process_count):
            return self._local
        for i, (_, b, _) in enumerate(self.phases):
            if b % n:
                raise DataError(f"train.phases[{i}]: global batch {b} is not divisible by {n}")
        return chain.step_batches(self.rows_dataset, self.phases, p, n)

    def reader(self, start: int, *, prefetch: int | None = None, workers: int | None = None):
        """An iterator over this process's batches of steps ``start, start + 1, ...``: Grain's
        ``to_iter_dataset`` with ``prefetch`` batches read ahead in as many threads
        (``data.prefetch``) and, with ``workers`` > 0, Grain's worker processes
        (``data.num_workers``, ``mp_prefetch``: worker ``w`` reads the steps ``start + w``,
        ``start + w + workers``, ...). Close it with ``.close()``."""
        prefetch = int(_get(self.cfg, "data.prefetch", 2) or 0) if prefetch is None else prefetch
        workers = int(_get(self.cfg, "data.num_workers", 0) or 0) if workers is None else workers
        return chain.worker_processes(self._local.slice(slice(int(start), None)), workers,
                                      prefetch=prefetch)

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

    def _check_step(self, step: int) -> int:
        if not 0 <= int(step) < self.total_steps:
            raise IndexError(f"step {step}: the run has batches 0 .. {self.total_steps - 1}")
        return int(step)

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

    def _stream(self, i: int, phase: int) -> units_lib.UnitRows:
        """Active source ``i``'s rows at ``phase``'s length in unit order (a MapDataset)."""
        key = (i, phase)
        if key not in self._streams:
            self._streams[key] = units_lib.UnitRows(self._units[i], phase,
                                                    self._source_rows(i, phase))
        return self._streams[key]

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
        """:class:`btlm_jax.data.positions.Layout`: see :meth:`units.SourceUnits.end`."""
        self._source_rows(source, phase)
        return self._units[source].end(phase, start, rows)

    # -- batches -----------------------------------------------------------------------------------
    def rows(self, step: int, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``lo .. hi - 1`` of the global batch of ``step`` (its batch index): elements of
        :attr:`rows_dataset`, stacked."""
        step = self._check_step(step)
        phase = self.phase_of(step)
        seq_len, b, _ = self.phases[phase]
        if not 0 <= lo <= hi <= b:
            raise IndexError(f"rows [{lo}, {hi}) of a global batch of {b}")
        r0 = int(self._first_rows[phase]) + (step - self.phase_start(phase)) * b
        if hi == lo:
            return {f: np.empty((0, seq_len), np.float32 if f == "loss_mask" else np.int32)
                    for f in FIELDS}
        return chain.stack(self.rows_dataset._getitems(list(range(r0 + lo, r0 + hi))))

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        """The global batch of ``step``: ``dataset(0, 1)[step]``."""
        return self._global[self._check_step(step)]

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of ``step``: ``dataset()[step]``."""
        return self._local[self._check_step(step)]
