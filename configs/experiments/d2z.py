"""Straight to Zero: linear decay-to-zero vs other LR schedules, over a peak-LR grid, at three
dataset sizes (tokens per parameter), three seeds each.

The model (``get_config``) and the grid (``get_sweep``) of ``python -m experiments.d2z``; one run:
``python -m btlm_jax.main --config=configs/experiments/d2z.py[:scale=S]
--config.optim.schedule=wsd --config.optim.peak_lr=0.006 --config.train.steps=163 --workdir=DIR``.

Default (scale 1): a 58k-parameter model (width 32, 2 layers, vocabulary 1024, muP), sequences
of 128, batch 16, 2, 8 and 32 tokens per parameter (about 57, 226 and 905 steps), 4 schedules x 4
peak LRs a factor 2 apart (extended by one more LR, up to 3 times, where a schedule's seed-mean
optimum lands on the grid's edge), seeds 0, 1, 2, AdamW weight decay 1.0 (why:
``experiments/d2z.py``). The width is 32 so that the whole default set of experiments runs in
about an hour on a 2-core CPU; ``--scale 2`` is the width-64 model. ``--scale S`` widens the model
(width 32 S, 2 S layers, vocabulary
1024 min(S, 8), batch 16 S) and raises the dataset sizes to 2 S, 8 S and 32 S tokens per parameter
(at most 20, 80 and 320); ``--tpp``, ``--lrs``, ``--seeds`` and ``--schedules`` set them directly.
"""

from btlm_jax.experiments import recipes
from btlm_jax.experiments.data import ExperimentError
from btlm_jax.experiments.grid import axis

NAME = "d2z"
ANALYSIS = "experiments.d2z"
SCHEDULES = ("d2z", "linear_10x", "cosine_10x", "wsd", "constant")
DEFAULT_SCHEDULES = ("d2z", "linear_10x", "cosine_10x", "wsd")
DEFAULT_SEEDS = (0, 1, 2)
EXTEND_ROUNDS = 3
DEFAULT_LRS = (3e-3, 6e-3, 1.2e-2, 2.4e-2)
WEIGHT_DECAY = 1.0  # keeps tau_iter / T below 1 at these short runs (experiments/d2z.py)


def sizes(scale: float, smoke: bool = False) -> dict:
    s = max(scale, 0.25)
    sz = {"d_model": 16 * max(1, round(2 * s)), "n_layers": max(2, round(2 * s)),
          "vocab": 1024 * int(min(8, max(1, round(s)))), "batch": 16 * max(1, round(s)),
          "tpp": (min(20.0, 2.0 * s), min(80.0, 8.0 * s), min(320.0, 32.0 * s))}
    if smoke:
        sz.update(d_model=32, n_layers=1, batch=4, tpp=(0.05,))
    return sz


def _model(sz: dict) -> dict:
    return recipes.model_overrides(sz["d_model"], sz["n_layers"], sz["vocab"], mup=True,
                                   base_d_model=sz["d_model"])


def _run(sz: dict, smoke: bool) -> dict:
    return recipes.run_overrides(steps=6, batch=sz["batch"], evals=1 if smoke else 4,
                                 eval_batches=2 if smoke else 16, eval_batch=4 if smoke else 8)


def get_config(arg: str = ""):
    a = recipes.parse_arg(arg)
    sz = sizes(a["scale"], bool(a["smoke"]))
    model = recipes.build({**_model(sz), **_run(sz, bool(a["smoke"]))})
    steps = 6 if a["smoke"] else recipes.steps_for_tpp(
        sz["tpp"][0], recipes.count_params(model), sz["batch"] * recipes.SEQ_LEN)
    return recipes.build({**_model(sz), **_run(sz, bool(a["smoke"])),
                          **recipes.length_overrides(steps, evals=1 if a["smoke"] else 4),
                          "optim.weight_decay": WEIGHT_DECAY, "optim.schedule": "d2z",
                          "optim.peak_lr": DEFAULT_LRS[0]})


def add_options(p) -> None:
    p.add_argument("--lrs", default="", help="peak LRs, comma separated (default: %s)" %
                   ",".join(f"{x:g}" for x in DEFAULT_LRS))
    p.add_argument("--tpp", default="", help="tokens per parameter, comma separated")
    p.add_argument("--schedules", default="", help="subset of " + ",".join(SCHEDULES) +
                   " (default: %s)" % ",".join(DEFAULT_SCHEDULES))
    p.add_argument("--seeds", default="", help="seeds, comma separated (default: %s)" %
                   ",".join(map(str, DEFAULT_SEEDS)))
    p.add_argument("--extend-rounds", type=int, default=EXTEND_ROUNDS,
                   help="times an LR grid may be extended past an edge optimum (0: never)")
    p.add_argument("--wd", type=float, default=None,
                   help=f"AdamW weight decay lambda (default {WEIGHT_DECAY})")


def _grid(args, sz: dict) -> tuple[list, list, list, float]:
    lrs = recipes.numbers(args.lrs, "--lrs", DEFAULT_LRS)
    tpps = recipes.numbers(args.tpp, "--tpp", sz["tpp"])
    schedules = ([s.strip() for s in args.schedules.split(",") if s.strip()]
                 or list(DEFAULT_SCHEDULES))
    bad = [s for s in schedules if s not in SCHEDULES]
    if bad:
        raise ExperimentError(f"--schedules: unknown {bad}; choose from {SCHEDULES}")
    if args.smoke:
        schedules, lrs, tpps = ["d2z", "linear_10x"], [1e-2], [0.05]
    wd = float(args.wd) if args.wd is not None else WEIGHT_DECAY
    if wd < 0:
        raise ExperimentError(f"--wd={wd}: weight decay must be >= 0")
    return schedules, lrs, tpps, wd


def seeds_of(args) -> list[int]:
    """``--seeds`` (default 0, 1, 2; the smoke grid 0, 1)."""
    if args.smoke and not args.seeds:
        return [0, 1]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or list(DEFAULT_SEEDS)
    except ValueError:
        raise ExperimentError(f"--seeds={args.seeds!r}: expected integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds={args.seeds!r}: repeated seed")
    return seeds


def get_sweep(args) -> dict:
    sz = sizes(args.scale, args.smoke)
    schedules, lrs, tpps, wd = _grid(args, sz)
    arg = "smoke" if args.smoke else recipes.format_arg(scale=args.scale)
    n_params = recipes.count_params(get_config(arg))
    tokens_per_step = sz["batch"] * recipes.SEQ_LEN
    seeds = seeds_of(args)
    if args.extend_rounds < 0:
        raise ExperimentError(f"--extend-rounds={args.extend_rounds}: must be >= 0")
    steps = {t: 3 + int(t * 40) if args.smoke else recipes.steps_for_tpp(t, n_params, tokens_per_step)
             for t in tpps}
    evals = 1 if args.smoke else 4
    return {
        "config_arg": arg,
        "axes": {"tpp": {t: recipes.length_overrides(steps[t], evals=evals) for t in tpps},
                 "schedule": axis("optim.schedule", schedules),
                 "peak_lr": axis("optim.peak_lr", lrs),
                 "seed": axis("seed", seeds)},
        "fixed": {"optim.weight_decay": wd},
        "extend": {"axis": "peak_lr", "key": "optim.peak_lr", "over": ["seed"], "factor": 2.0,
                   "rounds": 0 if args.smoke else args.extend_rounds},
        "meta_keys": {"steps": "train.steps"},
        "info": {"num_params": n_params,
                 "model": {k.split(".", 1)[1]: v for k, v in _model(sz).items()},
                 "tokens_per_step": tokens_per_step, "tpp": tpps, "lrs": lrs,
                 "schedules": schedules, "weight_decay": wd, "seeds": seeds,
                 "headline": f"{n_params:,} parameters; TPP {tpps} -> steps "
                             f"{sorted(set(steps.values()))}"},
    }
