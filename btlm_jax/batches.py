"""The batches a run trains on, for the batch inspector (``btlm-batches``,
:mod:`btlm_jax.cli.batches`) and notebooks: ``batches(RUN, "A:B")`` reads the run's own chain
(:func:`btlm_jax.data.train_data`, the one the training feed reads), so the rows are exactly the
rows those steps trained on, across phases and after rollbacks."""

from __future__ import annotations


def parse_steps(spec: str, total: int) -> range:
    """``"A:B"`` (or ``"A"``) -> ``range(A, B)``, checked against the run's ``total`` steps."""
    try:
        parts = [int(x) for x in spec.split(":")]
        if len(parts) == 1:
            parts.append(parts[0] + 1)
        a, b = parts
    except ValueError:
        raise ValueError(f"--steps={spec!r}: give A:B (the steps A .. B-1), e.g. --steps=10:12"
                         ) from None
    if not 1 <= a < b <= total + 1:
        raise ValueError(f"--steps={spec!r}: the run has steps 1 .. {total} (step s is the s-th "
                         f"update, as in metrics.jsonl); give 1 <= A < B <= {total + 1}")
    return range(a, b)


def batches(workdir: str, steps, rollbacks: int = -1):
    """``(data, {step: global batch})`` for the steps (metrics numbering, ``"A:B"`` or an
    iterable) of the run in ``workdir``: the run's chain (:func:`btlm_jax.data.train_data`, the
    one the training feed reads) and its elements ``dataset[s - 1]``."""
    from btlm_jax.data import train_data

    data = train_data(workdir, rollbacks=rollbacks)
    steps = parse_steps(steps, data.total_steps) if isinstance(steps, str) else steps
    ds = data.dataset()
    return data, {s: ds[s - 1] for s in steps}  # step s reads batch index s - 1
