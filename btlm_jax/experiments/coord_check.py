"""muP coordinate check: train a few steps at several widths, record activation size per layer.

    python -m btlm_jax.experiments.coord_check --config=tiny \\
        [--widths=64,128,256,512] [--steps=4] [--out=runs/coord_check] [--config.model.n_layers=2]

For each width ``d`` the config's model is resized (``d_model = d``, ``d_ff`` keeping the
config's ratio, same head count, layers unscanned so every block's output can be captured) and
trained for ``--steps`` steps of the config's AdamW with its muP groups at a constant LR
(``optim.peak_lr``, no warmup) on one fixed random batch, once under muP and once under the
standard parametrisation (``model.mup.enabled=False``). Before each update the mean absolute
value of every coordinate of the embedding output, each block's output, the final LayerNorm and
the logits is recorded. Under muP these stay flat as the width grows; under the standard
parametrisation they grow. Writes ``coord_check.png`` (activation size against width, one panel
per parametrisation and step) and ``coord_check.json`` (the numbers and, per layer, the slope of
log size against log width at the last step) to ``--out``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

PARAMETRIZATIONS = ("mup", "sp")


def _width_config(cfg, width: int, parametrization: str):
    c = cfg.copy_and_resolve_references()
    m = c.model
    if width % m.n_heads:
        raise ValueError(f"width {width} is not divisible by model.n_heads={m.n_heads}")
    m.d_ff = max(1, round(width * cfg.model.d_ff / cfg.model.d_model))
    m.d_model = width
    m.scan_layers = False
    m.remat = "none"
    # unpadded: the mean |activation| of an FFN layer would count model.pad_multiple's zero units
    m.pad_multiple = 1
    m.mup.enabled = parametrization == "mup"
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    return c


def _activation_sizes(intermediates, logits) -> dict[str, float]:
    sizes = {}
    for name, value in intermediates.items():
        if name == "__call__":  # the model's own output: the logits, recorded below
            continue
        arrays = [x for x in jax.tree.leaves(value) if hasattr(x, "ndim") and x.ndim == 3]
        if arrays:
            sizes[name] = jnp.mean(jnp.abs(arrays[0].astype(jnp.float32)))
    sizes["logits"] = jnp.mean(jnp.abs(logits))
    return sizes


def run_width(cfg, width: int, parametrization: str, steps: int, tokens) -> list[dict]:
    """Activation sizes (layer -> mean |x|) before each of ``steps`` updates at one width."""
    from btlm_jax import optim
    from btlm_jax.models.btlm import BTLM

    c = _width_config(cfg, width, parametrization)
    model = BTLM(c.model)
    # one compiled init instead of hundreds of eagerly compiled small ops
    variables = jax.jit(model.init)(jax.random.PRNGKey(c.seed), tokens[:, :-1])
    params = nn.meta.unbox(variables["params"])
    tx, _ = optim.build(c, steps)
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p):
        logits, state = model.apply({"params": p}, tokens[:, :-1], capture_intermediates=True,
                                    mutable=["intermediates"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, _activation_sizes(state["intermediates"], logits)

    @jax.jit
    def step(p, s):
        (loss, sizes), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, sizes

    records = []
    for _ in range(steps):
        params, opt_state, loss, sizes = step(params, opt_state)
        rec = {k: float(v) for k, v in sizes.items()}
        rec["loss"] = float(loss)
        records.append(rec)
    return records


def coord_check(cfg, widths: Sequence[int], steps: int = 4, batch_size: int = 4,
                seq_len: int = 32, parametrizations: Sequence[str] = PARAMETRIZATIONS) -> dict:
    """``{parametrization: {width: [ {layer: mean |x|, "loss": ...} per step ]}}``."""
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be >= 1")
    if len(widths) < 2:
        raise ValueError(f"--widths={list(widths)}: give at least two widths")
    for p in parametrizations:
        if p not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization {p!r}: must be one of {', '.join(PARAMETRIZATIONS)}")
    rng = np.random.default_rng(cfg.seed)
    tokens = jnp.asarray(rng.integers(0, cfg.model.vocab_size, (batch_size, seq_len + 1)),
                         jnp.int32)
    return {p: {int(w): run_width(cfg, int(w), p, steps, tokens) for w in widths}
            for p in parametrizations}


def slopes(results: dict, step: int = -1) -> dict[str, dict[str, float]]:
    """Per parametrisation and layer: slope of log(mean |x|) against log(width) at ``step``."""
    out = {}
    for p, by_width in results.items():
        widths = sorted(by_width)
        layers = [k for k in by_width[widths[0]][step] if k != "loss"]
        x = np.log([float(w) for w in widths])
        out[p] = {}
        for layer in layers:
            y = np.log([by_width[w][step][layer] for w in widths])
            out[p][layer] = float(np.polyfit(x, y, 1)[0])
    return out


def slope_lines(sl: dict[str, dict[str, float]]) -> list[str]:
    """One line per parametrisation: every layer's slope (in model order) and the largest."""
    out = []
    for p, by_layer in sl.items():
        worst = max(by_layer.items(), key=lambda kv: abs(kv[1]))
        out.append(f"  {p:4s} " + " ".join(f"{k}={v:+.2f}" for k, v in
                                          sorted(by_layer.items(),
                                                 key=lambda kv: _layer_order(kv[0])))
                   + f"   (largest |slope|: {worst[0]} {worst[1]:+.2f})")
    return out


def _layer_order(name: str):
    if name == "embed":
        return (0, 0)
    if name.startswith("layers_"):
        return (1, int(name.split("_")[1]))
    return (2, 0 if name == "ln_f" else 1)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(results)
    widths = sorted(next(iter(results.values())))
    n_steps = len(results[params[0]][widths[0]])
    shown = sorted({0, n_steps // 2, n_steps - 1})
    fig, axes = plt.subplots(len(params), len(shown), figsize=(3.6 * len(shown), 3.2 * len(params)),
                             squeeze=False, sharex=True)
    for i, p in enumerate(params):
        layers = sorted((k for k in results[p][widths[0]][0] if k != "loss"), key=_layer_order)
        for j, t in enumerate(shown):
            ax = axes[i][j]
            for layer in layers:
                ax.loglog(widths, [results[p][w][t][layer] for w in widths], "o-", ms=3,
                          label=layer)
            ax.set_title(f"{p}: step {t}")
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
            if j == 0:
                ax.set_ylabel("mean |activation|")
            if i == len(params) - 1:
                ax.set_xlabel("width (d_model)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv) -> None:
    from absl import flags

    del argv
    f = flags.FLAGS
    widths = [int(x) for x in f.widths.split(",") if x.strip()]
    cfg = _CONFIG.value
    results = coord_check(cfg, widths, steps=f.steps, batch_size=f.batch_size,
                          seq_len=f.seq_len,
                          parametrizations=[x for x in f.parametrizations.split(",") if x])
    os.makedirs(f.out, exist_ok=True)
    plot(results, os.path.join(f.out, "coord_check.png"))
    sl = slopes(results)
    with open(os.path.join(f.out, "coord_check.json"), "w") as fh:
        json.dump({"widths": widths, "results": results, "slopes_last_step": sl}, fh, indent=1)
    print("slope of log mean|x| vs log width at the last step (0 = width independent):")
    print("\n".join(slope_lines(sl)))
    print("wrote", os.path.join(f.out, "coord_check.png"), "and coord_check.json")
    if any(not math.isfinite(v) for by_layer in sl.values() for v in by_layer.values()):
        raise SystemExit("non-finite activations: lower optim.peak_lr")


_CONFIG = None


def run() -> None:
    global _CONFIG
    from absl import flags

    from btlm_jax import errors
    from btlm_jax.cli.common import run_app
    from btlm_jax.cli.overrides import define_config_flag

    with errors.cli():
        _CONFIG = define_config_flag()  # a preset or FILE.py[:ARG], as btlm-train takes it
    errors.define_verbose_flag()
    flags.DEFINE_string("widths", "64,128,256,512", "Comma-separated d_model values.")
    flags.DEFINE_integer("steps", 4, "Training steps per width.")
    flags.DEFINE_integer("batch_size", 4, "Sequences in the fixed batch.")
    flags.DEFINE_integer("seq_len", 32, "Tokens per sequence.")
    flags.DEFINE_string("parametrizations", "mup,sp", "Comma-separated subset of mup,sp.")
    flags.DEFINE_string("out", "runs/coord_check", "Output folder for the PNG and JSON.")
    run_app(main, prog="python -m btlm_jax.experiments.coord_check")


if __name__ == "__main__":
    run()
