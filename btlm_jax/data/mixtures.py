"""Source mixtures: ``data.mixture`` -> per-source sampling weights (by tokens).

``data.mixture`` is one of

* empty: the data's natural proportions (each source weighted by its size in bytes, a good proxy
  for tokens);
* ``"src=w,src=w,..."``: explicit weights (normalised to sum to 1); sources of the data that are
  not named get weight 0 and are not sampled;
* a preset name from :data:`PRESETS` (below), written with RedPajama's source names.

Weights are by tokens: the pipeline packs each source into rows of ``seq_len`` tokens and mixes
rows, so a source with weight w supplies a fraction w of the training tokens.
"""

from __future__ import annotations

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

    ``natural`` gives each source's size (e.g. bytes) for the empty spec. Raises DataError naming
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
