"""Unit tests of the dedup building blocks against independent references."""

import random
import unicodedata

import numpy as np
import pytest

from btlm_jax.data.dedup import (
    MinHasher,
    band_keys,
    connected_components,
    nfc,
    normalize_for_matching,
    optimal_bands_rows,
)
from btlm_jax.data.dedup.minhash import POLY_BASE

M64 = (1 << 64) - 1


def _mix64_ref(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _poly_ref(s: str) -> int:
    h = 0
    for ch in s:
        h = (h * int(POLY_BASE) + ord(ch)) & M64
    return h


def _shingles_ref(text: str, n: int, unit: str) -> set[str]:
    if unit == "char":
        return {text[i:i + n] for i in range(len(text) - n + 1)} or {text}
    words = text.split(" ")
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)} or {text}


def _signature_ref(text, n, unit, a, b):
    xs = [_mix64_ref(_poly_ref(s)) >> 32 for s in _shingles_ref(text, n, unit)]
    return [min(((int(ak) * x + int(bk)) & M64) for x in xs) >> 32 for ak, bk in zip(a, b)]


def test_nfc_and_matching_form():
    decomposed = "Cafe\u0301 Ǆ"
    assert nfc(decomposed) == unicodedata.normalize("NFC", decomposed) == "Caf\u00e9 Ǆ"
    assert nfc("already nfc") == "already nfc"
    text = "  Hello,\u00a0  World!!\n\tIt's  a (test)--ok?  "
    assert normalize_for_matching(text) == "hello world its a testok"
    # Unicode punctuation is kept by the SlimPajama (ASCII) recipe, removed by "unicode".
    assert normalize_for_matching("«Bonjour» — dit-il") == "«bonjour» — ditil"
    assert normalize_for_matching("«Bonjour» — dit-il", "unicode") == "bonjour ditil"
    with pytest.raises(ValueError, match="punctuation"):
        normalize_for_matching("x", "latin")


@pytest.mark.parametrize("unit,n", [("char", 13), ("char", 5), ("word", 3)])
def test_signatures_equal_bruteforce(unit, n):
    rng = random.Random(3)
    texts = [
        " ".join("".join(rng.choice("abcdeé漢 ") for _ in range(rng.randint(1, 9))).split())
        for _ in range(12)
    ]
    texts += ["ab", "short text", "x" * 40]  # shorter than one shingle, repeated shingles
    hasher = MinHasher(num_perm=16, ngram=n, unit=unit, seed=7)
    sig = hasher.signatures(texts)
    for t, row in zip(texts, sig):
        assert row.tolist() == _signature_ref(t, n, unit, hasher.a, hasher.b), t


def test_signatures_estimate_jaccard():
    rng = random.Random(0)
    hasher = MinHasher()
    diffs, variances = [], []
    for _ in range(60):
        base = "".join(rng.choice("abcdefgh ") for _ in range(600))
        cut = rng.randint(100, 500)
        other = base[:cut] + "".join(rng.choice("abcdefgh ") for _ in range(600 - cut))
        sa, sb = _shingles_ref(base, 13, "char"), _shingles_ref(other, 13, "char")
        j = len(sa & sb) / len(sa | sb)
        sig = hasher.signatures([base, other])
        diffs.append(float(np.mean(sig[0] == sig[1])) - j)
        variances.append(j * (1 - j) / 128)
    diffs = np.array(diffs)
    z = diffs.sum() / np.sqrt(np.sum(variances))
    assert abs(z) < 4, z
    assert np.all(np.abs(diffs) <= 5 * np.sqrt(np.array(variances)) + 0.02)


def test_band_keys_equal_iff_band_equal():
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 4, size=(300, 12), dtype=np.uint32)  # small alphabet: many equal bands
    hi, lo = band_keys(sig, bands=4, rows=3)
    for j in range(4):
        rows = [tuple(r) for r in sig[:, 3 * j:3 * j + 3]]
        keys = list(zip(hi[j].tolist(), lo[j].tolist()))
        for p in range(0, 300, 7):
            for q in range(300):
                assert (keys[p] == keys[q]) == (rows[p] == rows[q])
    with pytest.raises(ValueError, match="exceeds"):
        band_keys(sig, bands=5, rows=3)


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_optimal_bands_rows_matches_datasketch(threshold):
    lsh = pytest.importorskip("datasketch.lsh")
    assert optimal_bands_rows(threshold, 128) == lsh._optimal_param(threshold, 128, 0.5, 0.5)


def test_slimpajama_parameters_from_threshold():
    # SlimPajama's 9 bands x 13 rows is the optimum for threshold 0.8 with 128 permutations.
    assert optimal_bands_rows(0.8, 128) == (9, 13)


def test_components_match_bfs():
    rng = np.random.default_rng(1)
    n = 400
    edges = rng.integers(0, n, size=(300, 2))
    roots = connected_components(n, edges[rng.permutation(len(edges))])
    adj = {i: set() for i in range(n)}
    for u, v in edges.tolist():
        adj[u].add(v)
        adj[v].add(u)
    seen = {}
    for s in range(n):
        if s in seen:
            continue
        comp, stack = {s}, [s]
        while stack:
            for w in adj[stack.pop()]:
                if w not in comp:
                    comp.add(w)
                    stack.append(w)
        for m in comp:
            seen[m] = min(comp)
    assert roots.tolist() == [seen[i] for i in range(n)]
