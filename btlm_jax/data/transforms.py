"""``data.transforms``: user ``grain.MapDataset`` transformations appended to the training rows.

``data.transforms`` is a tuple of ``"module:function"`` strings (``module.function`` works too),
imported when the pipeline is built. Each function takes the run's row dataset and returns a
``grain.MapDataset`` of the same length::

    def fn(rows: grain.MapDataset) -> grain.MapDataset

An element of ``rows`` is one training row, a dict of ``[seq_len]`` numpy arrays (``inputs``,
``targets``, ``loss_mask``, ``segment_ids``, ``positions``, ``source_ids``); element ``r`` is row
``r`` of the run's row sequence (the rows of step ``i`` follow those of the steps before it), so
``map_with_index`` and ``random_map`` see the same index, and draw the same numbers, in every
process and for every process count. The transforms run before the rows are batched and split
between processes: each process transforms only its own rows. Keep a row a row: ``.map``,
``.map_with_index``, ``.random_map`` (a ``.filter`` would leave holes in the step-keyed batches
and is refused: mask instead, ``loss_mask = 0``). The arrays of a row may be shared and
read-only: return new arrays (``{**row, "loss_mask": ...}``), never write into them. A transform
may add fields; the train step reads ``inputs``, ``targets``, ``loss_mask``, ``segment_ids``,
``positions`` and the token counters ``source_ids``. Evaluation batches are not transformed.

Example, a per-row token filter (no loss on predicting digits)::

    # mytransforms.py, importable (on PYTHONPATH) in every process
    import numpy as np

    DIGITS = np.asarray([...])  # the tokenizer's ids of "0".."9"

    def no_loss_on_digits(rows):
        def f(row):
            keep = ~np.isin(row["targets"], DIGITS)
            return {**row, "loss_mask": row["loss_mask"] * keep}
        return rows.map(f)

    btlm-train --config=tiny --workdir=RUN \
        --config.data.transforms='("mytransforms:no_loss_on_digits",)'

The transforms are part of the batches' definition: give a resumed run the same list (and code).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import grain

from btlm_jax.data.slimpajama import DataError


def parse(spec) -> list[str]:
    """``data.transforms`` as a list of names (a tuple/list of strings, or one comma-separated
    string)."""
    if not spec:
        return []
    if isinstance(spec, str):
        spec = [s for s in spec.split(",")]
    out = [str(s).strip() for s in spec]
    for i, name in enumerate(out):
        if not name:
            raise DataError(f"data.transforms[{i}] is empty: give 'module:function'")
    return out


def resolve(name: str, i: int = 0) -> Callable:
    """The function ``"module:function"`` (or ``"module.function"``) names."""
    key = f"data.transforms[{i}]={name!r}"
    module, sep, attr = name.partition(":")
    if not sep:
        module, _, attr = name.rpartition(".")
    if not module or not attr:
        raise DataError(f"{key}: give 'module:function', e.g. 'mytransforms:no_loss_on_digits'")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"{key}: cannot import {module!r} ({e}); put it on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{key}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"{key}: {attr!r} is not a function")
    return obj


def apply(rows: grain.MapDataset, names: Sequence[str]) -> grain.MapDataset:
    """``rows`` with the transforms ``names`` appended, in order; each must return a
    ``grain.MapDataset`` of the same length without a filter."""
    from grain._src.python.dataset.transformations.filter import FilterMapDataset

    for i, name in enumerate(names):
        out = resolve(name, i)(rows)
        key = f"data.transforms[{i}]={name!r}"
        if not isinstance(out, grain.MapDataset):
            raise DataError(f"{key} returned {type(out).__name__}, not a grain.MapDataset")
        if len(out) != len(rows):
            raise DataError(f"{key} changed the number of rows ({len(rows)} -> {len(out)}); a "
                            "transform keeps every row (map, map_with_index, random_map)")
        todo = [out]
        while todo:
            ds = todo.pop()
            if ds is rows:
                continue
            if isinstance(ds, FilterMapDataset):
                raise DataError(f"{key} filters rows, which would leave holes in the step-keyed "
                                "batches; mask them instead (loss_mask = 0)")
            todo.extend(getattr(ds, "parents", ()))
        rows = out
    return rows
