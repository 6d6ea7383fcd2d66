"""Small-scale reproductions of the papers' central claims, one command each.

``python -m experiments.d2z``, ``python -m experiments.alibi_pi``, ``python -m experiments.mup``,
``python -m experiments.dedup`` (run from the repository root). Each is a config file
``configs/experiments/NAME.py`` (its model and grid) run by the one shared runner
:mod:`btlm_jax.experiments.runner` (locally with ``--workers N``, or ``--slurm`` for a submitit job
array), which writes ``OUT/results.jsonl``, ``OUT/summary.json`` and ``OUT/figures/*.png`` and
prints whether the claim held. The modules here hold each experiment's analysis (``summarize``,
``plot``, ``report``), which ``notebooks/repro_*.ipynb`` import, and its hooks.
"""
