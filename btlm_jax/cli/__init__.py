"""The command-line entry points, one module each (also installed as console scripts):

=================  ===============================  =========================================
command            python -m                        what
=================  ===============================  =========================================
btlm-train         btlm_jax.main                    train or resume a run (cli/train.py)
btlm-evaluate      btlm_jax.evaluate                loss / perplexity per length, PI, plots
btlm-generate      btlm_jax.generate                sample from a run (KV cache)
btlm-describe      btlm_jax.describe                parameters, FLOPs, AOT memory per device
btlm-convert       btlm_jax.convert                 Hugging Face import / export
btlm-batches       btlm_jax.cli.batches             the batches of given steps (.npz or text)
btlm-harness       btlm_jax.harness                 lm-evaluation-harness tasks
btlm-dedup         btlm_jax.data.dedup              SlimPajama-style MinHash-LSH dedup
btlm-sweep         launch.sweep                     grids of runs (local or SLURM)
=================  ===============================  =========================================

Each reads ml-collections configs with ``--config=PRESET`` (from any directory:
:mod:`btlm_jax.presets`) or ``--config=FILE.py[:ARG]``, and ``--config.KEY=VALUE`` overrides (the
same parser as sweeps: :mod:`btlm_jax.cli.overrides`); ``--help`` lists the command's own flags
(:mod:`btlm_jax.cli.common`); user errors, flag mistakes included, are one ``error: ...`` line and
exit status 2 (``--verbose`` for the traceback; :mod:`btlm_jax.errors`). ``btlm-train`` exits 75
when preempted after saving a checkpoint (:data:`btlm_jax.errors.EXIT_PREEMPTED`).
"""
