"""muP hyperparameter transfer: a peak-LR sweep at several widths, muP vs standard
parametrisation (SP).

The model (``get_config``: the narrowest width under muP) and the grid (``get_sweep``) of
``python -m experiments.mup``. muP here is BTLM's: base width = the narrowest width, hidden-matrix
init and LR scaled by 1/width multiplier; SP: init std 0.02, one LR. Default (scale 1): widths 64,
128, 256 (2 layers, vocabulary 1024), 6 peak LRs from 1.25e-3 to 4e-2, 150 steps of 16 x 128
tokens, D2Z schedule. ``--scale S`` multiplies the widths and the steps.
"""

from btlm_jax.experiments import recipes
from btlm_jax.experiments.grid import axis

NAME = "mup"
ANALYSIS = "experiments.mup"
DEFAULT_LRS = (1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2)
PARAMETRIZATIONS = {
    "mup": {"model.mup.enabled": True, "optim.mup_lr_scaling": True},
    "sp": {"model.mup.enabled": False, "model.init_std": recipes.SP_INIT_STD,
           "optim.mup_lr_scaling": False},
}


def sizes(scale: float, smoke: bool = False) -> dict:
    s = max(scale, 0.25)
    base = 16 * max(1, round(4 * s))
    sz = {"widths": [base, 2 * base, 4 * base], "n_layers": 2, "vocab": 1024,
          "steps": int(150 * s), "batch": 16, "eval_batch": 8, "eval_batches": 8}
    if smoke:
        sz.update(widths=[32], n_layers=1, steps=4, batch=4, eval_batch=4, eval_batches=1)
    return sz


def get_config(arg: str = ""):
    a = recipes.parse_arg(arg)
    sz = sizes(a["scale"], bool(a["smoke"]))
    w0 = sz["widths"][0]
    return recipes.build({
        **recipes.model_overrides(w0, sz["n_layers"], sz["vocab"], mup=True, base_d_model=w0),
        **recipes.run_overrides(steps=sz["steps"], batch=sz["batch"], evals=1,
                                eval_batches=sz["eval_batches"], eval_batch=sz["eval_batch"]),
        "optim.peak_lr": DEFAULT_LRS[0]})


def add_options(p) -> None:
    p.add_argument("--lrs", default="", help="peak LRs, comma separated")


def get_sweep(args) -> dict:
    sz = sizes(args.scale, args.smoke)
    lrs = recipes.numbers(args.lrs, "--lrs", DEFAULT_LRS)
    if args.smoke:
        lrs = [1e-2]
    return {
        "config_arg": "smoke" if args.smoke else recipes.format_arg(scale=args.scale),
        "axes": {"param": PARAMETRIZATIONS,
                 "width": {w: recipes.width_overrides(w) for w in sz["widths"]},
                 "peak_lr": axis("optim.peak_lr", lrs)},
        "meta_keys": {"steps": "train.steps"},
        "info": {"widths": sz["widths"], "n_layers": sz["n_layers"], "vocab": sz["vocab"],
                 "steps": sz["steps"], "lrs": lrs,
                 "headline": f"widths {sz['widths']} x {len(lrs)} LRs x muP/SP"},
    }
