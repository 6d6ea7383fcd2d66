"""Union-find over candidate pairs (compiled with Numba).

Roots are always the smallest document index of their component (union by
minimum index), so the result does not depend on the order of the edges: the
document kept from each component is the first one in input order, whichever
engine produced the edges.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _find(parent, x):
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving
        x = parent[x]
    return x


@numba.njit(cache=True, nogil=True)
def _union_edges(parent, edges):
    for i in range(edges.shape[0]):
        ru = _find(parent, edges[i, 0])
        rv = _find(parent, edges[i, 1])
        if ru < rv:
            parent[rv] = ru
        elif rv < ru:
            parent[ru] = rv


@numba.njit(cache=True, nogil=True)
def _resolve(parent):
    # Invariant parent[i] <= i, so one ascending pass resolves every root.
    for i in range(parent.size):
        parent[i] = parent[parent[i]]


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def union_edges(self, edges: np.ndarray) -> None:
        edges = np.ascontiguousarray(edges, dtype=np.int64).reshape(-1, 2)
        if edges.size and (edges.min() < 0 or edges.max() >= self.parent.size):
            raise ValueError("edge endpoint out of range")
        _union_edges(self.parent, edges)

    def roots(self) -> np.ndarray:
        """Root (smallest member) of every element's component."""
        _resolve(self.parent)
        return self.parent


def connected_components(n: int, edges: np.ndarray) -> np.ndarray:
    uf = UnionFind(n)
    uf.union_edges(edges)
    return uf.roots()
