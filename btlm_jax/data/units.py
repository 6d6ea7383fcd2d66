"""A source's units in epoch order, and its rows at one length in that order, as Grain datasets.

Units and epochs are described in :mod:`btlm_jax.data.positions`. Here:

* :class:`UnitOrder`, a ``grain.MapDataset``: element ``k`` is the unit at unit position ``k``,
  ``perm_e(k mod n)`` of epoch ``e = k // n``, a fresh permutation every epoch (Grain's
  ``MapDataset.shuffle`` above 4M units, NumPy's permutation below: see the class), a pure
  function of ``(seed, k)``, the same in every process. ``seed`` comes from the run's seed and
  the source's name only, so every phase reads the same order;
* :class:`SourceUnits` says where the rows of each phase lie in that order (the
  :class:`btlm_jax.data.positions.Layout` of one source);
* :class:`UnitRows`, a ``grain.MapDataset`` over the unit order and the packed store's rows (a
  Grain data source, :class:`btlm_jax.data.store.Rows`): element ``g`` is the ``g``-th row of
  the source's endless sequence of epochs at one phase's length.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from btlm_jax.data.chain import LocalCaches


class UnitOrder(LocalCaches, grain.MapDataset):
    """The epoch order of ``n`` units (endless): element ``k`` is the unit at unit position
    ``k``, ``perm_e(k mod n)`` of epoch ``e = k // n``, a fresh permutation every epoch.

    Above :attr:`DENSE_MAX` units the order is Grain's shuffle, ``grain.MapDataset.range(n)
    .shuffle(seed)`` (its parent: each entry computed on its own by ``index_shuffle``, O(1)
    memory; Grain seeds epoch ``e`` with ``seed + e``). Up to ``DENSE_MAX`` it is NumPy's
    ``default_rng((seed, e)).permutation(n)``, cached for two epochs: ``index_shuffle`` costs
    about 10 us an entry on large ranges but 40 us at 1,000 units and 4 ms at 10 (measured by
    ``benchmarks/data_pipeline.py``), too slow for the whole epochs document units need and for
    a corpus a step reads a large part of. Both are pure functions of ``(seed, k)``."""

    DENSE_MAX = 1 << 22
    _CACHES = ("_perms",)

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), int(seed)
        self._grain = (grain.MapDataset.range(self.n).shuffle(seed=self.seed)
                       if self.n > self.DENSE_MAX else None)
        super().__init__([] if self._grain is None else [self._grain])
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # Grain's prefetch threads and the loop may both read

    def __len__(self) -> int:
        return sys.maxsize  # endless: epoch after epoch

    def __str__(self) -> str:
        how = "grain index_shuffle" if self._grain is not None else "numpy"
        return f"UnitOrder(n={self.n}, seed={self.seed}, {how})"

    def permutation(self, epoch: int) -> np.ndarray:
        """The whole order of ``epoch``: the units at positions ``epoch * n .. (epoch + 1) *
        n - 1`` (cached for the two newest epochs)."""
        epoch = int(epoch)
        with self._lock:
            p = self._perms.get(epoch)
        if p is None:
            if self._grain is None:
                p = np.random.default_rng((self.seed, epoch)).permutation(self.n)
            else:
                p = self._entries(np.arange(epoch * self.n, (epoch + 1) * self.n))
            with self._lock:
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = p
        return p

    def _entries(self, k: np.ndarray) -> np.ndarray:
        """Grain's shuffle at unit positions ``k``, each distinct position computed once (the
        ``C / L`` rows of a unit share one: a BTLM step at 2048 asks for each unit 4 times)."""
        distinct, where = np.unique(k, return_inverse=True)
        got = np.asarray(self._grain._getitems(distinct.tolist()), np.int64) % self.n
        return got[where.reshape(-1)]

    def units(self, positions) -> np.ndarray:
        """The units at unit positions ``positions`` (int array)."""
        k = np.asarray(positions, np.int64).reshape(-1)
        if self._grain is not None:
            return self._entries(k)
        epochs = k // self.n
        if len(k) and epochs[0] == epochs[-1] and (len(k) < 3 or (epochs == epochs[0]).all()):
            return self.permutation(int(epochs[0]))[k - epochs[0] * self.n]
        out = np.empty(len(k), np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self.permutation(int(e))[k[m] % self.n]
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            return int(self.units([index])[0])

    def _getitems(self, indices: Sequence[int]):
        with self._stats.record_self_time(num_elements=len(indices)):
            return [int(u) for u in self.units(indices)]


class SourceUnits(LocalCaches):
    """One source's units in epoch order and where the rows of each phase lie in them.

    ``per_unit[phase]`` is an int (every unit holds that many rows of the phase's length: concat
    packing, or document packing with one row per unit) or an int64 array (document packing in
    units: the first row of each unit, then the row count)."""

    _CACHES = ("_cum",)

    def __init__(self, name: str, n: int, seed: int):
        self.name, self.n, self.seed = name, int(n), int(seed)
        self.order = UnitOrder(self.n, self.seed)
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

    def first_row(self, phase: int, start: int) -> int:
        """The number of rows of ``phase``'s length before unit position ``start``."""
        m = self.per_unit[phase]
        if isinstance(m, int):
            return int(start) * m
        per_epoch = int(m[-1])
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
        e, w = divmod(self.first_row(phase, start) + int(rows) - 1, per_epoch)
        p = int(np.searchsorted(self._cumulative(phase, e), w, "right")) - 1
        return e * self.n + p + 1

    def locate(self, phase: int, rows) -> np.ndarray:
        """The store rows (at the phase's length) of rows ``rows`` of the unit order (counted
        from unit position 0)."""
        g = np.asarray(rows, np.int64).reshape(-1)
        m = self.per_unit[phase]
        if isinstance(m, int):
            return self.order.units(g // m) * m + g % m
        per_epoch = int(m[-1])
        out = np.empty(len(g), np.int64)
        epochs = g // per_epoch
        for e in np.unique(epochs):
            sel = epochs == e
            w = g[sel] % per_epoch
            cum = self._cumulative(phase, int(e))
            p = np.searchsorted(cum, w, "right") - 1
            out[sel] = m[self.order.permutation(int(e))[p]] + (w - cum[p])
        return out


class UnitRows(grain.MapDataset):
    """A source's rows at one phase's length in its units' epoch order (endless).

    Parent: the unit order (:class:`UnitOrder`); it reads the packed store's rows, a Grain data
    source (:class:`btlm_jax.data.store.Rows`: ``__len__``, ``__getitem__`` and the batched
    ``_getitems``), itself rather than through ``grain.MapDataset.source``, whose per-read
    metrics (a runtime protocol check, a byte-size walk of the rows, Prometheus counters) cost
    0.1 to 0.5 ms a call, more than a whole small step. Element ``g`` is the ``g``-th row of the
    sequence of epochs: in unit ``order[g // m]`` (``m`` rows per unit; document units: by the
    units' row counts), its row ``g mod m`` in stream order."""

    def __init__(self, units: SourceUnits, phase: int, rows):
        super().__init__([units.order])
        self._units, self._phase, self.rows = units, int(phase), rows

    def __len__(self) -> int:
        return sys.maxsize  # endless: epoch after epoch

    def __str__(self) -> str:
        return f"UnitRows({self._units.name!r}, phase={self._phase}, {self.rows!r})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._getitems([index])[0]

    def _getitems(self, indices: Sequence[int]):
        with self._stats.record_self_time(num_elements=len(indices)):
            return self.rows._getitems(self._units.locate(self._phase, indices))
