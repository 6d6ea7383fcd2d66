"""The pieces of the input chain that are ours, as Grain datasets and selection maps: the mixture
(:class:`SegmentMixture`; :class:`RoundRobin` for evaluation), the batching with one batched read
per step (:class:`Batch`), the step-keyed, per-process assembly of the run's rows
(:func:`step_batches`), the iterator over Grain's prefetch threads and worker processes
(:func:`worker_processes`), and how the chain's cached pieces pickle into those processes
(:class:`LocalCaches`).

The mixture is :class:`btlm_jax.data.mixtures.Interleave` (Sainte-Lague, weights at 2^-30),
plugged into Grain's own mixing dataset, ``grain.MapDataset.select_from_datasets``, as a
``grain.transforms.DatasetSelectionMap`` (:class:`SegmentMixture`). ``grain.MapDataset.mix`` is
not used because its proportions are not exact: it rounds the weights down to integers with the
smallest at 100 (``[1, 1.999]`` mixes as ``100:199``, so after 20,000 rows the second source is
20 rows short, and the gap grows with the run), and its nested split drifts up to 4.4 rows from
the weights inside a stretch with SlimPajama's seven sources, where the Sainte-Lague interleave
stays within 1.4 rows at every row and never drifts (measured over 20,000 rows by
``benchmarks/data_pipeline.py``, table in benchmarks/RESULTS.md). A step of ``B`` rows therefore
holds each source's share of ``B`` rounded, every step.
"""

from __future__ import annotations

import threading
from typing import Sequence

import grain
import numpy as np


class LocalCaches:
    """Pickles without its lock (``_lock``) and with its caches (the dicts named by ``_CACHES``)
    empty: Grain's worker processes get a copy of the chain and rebuild both on demand."""

    _CACHES: tuple[str, ...] = ()

    def __getstate__(self):
        d = self.__dict__.copy()
        d.update({k: {} for k in self._CACHES}, _lock=None)
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()


class SegmentMixture(LocalCaches, grain.transforms.DatasetSelectionMap):
    """Row ``h`` of a segment -> ``(source, element of the source's UnitRows)``: the
    interleave's ``(s, k)`` for row ``h``, at row ``first[s] + k`` of source ``s``'s rows in
    unit order (``first[s]``: the rows before the segment's start unit).

    The interleave is computed a block of ``block`` rows at a time (one step's global batch) and
    the newest blocks are kept, so reading a batch row by row costs one interleave per step."""

    _CACHES = ("_blocks", "_ends")

    def __init__(self, interleave, first: Sequence[int], rows: int, block: int):
        self.interleave, self.first = interleave, tuple(int(x) for x in first)
        self.rows, self.block = int(rows), max(1, int(block))
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._ends: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"SegmentMixture(rows={self.rows}, first={self.first})"

    def _counts(self, h: int) -> list[int]:
        """The interleave's per-source counts before row ``h`` (cached: a block's end is the
        next block's start)."""
        with self._lock:
            c = self._ends.get(h)
        if c is None:
            c = self.interleave.counts_before(h)
            with self._lock:
                if len(self._ends) >= 8:
                    self._ends.pop(min(self._ends))
                self._ends[h] = c
        return c

    def _get_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            got = self._blocks.get(b)
        if got is None:
            lo = b * self.block
            hi = min(lo + self.block, self.rows)
            pairs = self.interleave.between(self._counts(lo), self._counts(hi))
            got = (np.asarray([s for s, _ in pairs], np.int64),
                   np.asarray([self.first[s] + k for s, k in pairs], np.int64))
            with self._lock:
                if len(self._blocks) >= 4:
                    self._blocks.pop(min(self._blocks))
                self._blocks[b] = got
        return got

    def __getitem__(self, h: int) -> tuple[int, int]:
        h = int(h)
        if not 0 <= h < self.rows:
            raise IndexError(f"row {h} of a segment of {self.rows} rows")
        src, key = self._get_block(h // self.block)
        j = h % self.block
        return int(src[j]), int(key[j])


class RoundRobin(grain.transforms.DatasetSelectionMap):
    """Row ``h`` -> source ``h mod S``, its row ``(h // S) mod len``: every source the same
    number of rows, a short source wrapping around (the evaluation rows)."""

    def __init__(self, lengths: Sequence[int], rows: int):
        self.lengths, self.rows = [int(n) for n in lengths], int(rows)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, h: int) -> tuple[int, int]:
        s, k = h % len(self.lengths), h // len(self.lengths)
        return s, k % self.lengths[s]


class Batch(grain.MapDataset):
    """``parent`` in batches of ``size`` rows (element ``i``: rows ``i * size .. (i + 1) * size -
    1``, stacked). Grain's ``MapDataset.batch`` with one difference: it reads the rows of a
    batch with one ``_getitems`` call down the chain (Grain 0.2.18 keeps that batched read behind
    an experiment flag and reads row by row), so each source's store rows of a step are one
    vectorized read (a 528 x 2048 step of the sample corpus: 18 ms instead of 27)."""

    def __init__(self, parent: grain.MapDataset, size: int):
        super().__init__(parent)
        self._size = int(size)
        if len(parent) % self._size:
            raise ValueError(f"{len(parent)} rows do not make batches of {self._size}")

    def __len__(self) -> int:
        return len(self._parent) // self._size

    def __str__(self) -> str:
        return f"Batch(size={self._size})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        lo = int(index) * self._size
        rows = self._parent._getitems(list(range(lo, lo + self._size)))
        with self._stats.record_self_time():
            return stack(rows)


def mixture(sources: Sequence[grain.MapDataset], selection) -> grain.MapDataset:
    """Grain's mixing dataset over ``sources`` with our selection map."""
    return grain.MapDataset.select_from_datasets(list(sources), selection)


def step_batches(rows: grain.MapDataset, phases, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """The run's row sequence -> one element per step: this process's rows of the step's global
    batch, ``[p * B / P, (p + 1) * B / P)``, stacked (``process_count=1``: the global batch).

    Per phase (``(seq_len, B, steps)``): the phase's rows, batched ``B / P`` at a time, every
    ``P``-th batch from the ``p``-th; the phases concatenated."""
    parts, r = [], 0
    P, p = int(process_count), int(process_index)
    for _, b, steps in phases:
        phase_rows = rows.slice(slice(r, r + steps * b))
        parts.append(Batch(phase_rows, b // P).slice(slice(p, None, P)))
        r += steps * b
    if r > len(rows):
        raise ValueError(f"the phases need {r} rows, the row sequence has {len(rows)}")
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)


def stack(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """Rows (dicts of arrays) stacked along a new first axis, as ``MapDataset.batch`` does."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def worker_processes(ds: grain.MapDataset, workers: int, *, prefetch: int = 1):
    """An iterator over ``ds`` in order: in this process with ``prefetch`` elements read ahead
    in as many threads, or, with ``workers`` > 0, in Grain's worker processes (``mp_prefetch``:
    worker ``w`` computes elements ``w, w + workers, ...``, pickled into it)."""
    prefetch = max(int(prefetch), 0)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch))
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(workers)))
    return iter(it)

