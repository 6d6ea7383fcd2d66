"""The data pipeline: corpora, the packed token store, and the training input as a chain of
``grain.MapDataset``s (:mod:`btlm_jax.data.pipeline`).

``train_dataset(workdir)`` is a run's training input as Grain sees it: element ``i`` is the global
batch of step ``i`` (the update logged as ``"step": i + 1``), after the run's rollbacks and across
its phases, computed by the same chain the training loop reads::

    from btlm_jax.data import train_dataset

    ds = train_dataset("runs/tiny")          # a grain.MapDataset, len(ds) == train.steps
    batch = ds[41]                           # the inputs update 42 trained on
    ds.map(my_transform).to_iter_dataset()   # and on like any Grain dataset
"""

from __future__ import annotations


def train_data(workdir, *, process_index: int = 0, process_count: int = 1,
               rollbacks: int = -1):
    """The :class:`~btlm_jax.data.pipeline.StepData` of the run in ``workdir``: its
    ``config.json``, its pinned tokenizer and its rollback log (``RUN/rollbacks.json``, else the
    newest checkpoint's; ``rollbacks=K >= 0``: only the first ``K`` rollbacks). Nothing in the
    run directory is written; the packed store is built in ``data.cache_dir`` if missing."""
    from btlm_jax.data import pipeline
    from btlm_jax.train.run_dir import RunDir

    run = RunDir.open(workdir)
    log, where = run_rollbacks(run)
    if rollbacks >= 0:
        if rollbacks > len(log):
            raise ValueError(f"--rollbacks={rollbacks}: the run's log ({where}) has "
                             f"{len(log)} rollback(s)")
        log = log[:rollbacks]
    data = pipeline.StepData(run.cfg, run.tokenizer, process_index, process_count, rollbacks=log)
    data.rollback_source = where
    return data


def train_dataset(workdir, *, process_index: int = 0, process_count: int = 1,
                  rollbacks: int = -1):
    """The run in ``workdir``'s training input, a ``grain.MapDataset``: element ``i`` is process
    ``process_index``'s rows of the batch of step ``i`` (by default the whole global batch). See
    :func:`train_data` for the arguments."""
    return train_data(workdir, process_index=process_index, process_count=process_count,
                      rollbacks=rollbacks).dataset()


def run_rollbacks(run) -> tuple[list, str]:
    """A run's rollback log and where it came from (``RUN/rollbacks.json``, written at each
    rollback; else the newest checkpoint's data state; else none)."""
    from btlm_jax.data.positions import parse_rollbacks
    from btlm_jax.train.run_dir import ROLLBACKS, read_rollbacks

    logged = read_rollbacks(run.path)
    if logged is not None:
        return logged, str(run.path / ROLLBACKS)
    ckpt = run.checkpointer()
    try:
        steps = ckpt.all_steps()
        if not steps:
            return [], "no rollback log and no checkpoint: none"
        data = ckpt.restore_data(max(steps))
    finally:
        ckpt.close()
    return parse_rollbacks(data.get("rollbacks")), f"checkpoint {max(steps)}"
