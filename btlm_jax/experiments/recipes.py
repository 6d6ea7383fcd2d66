"""Building blocks of the experiment config files (``configs/experiments/*.py``): BTLM-shaped model
overrides, training-run settings, the config-file argument, parameter counts, and figure helpers
shared by the analyses in ``experiments/``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

SEQ_LEN = 128
SP_INIT_STD = 0.02  # GPT-2 / Cerebras-GPT init for the standard parametrisation
BASE_CONFIG = "configs/btlm.py:tiny"


def parse_arg(arg: str | None) -> dict[str, float]:
    """A config file's argument: ``"scale=2"``, ``"smoke"``, ``"scale=1,train_len=32"``, ``""``
    -> ``{"scale": 2.0, "smoke": 0.0, ...}`` (numbers; ``smoke`` alone means 1)."""
    out = {"scale": 1.0, "smoke": 0.0}
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        key, eq, val = part.partition("=")
        try:
            out[key.strip()] = float(val) if eq else 1.0
        except ValueError:
            raise ValueError(f"config argument {part!r}: expected KEY=NUMBER") from None
    return out


def format_arg(**values: float) -> str:
    """The inverse of :func:`parse_arg` for the values that differ from its defaults."""
    default = {"scale": 1.0, "smoke": 0.0}
    return ",".join(f"{k}={v:g}" for k, v in values.items() if default.get(k) != v)


def model_overrides(d_model: int, n_layers: int, vocab: int, *, mup: bool = True,
                    base_d_model: int = 64, head_dim: int = 16) -> dict[str, Any]:
    """A BTLM-shaped model (ALiBi, SwiGLU 8/3 d, tied embeddings). ``mup``: muP with base width
    ``base_d_model`` (BTLM's multipliers); else standard parametrisation, init std 0.02."""
    o = {
        "model.d_model": int(d_model), "model.n_layers": int(n_layers),
        "model.n_heads": max(1, int(d_model) // head_dim),
        "model.d_ff": int(round(8 * d_model / 3)), "model.vocab_size": int(vocab),
        "model.mup.enabled": bool(mup),
    }
    if mup:
        o["model.mup.base_d_model"] = int(base_d_model)
        o["model.mup.base_d_ff"] = 8 * base_d_model / 3
        o["optim.mup_lr_scaling"] = True
    else:
        o["model.init_std"] = SP_INIT_STD
        o["optim.mup_lr_scaling"] = False
    return o


def width_overrides(d_model: int, head_dim: int = 16) -> dict[str, Any]:
    """The width keys of :func:`model_overrides` alone (a width axis)."""
    return {"model.d_model": int(d_model), "model.n_heads": max(1, int(d_model) // head_dim),
            "model.d_ff": int(round(8 * d_model / 3))}


def length_overrides(steps: int, *, evals: int = 1, warmup: int | None = None) -> dict[str, Any]:
    """The keys that follow the run length: ``evals`` evaluations spread over the run (the last
    at the end), one checkpoint at the end, warmup 10%."""
    steps = int(steps)
    return {"train.steps": steps,
            "optim.warmup_steps": int(warmup if warmup is not None else max(1, steps // 10)),
            "train.log_every_steps": max(1, steps // 25),
            "eval.every_steps": max(1, steps // max(1, evals)),
            "checkpoint.every_steps": steps}


def run_overrides(*, steps: int, batch: int, seq_len: int = SEQ_LEN, evals: int = 1,
                  eval_batches: int = 8, eval_batch: int = 8, warmup: int | None = None) -> dict:
    """Training-run settings; no progress bar or TensorBoard (many runs share a terminal)."""
    return {**length_overrides(steps, evals=evals, warmup=warmup),
            "train.batch_size": int(batch), "train.seq_len": int(seq_len),
            "eval.num_batches": int(eval_batches), "eval.batch_size": int(eval_batch),
            "checkpoint.keep": 1, "logging.tensorboard": False, "logging.progress_bar": False}


def build(overrides: Mapping[str, Any], base: str = BASE_CONFIG):
    """``base`` (FILE:PRESET) with ``overrides`` set, through main's config parser."""
    from btlm_jax.cli.overrides import load_config

    return load_config(base, overrides)


def count_params(cfg) -> int:
    """Exact parameter count of the config's model (nothing allocated)."""
    from btlm_jax.describe import describe

    return int(describe(cfg)["num_params"])


def numbers(text: str, option: str, default) -> list[float]:
    """A comma-separated list of positive numbers given to ``option`` (``default`` when empty)."""
    from btlm_jax.experiments.data import ExperimentError

    vals = []
    for part in filter(None, (t.strip() for t in text.split(","))):
        try:
            vals.append(float(part))
        except ValueError:
            raise ExperimentError(f"{option}={text!r}: {part!r} is not a number") from None
        if vals[-1] <= 0:
            raise ExperimentError(f"{option}={text!r}: values must be positive")
    return vals or [float(x) for x in default]


def steps_for_tpp(tpp: float, num_params: int, tokens_per_step: int) -> int:
    return max(1, int(math.ceil(tpp * num_params / tokens_per_step)))


def save_figure(fig, fig_dir: Path, name: str) -> str:
    path = Path(fig_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def verdict(lines: list[str], claim: str, held: bool) -> str:
    """A report: its lines, then ``claim: held`` (the line the notebooks and logs end with)."""
    return "\n".join([*lines, f"{claim}: {held}"])


def finish_axes(ax, xlabel: str, ylabel: str | None = None, title: str | None = None,
                legend: bool = True, grid_axis: str = "both") -> None:
    """Labels, title, a light grid and a small legend: what every experiment figure sets."""
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis=grid_axis)
    if legend:
        ax.legend(fontsize=8)


def loss_table(results, outer: str, inner: str, loss) -> dict:
    """``{meta[outer]: {meta[inner]: {peak_lr: {seed: loss(result)}}}}`` over sweep results."""
    t: dict = {}
    for r in results:
        m = r["meta"]
        t.setdefault(m[outer], {}).setdefault(m[inner], {}).setdefault(
            m["peak_lr"], {})[m.get("seed", 0)] = loss(r)
    return t
