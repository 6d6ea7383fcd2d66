"""SlimPajama-style deduplication: NFC, short-document filter, MinHash-LSH, components.

Command line: ``python -m btlm_jax.data.dedup --input GLOB --output DIR --mode global|local``
(see ``--help``).  Python: ``run_dedup(DedupConfig(inputs=[...], output=...))``.
"""

from .components import UnionFind, connected_components
from .io import DedupInputError
from .minhash import MinHasher, band_keys, optimal_bands_rows, s_curve
from .normalize import nfc, normalize_for_matching
from .pipeline import DedupConfig, run_dedup

__all__ = [
    "DedupConfig",
    "DedupInputError",
    "MinHasher",
    "UnionFind",
    "band_keys",
    "connected_components",
    "nfc",
    "normalize_for_matching",
    "optimal_bands_rows",
    "run_dedup",
    "s_curve",
]
