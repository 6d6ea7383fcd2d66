"""Loss-against-position figures (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_filename(result: dict) -> str:
    pi = "on" if result["position_interpolation"] else "off"
    q = "" if result.get("quantize", "none") == "none" else f"_{result['quantize']}"
    return f"loss_vs_position_L{result['length']}_pi-{pi}{q}.png"


def plot_loss_vs_position(result: dict, path: str | Path) -> Path:
    """One figure: per-position loss (thin), bucket means (steps), the training length (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    pos_loss = np.asarray(result["position_loss"], np.float64)
    ax.plot(np.arange(len(pos_loss)), pos_loss, lw=0.6, alpha=0.45, color="tab:blue",
            label="per position")
    xs, ys = [], []
    for b in result["position_buckets"]:
        if b["loss"] is not None:
            xs += [b["start"], b["end"]]
            ys += [b["loss"], b["loss"]]
    ax.plot(xs, ys, lw=2.0, color="tab:red", label="bucket mean")
    lt = result.get("train_length")
    if lt and lt < len(pos_loss):
        ax.axvline(lt, ls="--", color="gray", lw=1.0, label=f"train length {lt}")
    pi = "PI on" if result["position_interpolation"] else "PI off"
    q = result.get("quantize", "none")
    ax.set_title(f"length {result['length']}, {pi} (slopes / {result['pi_scale']:.3g})"
                 + ("" if q == "none" else f", {q}") + f": loss {result['loss']:.4f}")
    ax.set_xlabel("position in sequence")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
