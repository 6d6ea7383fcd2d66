"""Global vs local deduplication (SlimPajama-DC): the same model trained on a raw multi-source
corpus and on its locally and globally deduplicated versions.

The model (``get_config``) and the grid (``get_sweep``) of ``python -m experiments.dedup``; the
corpora are built and deduplicated by ``experiments.dedup:prepare`` (the ``corpus`` axis sets
``data.train`` to each). Default (scale 1): width 64 x 2 layers, vocabulary 1024, 600 steps of
16 x 128 tokens on raw, locally and globally deduplicated data, seeds 0 and 1.
"""

from btlm_jax.experiments import recipes

NAME = "dedup"
ANALYSIS = "experiments.dedup"
CORPORA = ("raw", "local", "global")


def sizes(scale: float, smoke: bool = False) -> dict:
    s = max(scale, 0.25)
    sz = {"d_model": 16 * max(1, round(4 * s)), "n_layers": max(2, round(2 * s)), "vocab": 1024,
          "steps": int(600 * s), "batch": 16, "seeds": 2, "max_docs": 0, "corpora": CORPORA,
          "eval_batch": 8, "eval_batches": 16, "evals": 4}
    if smoke:
        sz.update(d_model=32, n_layers=1, steps=4, batch=4, seeds=1, max_docs=80,
                  corpora=("local", "global"), eval_batch=4, eval_batches=1, evals=1)
    return sz


def get_config(arg: str = ""):
    a = recipes.parse_arg(arg)
    sz = sizes(a["scale"], bool(a["smoke"]))
    return recipes.build({
        **recipes.model_overrides(sz["d_model"], sz["n_layers"], sz["vocab"], mup=True,
                                  base_d_model=sz["d_model"]),
        **recipes.run_overrides(steps=sz["steps"], batch=sz["batch"], evals=sz["evals"],
                                eval_batches=sz["eval_batches"], eval_batch=sz["eval_batch"]),
        "optim.peak_lr": 1e-2})


def get_sweep(args) -> dict:
    sz = sizes(args.scale, args.smoke)
    seeds = [args.seed + i for i in range(sz["seeds"])]
    return {
        "config_arg": "smoke" if args.smoke else recipes.format_arg(scale=args.scale),
        "prepare": "experiments.dedup:prepare",
        "prepare_args": {"corpora": list(sz["corpora"]), "max_docs": sz["max_docs"]},
        "axes": {"seed": {s: {"seed": s} for s in seeds}},
        "meta_keys": {"steps": "train.steps"},
        "info": {"d_model": sz["d_model"], "n_layers": sz["n_layers"], "steps": sz["steps"],
                 "seeds": seeds, "corpora": list(sz["corpora"]),
                 "headline": f"corpora {list(sz['corpora'])} x seeds {seeds}"},
    }
