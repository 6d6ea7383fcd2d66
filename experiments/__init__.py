"""Small-scale reproductions of the papers' central claims, one command each.

``python -m experiments.d2z``, ``python -m experiments.alibi_pi``, ``python -m experiments.mup``,
``python -m experiments.dedup`` (run from the repository root). Each runs its grid through
:mod:`launch.sweep` (locally with ``--workers N``, or ``--slurm`` for an array job), writes
``OUT/results.jsonl`` and ``OUT/figures/*.png``, and prints whether the claim held;
``notebooks/repro_*.ipynb`` read the results and state the verdict with the numbers.
"""
