"""MinHash signatures and LSH band keys, compiled with Numba.

Shingles are character n-grams (default 13) or word n-grams of the matching
form of a document.  Each shingle gets a 64-bit polynomial hash of its code
points, passed through the SplitMix64 finaliser; the top 32 bits ``x`` are the
shingle's hash.  Permutation ``k`` is the multiply-add-shift family
``h_k(x) = (a_k * x + b_k mod 2**64) >> 32`` (a_k odd, a_k and b_k random 64-bit
numbers from ``seed``), which is 2-universal for 32-bit keys.  The signature
entry is ``min over shingles of h_k(x)`` as ``uint32``.

The hot loop (hashing every shingle and updating the 128 minima) runs in one
compiled kernel over a batch of documents: no Python work per shingle.
"""

from __future__ import annotations

import math

import numba
import numpy as np

_U64 = np.uint64
POLY_BASE = np.uint64(0x100000001B3)  # odd 64-bit base for the polynomial shingle hash
_KEY_SEEDS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD1B54A32D192ED03))


@numba.njit(inline="always")
def _mix64(z):
    # SplitMix64 finaliser (a bijection of uint64 with good avalanche).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(inline="always")
def _update_minima(x, a, b, mins):
    for k in range(a.size):
        v = a[k] * x + b[k]
        if v < mins[k]:
            mins[k] = v


@numba.njit(cache=True, nogil=True)
def _signatures_char(cps, offsets, n, base, a, b, out):
    """Char n-gram MinHash for documents cps[offsets[d]:offsets[d+1]]."""
    ndocs = offsets.size - 1
    nperm = a.size
    mins = np.empty(nperm, dtype=np.uint64)
    top = np.uint64(0xFFFFFFFFFFFFFFFF)
    shift = np.uint64(32)
    base_n = np.uint64(1)
    for _ in range(n):
        base_n = base_n * base
    for d in range(ndocs):
        s = offsets[d]
        e = offsets[d + 1]
        for k in range(nperm):
            mins[k] = top
        length = e - s
        if length < n:
            # Shorter than one shingle: the whole text is the only shingle.
            h = np.uint64(0)
            for i in range(s, e):
                h = h * base + np.uint64(cps[i])
            _update_minima(_mix64(h) >> shift, a, b, mins)
        else:
            h = np.uint64(0)
            for i in range(s, e):
                h = h * base + np.uint64(cps[i])
                if i - s >= n:
                    h = h - base_n * np.uint64(cps[i - n])
                if i - s >= n - 1:
                    _update_minima(_mix64(h) >> shift, a, b, mins)
        for k in range(nperm):
            out[d, k] = np.uint32(mins[k] >> shift)


@numba.njit(cache=True, nogil=True)
def _signatures_word(cps, offsets, n, base, a, b, out):
    """Word n-gram MinHash; words are separated by single spaces (code point 32).

    The hash of a word n-gram is the polynomial hash of its characters including
    the inner spaces, computed from prefix hashes.
    """
    ndocs = offsets.size - 1
    nperm = a.size
    mins = np.empty(nperm, dtype=np.uint64)
    top = np.uint64(0xFFFFFFFFFFFFFFFF)
    shift = np.uint64(32)
    for d in range(ndocs):
        s = offsets[d]
        e = offsets[d + 1]
        length = e - s
        for k in range(nperm):
            mins[k] = top
        pre = np.empty(length + 1, dtype=np.uint64)
        powb = np.empty(length + 1, dtype=np.uint64)
        pre[0] = np.uint64(0)
        powb[0] = np.uint64(1)
        starts = np.empty(length + 1, dtype=np.int64)
        ends = np.empty(length + 1, dtype=np.int64)
        nw = 0
        in_word = False
        for i in range(length):
            c = cps[s + i]
            pre[i + 1] = pre[i] * base + np.uint64(c)
            powb[i + 1] = powb[i] * base
            if c == 32:
                if in_word:
                    ends[nw] = i
                    nw += 1
                    in_word = False
            elif not in_word:
                starts[nw] = i
                in_word = True
        if in_word:
            ends[nw] = length
            nw += 1
        if nw < n:
            _update_minima(_mix64(pre[length]) >> shift, a, b, mins)
        else:
            for w in range(nw - n + 1):
                lo = starts[w]
                hi = ends[w + n - 1]
                h = pre[hi] - pre[lo] * powb[hi - lo]
                _update_minima(_mix64(h) >> shift, a, b, mins)
        for k in range(nperm):
            out[d, k] = np.uint32(mins[k] >> shift)


@numba.njit(cache=True, nogil=True)
def _band_keys(sig, bands, rows, seed_hi, seed_lo, out_hi, out_lo):
    """128-bit key (two independent 64-bit hashes) of each band of each signature."""
    ndocs = sig.shape[0]
    for d in range(ndocs):
        for j in range(bands):
            h1 = seed_hi ^ np.uint64(j)
            h2 = seed_lo ^ np.uint64(j)
            for r in range(rows):
                v = np.uint64(sig[d, j * rows + r])
                h1 = _mix64(h1 ^ v)
                h2 = _mix64(h2 + v * np.uint64(0xFF51AFD7ED558CCD))
            out_hi[j, d] = h1
            out_lo[j, d] = h2


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) parameters of ``num_perm`` hash permutations, a function of ``seed`` only."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | _U64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def codepoints(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated code points (uint32) of ``texts`` and their offsets."""
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cps = np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32)
    return cps, offsets


class MinHasher:
    """Computes MinHash signatures for batches of (matching-form) texts."""

    def __init__(self, num_perm: int = 128, ngram: int = 13, unit: str = "char", seed: int = 1):
        if num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {num_perm}")
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        if unit not in ("char", "word"):
            raise ValueError(f"ngram unit must be 'char' or 'word', got {unit!r}")
        self.num_perm, self.ngram, self.unit, self.seed = num_perm, ngram, unit, seed
        self.a, self.b = permutations(num_perm, seed)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """uint32 array (len(texts), num_perm)."""
        cps, offsets = codepoints(texts)
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        kernel = _signatures_char if self.unit == "char" else _signatures_word
        kernel(cps, offsets, self.ngram, POLY_BASE, self.a, self.b, out)
        return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) uint64 arrays of shape (bands, ndocs): a 128-bit key per band."""
    if bands * rows > sig.shape[1]:
        raise ValueError(
            f"bands x rows = {bands} x {rows} = {bands * rows} exceeds the {sig.shape[1]} permutations"
        )
    hi = np.empty((bands, sig.shape[0]), dtype=np.uint64)
    lo = np.empty((bands, sig.shape[0]), dtype=np.uint64)
    _band_keys(np.ascontiguousarray(sig), bands, rows, _KEY_SEEDS[0], _KEY_SEEDS[1], hi, lo)
    return hi, lo


def s_curve(s, bands: int, rows: int):
    """Probability that two documents of Jaccard similarity ``s`` share at least one band."""
    s = np.asarray(s, dtype=np.float64)
    return 1.0 - (1.0 - s**rows) ** bands


def optimal_bands_rows(
    threshold: float,
    num_perm: int = 128,
    false_positive_weight: float = 0.5,
    false_negative_weight: float = 0.5,
    grid: int = 2001,
) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted areas of
    false positives (the S-curve below ``threshold``) and false negatives
    (one minus the S-curve above it)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    lo_s = np.linspace(0.0, threshold, grid)
    hi_s = np.linspace(threshold, 1.0, grid)
    best, best_err = (1, 1), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(s_curve(lo_s, b, r), lo_s)
            fn = np.trapezoid(1.0 - s_curve(hi_s, b, r), hi_s)
            err = false_positive_weight * fp + false_negative_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best
