"""Sweeps and experiments.

- :mod:`~btlm_jax.cli.overrides`: ``--config.KEY=VALUE`` overrides parsed by the same
  ``ml_collections`` config flag as ``python -m btlm_jax.main``;
- :mod:`~btlm_jax.experiments.grid`: grids (``{axis: {label: overrides}}``) and tasks, each a plain
  ``python -m btlm_jax.main`` command;
- :mod:`~btlm_jax.experiments.local`: running tasks in this process or N local processes,
  skipping finished ones, gathering ``results.jsonl``;
- :mod:`~btlm_jax.experiments.slurm`: SLURM job arrays through ``submitit`` (requeue on timeout
  and preemption);
- :mod:`~btlm_jax.experiments.runner`: the one runner of the reproductions
  (``configs/experiments/*.py`` + the analyses in ``experiments/``), with
  :mod:`~btlm_jax.experiments.data` (text -> train / held-out, tokenizer) and
  :mod:`~btlm_jax.experiments.recipes` (model and run settings the config files share);
- :mod:`~btlm_jax.experiments.coord_check`: the muP coordinate check.
"""
