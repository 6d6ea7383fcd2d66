"""muP hyperparameter transfer: a peak-LR sweep at several widths, muP vs standard
parametrisation (SP).

The model (``get_config``: the narrowest width under muP) and the grid (``get_sweep``) of
``python -m experiments.mup``. muP here is BTLM's: base width = the narrowest width, hidden-matrix
init and LR scaled by 1/width multiplier; SP: init std 0.02, one LR. Default (scale 1): widths 32,
64, 128, 256 (an 8x range) with 4 attention heads at every width (so the ALiBi slopes are the
same model to model), 2 layers, vocabulary 1024, 5 peak LRs a factor 2 apart from 1.25e-3 to
2e-2 (extended past an edge optimum, up to 2 times), seeds 0 and 1, 600 steps of 8 x 64 tokens
with 60 warmup steps (10%), D2Z schedule, evaluated on 32 x 8 x 64 held-out tokens. ``--scale S``
multiplies the widths and the steps (``--scale 2``: widths 64 to 512, 1200 steps). The widths
start at 32 so that the default set of experiments runs in about an hour on a 2-core CPU; width
512 alone would take three times as long as 32 to 256 together.
"""

from btlm_jax.experiments import recipes
from btlm_jax.experiments.data import ExperimentError
from btlm_jax.experiments.grid import axis

NAME = "mup"
ANALYSIS = "experiments.mup"
DEFAULT_LRS = (1.25e-3, 2.5e-3, 5e-3, 1e-2, 2e-2)
DEFAULT_SEEDS = (0, 1)
N_HEADS = 4  # fixed across widths: head_dim = width / 4
EXTEND_ROUNDS = 2
PARAMETRIZATIONS = {
    "mup": {"model.mup.enabled": True, "optim.mup_lr_scaling": True},
    "sp": {"model.mup.enabled": False, "model.init_std": recipes.SP_INIT_STD,
           "optim.mup_lr_scaling": False},
}


def sizes(scale: float, smoke: bool = False) -> dict:
    s = max(scale, 0.25)
    base = 16 * max(1, round(2 * s))
    sz = {"widths": [base, 2 * base, 4 * base, 8 * base], "n_layers": 2, "vocab": 1024,
          "steps": int(600 * s), "batch": 8, "seq_len": 64, "eval_batch": 8, "eval_batches": 32}
    if smoke:
        sz.update(widths=[16, 32], n_layers=1, steps=5, batch=4, eval_batch=4, eval_batches=1)
    return sz


def get_config(arg: str = ""):
    a = recipes.parse_arg(arg)
    sz = sizes(a["scale"], bool(a["smoke"]))
    w0 = sz["widths"][0]
    return recipes.build({
        **recipes.model_overrides(w0, sz["n_layers"], sz["vocab"], mup=True, base_d_model=w0),
        **width_overrides(w0),
        **recipes.run_overrides(steps=sz["steps"], batch=sz["batch"], seq_len=sz["seq_len"],
                                evals=1,
                                eval_batches=sz["eval_batches"], eval_batch=sz["eval_batch"]),
        "optim.peak_lr": DEFAULT_LRS[0]})


def width_overrides(width: int) -> dict:
    """The width keys with the head count fixed at :data:`N_HEADS` (head_dim = width / 4)."""
    return recipes.width_overrides(width, head_dim=max(1, width // N_HEADS))


def add_options(p) -> None:
    p.add_argument("--lrs", default="", help="peak LRs, comma separated")
    p.add_argument("--seeds", default="", help="seeds, comma separated (default: 0,1)")
    p.add_argument("--steps", type=int, default=0, help="training steps (default 600 x scale; "
                   "warmup is 10%%)")
    p.add_argument("--extend-rounds", type=int, default=EXTEND_ROUNDS,
                   help="times an LR grid may be extended past an edge optimum (0: never)")


def get_sweep(args) -> dict:
    sz = sizes(args.scale, args.smoke)
    lrs = recipes.numbers(args.lrs, "--lrs", DEFAULT_LRS)
    if args.smoke:
        lrs = [1e-2]
    try:
        seeds = ([int(x) for x in args.seeds.split(",") if x.strip()]
                 or ([0] if args.smoke else list(DEFAULT_SEEDS)))
    except ValueError:
        raise ExperimentError(f"--seeds={args.seeds!r}: expected integers, e.g. 0,1") from None
    if args.steps < 0 or args.extend_rounds < 0:
        raise ExperimentError("--steps and --extend-rounds must be >= 0")
    steps = int(args.steps or sz["steps"])
    return {
        "config_arg": "smoke" if args.smoke else recipes.format_arg(scale=args.scale),
        "axes": {"param": PARAMETRIZATIONS,
                 "width": {w: width_overrides(w) for w in sz["widths"]},
                 "peak_lr": axis("optim.peak_lr", lrs),
                 "seed": axis("seed", seeds)},
        "fixed": recipes.length_overrides(steps, evals=1),
        "meta_keys": {"steps": "train.steps", "warmup": "optim.warmup_steps",
                      "n_heads": "model.n_heads"},
        "extend": {"axis": "peak_lr", "key": "optim.peak_lr", "over": ["seed"], "factor": 2.0,
                   "rounds": 0 if args.smoke else args.extend_rounds},
        "info": {"widths": sz["widths"], "n_layers": sz["n_layers"], "vocab": sz["vocab"],
                 "n_heads": N_HEADS, "steps": steps, "warmup_steps": max(1, steps // 10),
                 "lrs": lrs, "seeds": seeds,
                 "headline": f"widths {sz['widths']} x {len(lrs)} LRs x {len(seeds)} seeds x "
                             f"muP/SP, {steps} steps"},
    }
