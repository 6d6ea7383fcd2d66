"""ALiBi position interpolation: train at a short length (with a passkey-retrieval task mixed
into the text), evaluate the LM loss and the retrieval accuracy at 1x, 2x, 4x and 8x that length
with and without (and with partial) interpolation, three seeds.

The model (``get_config``: the first model) and the grid (``get_sweep``) of
``python -m experiments.alibi_pi``; the evaluation at every length is the post-training hook
``experiments.alibi_pi:evaluate_lengths``. Default (scale 1): two models (width 64 x 2 layers and
width 96 x 3 layers, vocabulary 2048) trained at length 128 for 1000 steps of 16 sequences,
evaluated at 128, 256, 512 and 1024 on 32k held-out tokens at every length, read from rows that
lie inside one held-out document (the experiment re-splits the text into documents of at least
8 x 1024 characters: ``experiments.alibi_pi:prepare``), and on 64 passkey examples per length
(the key more than L_train tokens before the question beyond 1x). Half of the training rows
are passkey documents (``--passkey-frac``; at a quarter these models never learn to retrieve at
L_train, so the retrieval comparison would have nothing to test). Seeds 0, 1, 2 (``--seeds``).
``--scale S`` multiplies the widths, the layer counts, the steps and the training length
(rounded to a power of two); ``--train-len N`` (config argument ``train_len=N``) sets the training length directly.
"""

import math

from btlm_jax.experiments import recipes
from btlm_jax.experiments.data import ExperimentError

NAME = "alibi_pi"
ANALYSIS = "experiments.alibi_pi"
FACTORS = (1, 2, 4, 8)
DEFAULT_SEEDS = (0, 1, 2)
# at 0.25 the 1000-step models do not learn retrieval (experiments/results/alibi_pi_passkey25)
PASSKEY_FRAC = 0.5


def sizes(scale: float, smoke: bool = False, train_len: int = 0) -> dict:
    s = max(scale, 0.25)
    sz = {"train_len": int(train_len or 2 ** round(math.log2(128 * max(1.0, s)))),
          "vocab": 2048 * int(min(4, max(1, round(s)))), "steps": int(1000 * s), "batch": 16,
          "eval_batch": 8, "eval_batches": 8, "eval_tokens": 32768 * max(1, round(s)),
          "models": [(16 * max(1, round(4 * s)), max(1, round(2 * s))),
                     (16 * max(1, round(6 * s)), max(1, round(3 * s)))]}
    sz["passkey_examples"] = 64
    if smoke:
        sz.update(train_len=64, steps=4, batch=4, eval_batch=2, eval_batches=1, eval_tokens=1024,
                  models=[(32, 1)], passkey_examples=4)
    return sz


def _model(d_model: int, n_layers: int, vocab: int) -> dict:
    return recipes.model_overrides(d_model, n_layers, vocab, mup=True, base_d_model=d_model)


def get_config(arg: str = ""):
    a = recipes.parse_arg(arg)
    sz = sizes(a["scale"], bool(a["smoke"]), int(a.get("train_len", 0)))
    return recipes.build({
        **_model(*sz["models"][0], sz["vocab"]),
        **recipes.run_overrides(steps=sz["steps"], batch=sz["batch"], seq_len=sz["train_len"],
                                evals=1, eval_batches=sz["eval_batches"],
                                eval_batch=sz["eval_batch"]),
        "optim.peak_lr": 1e-2, "optim.schedule": "d2z",
        "model.max_seq_len": sz["train_len"] * max(FACTORS)})


def add_options(p) -> None:
    p.add_argument("--train-len", type=int, default=0,
                   help="training length (default 128 x scale, a power of two); evaluated at 1, "
                   "2, "
                   "4 and 8 times it")
    p.add_argument("--seeds", default="", help="seeds, comma separated (default: 0,1,2)")
    p.add_argument("--passkey-frac", type=float, default=PASSKEY_FRAC,
                   help="fraction of the training rows that are passkey documents (default "
                   "%(default)s; 0: the LM-only experiment)")


def get_sweep(args) -> dict:
    if args.train_len and args.train_len < 8:
        raise ExperimentError(f"--train-len={args.train_len}: must be >= 8")
    sz = sizes(args.scale, args.smoke, args.train_len)
    lengths = [sz["train_len"] * f for f in FACTORS]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()] or (
            [0, 1] if args.smoke else list(DEFAULT_SEEDS))
    except ValueError:
        raise ExperimentError(f"--seeds={args.seeds!r}: expected integers, e.g. 0,1,2") from None
    if not 0 <= args.passkey_frac < 1:
        raise ExperimentError(f"--passkey-frac={args.passkey_frac}: must be in [0, 1)")
    extra = {"train_len": args.train_len} if args.train_len else {}
    arg = "smoke" if args.smoke else recipes.format_arg(scale=args.scale, **extra)
    return {
        "config_arg": arg,
        "axes": {"model": {f"d{d}x{n}L": _model(d, n, sz["vocab"]) for d, n in sz["models"]},
                 "seed": {s: {"seed": s} for s in seeds}},
        "prepare": "experiments.alibi_pi:prepare",
        "prepare_args": {"train_len": sz["train_len"], "longest": max(lengths),
                         "passkey_frac": float(args.passkey_frac), "vocab": sz["vocab"],
                         "passkey_docs": 200 if args.smoke else 6000},
        "meta_keys": {"d_model": "model.d_model", "n_layers": "model.n_layers",
                      "train_len": "train.seq_len", "steps": "train.steps"},
        "post": "experiments.alibi_pi:evaluate_lengths",
        "post_args": {"lengths": lengths, "eval_tokens": sz["eval_tokens"], "max_batch": 8,
                      "buckets": 16, "passkey_examples": sz["passkey_examples"]},
        "info": {"train_len": sz["train_len"], "lengths": lengths, "steps": sz["steps"],
                 "seeds": seeds, "passkey_frac": float(args.passkey_frac),
                 "batch": sz["batch"], "vocab": sz["vocab"],
                 "headline": f"trained at {sz['train_len']}, evaluated at {lengths}"},
    }
