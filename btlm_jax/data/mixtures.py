"""Source mixtures: ``data.mixture`` -> per-source sampling weights (by tokens).

``data.mixture`` is one of

* empty: the data's natural proportions (each source weighted by its tokens: the exact counts of
  the packed store, :func:`btlm_jax.data.pipeline.mixture_weights`);
* ``"src=w,src=w,..."``: explicit weights (normalised to sum to 1); sources of the data that are
  not named get weight 0 and are not sampled;
* a preset name from :data:`PRESETS` (below), written with RedPajama's source names.

Weights are by tokens: the pipeline packs each source into rows of ``seq_len`` tokens and mixes
rows, so a source with weight w supplies a fraction w of the training tokens.
"""

from __future__ import annotations

import math
from typing import Mapping

from btlm_jax.data.slimpajama import DataError

CC, C4, GITHUB, BOOK, ARXIV, WIKI, SE = (
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook", "RedPajamaArXiv",
    "RedPajamaWikipedia", "RedPajamaStackExchange")

# SlimPajama-627B token proportions, in percent. Source: the data-source proportion table of the
# SlimPajama-627B dataset card (https://huggingface.co/datasets/cerebras/SlimPajama-627B) and
# Cerebras' SlimPajama blog post; the same numbers are in DESIGN.md ("Data facts").
SLIMPAJAMA = {CC: 52.2, C4: 26.7, GITHUB: 5.2, BOOK: 4.2, ARXIV: 4.6, WIKI: 3.8, SE: 3.3}

# The SlimPajama-DC configurations (Shen et al., "SlimPajama-DC: Understanding Data Combinations
# for LLM Training", arXiv:2309.10818, the table of six data combinations) belong here as
# "dc1" ... "dc6". Their per-source percentages could not be verified from a readable copy of the
# table while writing this module, so they are deliberately not transcribed from memory; add them
# as dict entries with the table as the cited source. Until then use "src=w,..." explicitly.
PRESETS: dict[str, dict[str, float]] = {
    "slimpajama": SLIMPAJAMA,
}


def parse_mixture(spec: str) -> dict[str, float]:
    """``"a=0.5,b=0.3"`` -> ``{"a": 0.5, "b": 0.3}`` (not normalised); a preset name -> its table."""
    spec = (spec or "").strip()
    if spec in PRESETS:
        return dict(PRESETS[spec])
    if spec.lower().replace("-", "").replace("_", "") in {f"dc{i}" for i in range(1, 7)}:
        raise DataError(
            f"data.mixture={spec!r}: the SlimPajama-DC presets are not in this codebase yet (their "
            "table could not be verified; see btlm_jax/data/mixtures.py). Give the proportions "
            "explicitly, e.g. data.mixture='RedPajamaCommonCrawl=0.9,RedPajamaGithub=0.1'")
    out: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise DataError(
                f"data.mixture={spec!r}: {item!r} is neither 'source=weight' nor a preset "
                f"({', '.join(sorted(PRESETS))})")
        name, w = item.rsplit("=", 1)
        try:
            weight = float(w)
        except ValueError:
            raise DataError(f"data.mixture={spec!r}: weight {w!r} of {name!r} is not a number") from None
        if weight < 0 or weight != weight:
            raise DataError(f"data.mixture={spec!r}: weight of {name!r} must be >= 0")
        if name.strip() in out:
            raise DataError(f"data.mixture={spec!r}: source {name.strip()!r} appears twice")
        out[name.strip()] = weight
    return out


def resolve_mixture(spec: str, source_names: list[str],
                    natural: Mapping[str, float]) -> dict[str, float]:
    """Normalised weights for every source of the data (0 for sources not sampled).

    ``natural`` gives each source's size in tokens for the empty spec. Raises DataError naming
    any source with positive weight that the data does not contain."""
    if not (spec or "").strip():
        weights = {s: float(natural.get(s, 0.0)) for s in source_names}
    else:
        parsed = parse_mixture(spec)
        missing = sorted(s for s, w in parsed.items() if w > 0 and s not in source_names)
        if missing:
            raise DataError(
                f"data.mixture={spec!r}: source(s) {', '.join(missing)} not found in the data; "
                f"the data has: {', '.join(source_names)}")
        weights = {s: float(parsed.get(s, 0.0)) for s in source_names}
    total = sum(weights.values())
    if total <= 0:
        raise DataError(f"data.mixture={spec!r}: all weights are zero")
    return {s: w / total for s, w in weights.items()}


# ----------------------------------------------------------------------------------------------
# Step-keyed interleaving: which source each row of the global row sequence comes from.


class Interleave:
    """A deterministic, random-access interleave of sources in proportion to their weights.

    The global row sequence (row ``h = step * batch + j``) is the merge of one arrival sequence
    per source: arrival ``k`` of source ``s`` sits at time ``(k + 1/2) / w_s`` (ties go to the
    lower source index). This is the Sainte-Lague divisor method applied row by row, so

    * the number of rows of source ``s`` among the first ``h`` rows, :meth:`counts_before`, never
      decreases as ``h`` grows and stays within two rows of ``w_s * h`` at every ``h`` (exact
      per-step proportions, not only on average);
    * any stretch of rows is computed directly, in O(S^2 log) integer operations per source,
      without replaying earlier rows: resume and random access cost the same at step 10 and
      step 10^6.

    Weights are rounded to integers over 2^30 so the arithmetic is exact (Python integers): every
    process computes the same rows. Sources with weight 0 never appear.
    """

    SCALE = 1 << 30

    def __init__(self, weights):
        w = [float(x) for x in weights]
        if not w or min(w) < 0 or sum(w) <= 0:
            raise DataError(f"mixture weights {w}: need at least one positive weight, none < 0")
        total = sum(w)
        self.W = [int(round(x / total * self.SCALE)) for x in w]
        self.active = [s for s, x in enumerate(self.W) if x > 0]

    def _rank(self, s: int, k: int) -> int:
        """Position in the global sequence of arrival ``k`` of source ``s``."""
        M = self.W[s]
        r = k
        for t in self.active:
            if t == s:
                continue
            N = (2 * k + 1) * self.W[t]
            # arrivals k' of t before (s, k): (2k'+1)/W_t < (2k+1)/W_s (<= when t < s: ties)
            c = (N - M) // (2 * M) + 1 if t < s else (N - M - 1) // (2 * M) + 1
            r += max(0, c)
        return r

    def count_before(self, s: int, h: int) -> int:
        """How many of the first ``h`` rows come from source ``s``."""
        if self.W[s] == 0 or h <= 0:
            return 0
        guess = h * self.W[s] // self.SCALE
        lo, hi = max(0, guess - len(self.W) - 2), guess + len(self.W) + 2
        if self._rank(s, lo) >= h:
            lo = 0
        if self._rank(s, hi) < h:
            hi = h
        # smallest k with rank(s, k) >= h, in (lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self._rank(s, mid) >= h:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def counts_before(self, h: int) -> list[int]:
        return [self.count_before(s, h) for s in range(len(self.W))]

    def rows(self, h0: int, h1: int) -> list[tuple[int, int]]:
        """``(source, k)`` for the global rows ``h0 .. h1 - 1`` in order: row ``h`` is arrival
        ``k`` of ``source`` (its ``k``-th row overall)."""
        return self.between(self.counts_before(h0), self.counts_before(h1))

    def between(self, a, b) -> list[tuple[int, int]]:
        """``(source, k)`` of the rows between the per-source counts ``a`` and ``b`` (of
        :meth:`counts_before`), in order: merged by ``(2k + 1) / W_s`` exactly (as integers over
        the weights' least common multiple), ties to the lower source."""
        c = self._scale
        items = sorted(((2 * k + 1) * c[s], s, k) for s in self.active for k in range(a[s], b[s]))
        return [(s, k) for _, s, k in items]

    @property
    def _scale(self) -> list[int]:
        c = self.__dict__.get("_c")
        if c is None:
            lcm = math.lcm(*(self.W[s] for s in self.active))
            c = self._c = [lcm // w if w else 0 for w in self.W]
        return c
