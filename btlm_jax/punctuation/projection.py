"""Hashed ternary token projection (the pQRNN/PRADO-style input layer: no embedding table).

Each token is hashed with BLAKE2b (stable across processes and machines, unlike Python's
``hash``); every pair of hash bits (b0, b1) gives one feature ``b0 * (1 - 2 * b1)``, so a feature
is 0 with probability 1/2 and +1 or -1 with probability 1/4 each.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np


@functools.lru_cache(maxsize=200_000)
def _project_cached(token: str, dim: int) -> bytes:
    n_bytes = dim // 4  # 2 bits per feature
    digest = b""
    block = 0
    while len(digest) < n_bytes:
        h = hashlib.blake2b(token.encode("utf-8"), digest_size=64, salt=block.to_bytes(16, "little"))
        digest += h.digest()
        block += 1
    bits = np.unpackbits(np.frombuffer(digest[:n_bytes], np.uint8), bitorder="little")
    b0, b1 = bits[0::2].astype(np.int8), bits[1::2].astype(np.int8)
    return (b0 * (1 - 2 * b1)).astype(np.int8).tobytes()


def project_token(token: str, dim: int) -> np.ndarray:
    """Ternary feature vector (int8 in {-1, 0, +1}) of length ``dim`` (a multiple of 4)."""
    if dim <= 0 or dim % 4:
        raise ValueError(f"projection dim must be a positive multiple of 4, got {dim}")
    return np.frombuffer(_project_cached(token, dim), np.int8)


def project_tokens(tokens, dim: int, length: int | None = None) -> np.ndarray:
    """(length, dim) int8 projections of a token sequence, zero rows past its end."""
    length = len(tokens) if length is None else length
    out = np.zeros((length, dim), np.int8)
    for i, tok in enumerate(tokens[:length]):
        out[i] = project_token(tok, dim)
    return out
